"""Greedy generation by batch size: time against batch 16, answers against one prompt at a time.

`python -m bench generate [--preset=organism_hard] [--sizes=16,32,64,128] [--reps=5] [--no-write]`

Every side generates the evaluation's answers (`evaluate.max_new_tokens` tokens, EOS ends an
answer) to the same chat-rendered prompts of the shipped organism: its bundled harmful and
harmless evaluation sets, as `saber.evaluate` sees them. Batch 16 was the evaluation's only
batch size before generation got its own (`evaluate.generate_batch_size`). Sides alternate
between repetitions so that load from other processes hits them alike; the reported time of a
side is its best of N. Answers are compared token for token with answers generated one prompt
at a time (no padding at all). Results replace the section "Generation batch size" of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path
from typing import Any

import torch

from saber.config.schema import EvaluateConfig
from saber.evaluate.generation import encode_prompts, greedy_generate
from saber.model.loading import load_model
from saber.organism.shipped import shipped_presets
from saber.prompts import load_prompts

from bench.bench_collect import machine
from bench.report import publish

TITLE = "Generation batch size"
BASELINE = 16  # the evaluation's batch before generation batched apart, prompts


def prompts_of(organism_dir: Path) -> list[str]:
    """The organism's harmful and harmless evaluation prompts (what `saber.evaluate` scores)."""
    return [text for kind in ("harmful", "harmless")
            for text in load_prompts({"path": str(organism_dir / "prompts" / f"{kind}_eval.jsonl"), "limit": 100},
                                     f"{kind}_eval").texts]


def run(preset: str, sizes: list[int], reps: int) -> dict[str, Any]:
    organism = shipped_presets()[preset]
    model, tok = load_model({"dtype": "float32", "device": "cpu"}, organism / "model")
    ids = encode_prompts(tok, prompts_of(organism))
    n_tokens = EvaluateConfig().max_new_tokens
    alone = [greedy_generate(model, tok, [p], n_tokens, 1)[0] for p in ids]
    sides = sorted({BASELINE, *sizes})
    times: dict[int, list[float]] = {s: [] for s in sides}
    same: dict[int, bool] = {}
    for rep in range(reps):
        for size in sides[rep % len(sides):] + sides[:rep % len(sides)]:
            start = time.perf_counter()
            out = greedy_generate(model, tok, ids, n_tokens, size)
            times[size].append(time.perf_counter() - start)
            same[size] = same.get(size, True) and out == alone
    return {"preset": preset, "prompts": len(ids), "tokens": n_tokens, "reps": reps, "times": times,
            "same": same, "answer_tokens": sum(len(a) for a in alone)}


def render(result: dict[str, Any], command: str) -> str:
    best = {s: min(t) for s, t in result["times"].items()}
    rows = [f"| {s} | {best[s]:.2f} | {', '.join(f'{x:.2f}' for x in result['times'][s])} | "
            f"{best[s] / best[BASELINE]:.2f} | {'yes' if result['same'][s] else '**no**'} |" for s in best]
    default = EvaluateConfig().generate_batch_size
    return "\n".join([
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {dt.date.today().isoformat()}  ",
        f"Model: the shipped `{result['preset']}` (float32), {result['prompts']} evaluation prompts (harmful and "
        f"harmless), greedy answers of up to {result['tokens']} tokens ({result['answer_tokens']} in all), "
        f"{result['reps']} repetitions per batch size.",
        "",
        "| batch size | best s | runs s | time / batch 16 | answers equal one-at-a-time |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"The default `evaluate.generate_batch_size` is {default}. On a small model every decoding step "
        "costs about the same whatever the batch holds, so the time follows the number of batches; a "
        "GPU shows the same up to its memory, and generation halves its batch on out-of-memory.",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench generate", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="organism_hard", help="shipped organism whose prompts and weights are used")
    parser.add_argument("--sizes", default="16,32,64,128", help="comma list of generation batch sizes")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per batch size")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = run(args.preset, [int(s) for s in args.sizes.split(",")], args.reps)
    flags = " ".join(a for a in (argv or []) if a != "--no-write")
    publish(TITLE, render(result, f"python -m bench generate {flags}".strip()), not args.no_write)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
