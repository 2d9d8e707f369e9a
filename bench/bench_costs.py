"""Stage costs and scaling: per-stage wall time of the pipeline and how it grows with the work.

`python -m bench costs [--reps=N] [--no-write]`

Random-weight Llama models with the organism's shape (hidden 256, 4 heads, MLP 512; 4 layers, and
8 for the layer scaling) and a byte-level test tokenizer, built offline; the bundled prompt sets
(`data=default`, `evaluate=default`) with modest limits. Each configuration runs the whole chain
in a fresh artifact store (so nothing is cached), and each stage's time is the `wall_time_s` its
artifact manifest records (collect includes loading the model; `reference` is the base model's
half of the evaluation, built once per model and eval config). Configurations: the baseline,
prompts x2 and x4 (every probe and evaluation count), layers x2, and extract.k 4 -> 8; scaling is
reported as ratios to the baseline. With --reps=N every configuration runs N times and the
minimum per stage is kept. Results: docs/bench/costs.json and the section "Stage costs and
scaling" of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from saber.stage_names import STAGE_ORDER
from saber.testing import compose_config as compose

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "BENCHMARKS.md"
RESULTS = REPO / "docs" / "bench"
TITLE = "Stage costs and scaling"
STAGES = (*STAGE_ORDER[:-1], "reference", STAGE_ORDER[-1])  # the base reference is timed apart from evaluate
BASE_PROBES = 32   # prompts per probe set (harmful, harmless, capability), before the split
BASE_EVAL = 16     # held-out harmful and harmless evaluation prompts
BASE_ITEMS = 8     # multiple-choice items per file, XSTest prompts, GSM8K items
GEN_TOKENS = 16    # greedy answer length and teacher-forced continuation length, tokens


def overrides(model_dir: Path, store: Path, scale: int = 1, k: int = 4) -> list[str]:
    """The config of one cost run: bundled prompts scaled by `scale`, `k` directions per layer."""
    probes, evals, items = BASE_PROBES * scale, BASE_EVAL * scale, BASE_ITEMS * scale
    return [
        "data=default", "evaluate=default", f"model.path={model_dir}", "model.name=random-llama",
        "model.dtype=float32", "model.device=cpu", f"store_root={store}", "edit.export=true",
        *[f"data.{kind}.limit={probes}" for kind in ("harmful", "harmless", "capability")],
        *[f"data.{kind}.limit={evals}" for kind in ("harmful_eval", "harmless_eval")],
        f"evaluate.n_harmful={evals}", f"evaluate.n_harmless={evals}", f"evaluate.n_xstest={items}",
        f"evaluate.n_capability={items}", f"evaluate.n_gsm8k={items}",
        f"evaluate.max_new_tokens={GEN_TOKENS}", f"evaluate.kl_tokens={GEN_TOKENS}",
        f"evaluate.gsm8k_max_new_tokens={GEN_TOKENS}", f"extract.k={k}", "evaluate.plots=false",
    ]


CONFIGS = {  # name -> (layers, prompt scale, k)
    "baseline": (4, 1, 4),
    "prompts x2": (4, 2, 4),
    "prompts x4": (4, 4, 4),
    "layers x2": (8, 1, 4),
    "extract.k 8": (4, 1, 8),
}


def stage_times(store: Path) -> dict[str, float]:
    """Seconds per stage from the manifests of a store (summed over a stage's artifacts)."""
    times: dict[str, float] = {}
    for manifest in store.glob("*/*/manifest.json"):
        record = json.loads(manifest.read_text())
        stage = record.get("stage", manifest.parent.parent.name)
        times[stage] = times.get(stage, 0.0) + float(record.get("wall_time_s") or 0.0)
    return times


def ratios(times: dict[str, dict[str, float]], baseline: str = "baseline") -> dict[str, dict[str, float]]:
    """Each configuration's per-stage (and total) time divided by the baseline's."""
    base = times[baseline]
    return {name: {s: (t[s] / base[s] if base.get(s) else math.nan) for s in t} for name, t in times.items()}


def render(times: dict[str, dict[str, float]], rel: dict[str, dict[str, float]]) -> str:
    """Markdown: baseline seconds per stage, then every configuration as a ratio to it."""
    cols = [s for s in (*STAGES, "total") if any(s in t for t in times.values())]
    lines = ["| configuration | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines.append("| baseline, seconds | " + " | ".join(f"{times['baseline'].get(s, math.nan):.2f}" for s in cols) + " |")
    for name in times:
        if name != "baseline":
            lines.append(f"| {name}, ratio | " + " | ".join(f"{rel[name].get(s, math.nan):.2f}" for s in cols) + " |")
    return "\n".join(lines)


def headline(times: dict[str, dict[str, float]], rel: dict[str, dict[str, float]]) -> str:
    """One sentence: where the time goes and how the total scales."""
    base = times["baseline"]
    share = base.get("evaluate", math.nan) / base["total"]
    return (f"Evaluate (base reference included) takes {share:.0%} of the baseline's {base['total']:.1f} s and "
            f"collect {base.get('collect', math.nan) / base['total']:.0%}; the analysis stages (extract, rank, "
            f"entangle) stay under {sum(base.get(s, 0.0) for s in ('extract', 'rank', 'entangle')):.1f} s together. "
            f"Total scales {rel['prompts x2']['total']:.2f}x and {rel['prompts x4']['total']:.2f}x with prompts x2 "
            f"and x4, {rel['layers x2']['total']:.2f}x with twice the layers, and {rel['extract.k 8']['total']:.2f}x "
            "with twice the directions per layer.")


def build_model(out_dir: Path, layers: int) -> Path:
    """A random Llama with the organism's shape and the tests' byte-level tokenizer."""
    from saber.testing.tiny_models import build_tiny

    return build_tiny("llama", out_dir, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096)


def run_config(model_dir: Path, work: Path, scale: int, k: int) -> dict[str, float]:
    """One full chain in a fresh store; seconds per stage plus the runner's total."""
    from saber.pipeline import ModelSession, Pipeline
    from saber.run import run_pipeline

    store = Path(tempfile.mkdtemp(prefix="store-", dir=work))
    cfg = compose(*overrides(model_dir, store, scale, k))
    result = run_pipeline(cfg, Pipeline(cfg, session=ModelSession()))
    times = stage_times(store)
    times["total"] = result.wall_time_s
    return times


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench costs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=1, help="runs per configuration (minimum kept)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # shared cores: one thread is the stable and usually fastest choice
    start = time.perf_counter()
    times: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="saber-costs-") as tmp:
        work = Path(tmp)
        models = {layers: build_model(work / f"llama{layers}", layers) for layers in sorted({c[0] for c in CONFIGS.values()})}
        run_config(models[4], work, 1, 4)  # warm-up, discarded: first-call imports (scikit-learn, plotting)
        for name, (layers, scale, k) in CONFIGS.items():
            runs = [run_config(models[layers], work, scale, k) for _ in range(args.reps)]
            times[name] = {s: min(r.get(s, math.nan) for r in runs) for s in runs[0]}
            print(f"{name:12s} " + " ".join(f"{s} {v:.2f}" for s, v in times[name].items()), flush=True)
    rel = ratios(times)
    table = render(times, rel)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    body = "\n".join([
        f"Command: `{' '.join(['python -m bench costs', *argv])}`  ",
        f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, 1 torch thread; load average at the end {load} (shared machine)  ",
        f"Date: {dt.date.today().isoformat()}; bench wall {time.perf_counter() - start:.0f} s; "
        f"{args.reps} run(s) per configuration after one discarded warm-up run, minimum kept  ",
        "Model: random-weight LlamaForCausalLM with the organism's shape (hidden 256, 4 heads, MLP 512, 4 layers; "
        "8 for `layers x2`), float32, byte-level test tokenizer (320 ids, so English prompts are long: about one "
        "token per 2-3 characters).  ",
        f"Baseline work: bundled `data=default` probe sets limited to {BASE_PROBES} prompts each (70/30 fit / "
        f"held-out split), {BASE_EVAL} harmful and {BASE_EVAL} harmless evaluation prompts, {BASE_ITEMS} items "
        f"per multiple-choice file, XSTest and GSM8K; {GEN_TOKENS} generated tokens per answer and per "
        f"teacher-forced continuation; extract svd k=4, SABER defaults otherwise. `prompts xN` multiplies every "
        "prompt and item count by N.",
        "",
        table,
        "",
        headline(times, rel),
        "",
        "Each stage's seconds are the `wall_time_s` of its artifact manifest in a fresh store (collect includes "
        "loading the model; `reference` is the base model's half of the evaluation: greedy continuations and "
        "their logits, built once per model and evaluation config inside the first evaluate, so evaluate's seconds "
        "include it; later configurations of the same model reuse it; "
        "`total` is the runner's wall time, store and verification overheads included; `edit` is the "
        "streaming export of the edited checkpoint (edit.export=true), while evaluate applies the plan in memory; "
        "see \"Streaming edit at 8B scale\" for the export at scale). Ratios near 1 for a stage that should not depend on the "
        "scaled quantity show its fixed costs; stages under 0.1 s are timer noise; single runs on a shared "
        "machine vary by 10 to 30 %.",
    ])
    print(body)
    if args.no_write:
        return
    from bench.report import update_section

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "costs.json").write_text(json.dumps(
        {"command": " ".join(["python -m bench costs", *argv]), "date": dt.date.today().isoformat(),
         "configs": {n: {"layers": c[0], "prompt_scale": c[1], "extract_k": c[2]} for n, c in CONFIGS.items()},
         "seconds": times, "ratios": rel}, indent=1))
    update_section(DOC, TITLE, body)


if __name__ == "__main__":
    main(sys.argv[1:])
