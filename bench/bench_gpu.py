"""The whole pipeline on a GPU at real shapes: per-stage time, peak memory, batch sizes, tokens/s.

`python -m bench gpu [--shapes=gemma4,llama8b] [--gemma4-config=config.json] [--tiny] [--no-write]`

Random weights in bfloat16, built on the GPU from a transformers config (no download): the Gemma 4
text config (transformers' `gemma4_text` defaults, or the `text_config` of a real Gemma 4 E4B
config.json given with --gemma4-config) and an 8B Llama 3 shape (hidden 4096, 32 layers, GQA 32/8,
MLP 14336, vocabulary 128256); the tests' byte-level tokenizer. Each shape runs every stage of the
conf defaults in a fresh store, one stage at a time, with the peak GPU memory reset before each.
Refusal numbers of a random model mean nothing; time, memory, the batch size collect's auto-tuner
chose and tokens/s do. --tiny runs the same script on tiny shapes on any device (the CI check
that it stays ready). Results: docs/bench/gpu.json and the section "On a GPU" of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_costs import compose, overrides, stage_times

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "BENCHMARKS.md"
RESULTS = REPO / "docs" / "bench"
TITLE = "On a GPU"
ORDER = ("collect", "signature", "extract", "rank", "entangle", "edit", "evaluate")
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def shape_config(name: str, gemma4_config: Path | None, tiny: bool) -> Any:
    """The transformers config of one benchmarked shape."""
    from transformers import CONFIG_MAPPING

    from saber.testing.tiny_models import tiny_config

    if tiny:
        return tiny_config("gemma4_text" if name == "gemma4" else "llama")
    if name == "llama8b":
        return CONFIG_MAPPING["llama"](**LLAMA_8B)
    if gemma4_config is not None:
        data = json.loads(Path(gemma4_config).read_text())
        return CONFIG_MAPPING["gemma4_text"](**data.get("text_config", data))
    return CONFIG_MAPPING["gemma4_text"]()


def build_model(config: Any, out_dir: Path, device: str) -> tuple[Path, float]:
    """Random bfloat16 weights built on `device`, saved with the tests' tokenizer; (dir, parameters in B)."""
    import torch
    from transformers import AutoModelForCausalLM

    from saber.testing.tiny_models import BOS_ID, EOS_ID, PAD_ID, build_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD_ID, EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    n_params = sum(p.numel() for p in model.parameters()) / 1e9
    model.save_pretrained(out_dir)
    build_tokenizer().save_pretrained(out_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out_dir, n_params


def generation_rate(pipeline: Any, cfg: Any) -> float:
    """Greedy tokens per second of the base model on the evaluation's harmful prompts."""
    import torch

    from saber.evaluate.reference import generate_responses
    from saber.evaluate.sets import load_eval_sets
    from saber.evaluate.settings import run_settings

    model, tokenizer = pipeline.load_model([])
    prompts = load_eval_sets(cfg.evaluate, cfg.data, pipeline.prompt_roots()).harmful
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens, _ = generate_responses(model, tokenizer, prompts, run_settings(cfg))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return sum(len(t) for t in tokens) / (time.perf_counter() - start)


def run_shape(name: str, config: Any, work: Path, device: str) -> dict[str, Any]:
    """Every stage of the defaults in a fresh store; seconds, peak GPU GiB and what collect chose."""
    import torch

    from saber.pipeline import Pipeline

    t0 = time.perf_counter()
    model_dir, n_params = build_model(config, work / name, device)
    build_s = time.perf_counter() - t0
    store = work / f"store-{name}"
    cfg = compose(*overrides(model_dir, store, scale=2), "model.dtype=bfloat16", f"model.device={device}",
                  "collect.batch_size=0")
    pipeline = Pipeline(cfg)
    peaks: dict[str, float] = {}
    for stage in ORDER:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        pipeline.ensure(stage, 0)
        peaks[stage] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    collect_meta = json.loads((pipeline.ensure("collect", 0).path / "manifest.json").read_text())["meta"]
    record = {"shape": name, "parameters_b": round(n_params, 3), "build_s": round(build_s, 1),
              "seconds": stage_times(store), "peak_gib": peaks, "collect_batch_size": collect_meta["batch_size"],
              "collect_tokens_per_s": collect_meta["tokens_per_s"],
              "generation_tokens_per_s": round(generation_rate(pipeline, cfg), 1),
              "generation_batch_size": cfg.evaluate.generate_batch_size}
    print(json.dumps(record), flush=True)
    return record


def render(records: list[dict[str, Any]], device: str, argv: list[str]) -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "no GPU (CPU run)"
    stages = [s for s in (*ORDER, "reference") if any(s in r["seconds"] for r in records)]
    lines = [f"Command: `python -m bench gpu {' '.join(argv)}`. Device: {gpu}, torch {torch.__version__}. "
             f"Date {dt.date.today().isoformat()}. Random bfloat16 weights; the conf defaults; bundled prompt sets "
             "(64 per probe set, 32 harmful and 32 harmless evaluation prompts, 16-token answers).", "",
             "| shape | params (B) | " + " | ".join(f"{s} s" for s in stages) + " | peak GiB (stage) | collect batch | "
             "collect tok/s | generation tok/s (batch) |", "|---|---|" + "---|" * (len(stages) + 4)]
    for r in records:
        peak_stage = max(r["peak_gib"], key=lambda s: r["peak_gib"][s])
        lines.append(f"| {r['shape']} | {r['parameters_b']:.2f} | "
                     + " | ".join(f"{r['seconds'].get(s, float('nan')):.1f}" for s in stages)
                     + f" | {r['peak_gib'][peak_stage]:.1f} ({peak_stage}) | {r['collect_batch_size']} | "
                     f"{r['collect_tokens_per_s']:.0f} | {r['generation_tokens_per_s']:.0f} ({r['generation_batch_size']}) |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="gemma4,llama8b", help="comma list: gemma4, llama8b")
    parser.add_argument("--gemma4-config", default=None, help="a real Gemma 4 config.json (its text_config is used)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, any device: checks the script runs")
    parser.add_argument("--work-dir", default=None, help="where models and stores go (default: a temporary directory)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("python -m bench gpu needs a CUDA device for the real shapes; --tiny runs it anywhere")
    records = []
    with tempfile.TemporaryDirectory(prefix="saber-gpu-", dir=args.work_dir) as tmp:
        for name in args.shapes.split(","):
            config = shape_config(name, Path(args.gemma4_config) if args.gemma4_config else None, args.tiny)
            records.append(run_shape(name, config, Path(tmp), device))
    text = render(records, device, argv)
    print(text)
    if not args.no_write:
        from bench.report import update_section

        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "gpu.json").write_text(json.dumps({"argv": argv, "device": device, "records": records}, indent=1))
        update_section(DOC, TITLE, text)
