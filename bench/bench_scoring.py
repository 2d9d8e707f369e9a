"""Teacher-forced scoring with the vocabulary projection on the answer positions only, against
the full forward: peak memory and time.

`python -m bench scoring [--vocab=131072] [--prompt-tokens=400] [--answer-tokens=32] [--batch=16] [--reps=2] [--no-write]`

A random 2-layer Llama with a large vocabulary, so the logits dominate memory as in a real
model with a 128k-262k vocabulary. Each side runs in its own process (peak RSS is per process):
`full` projects every position, `kept` passes `logits_to_keep` (what
`saber.evaluate.generation.teacher_forced` does when the model takes it). Sides alternate; the
best of N is reported. Results replace the section "Scoring only the answer positions" of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import time
from typing import Any

from bench.bench_collect import machine
from bench.report import publish

TITLE = "Scoring only the answer positions"


def side(mode: str, vocab: int, prompt_tokens: int, answer_tokens: int, batch: int) -> dict[str, Any]:
    """One side in this process: peak RSS rise (MiB), seconds and a checksum of the log-probs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import saber.evaluate.generation as generation
    from saber.testing.tiny_models import build_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=prompt_tokens + answer_tokens,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    if mode == "full":
        generation.keeps_logits = lambda model: False
    prompts = [[5 + (i * 7 + j) % 300 for j in range(prompt_tokens)] for i in range(batch)]
    answers = [[7 + (i + j) % 300 for j in range(answer_tokens)] for i in range(batch)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    total = sum(float(b.logp[b.mask].double().sum())
                for b in generation.teacher_forced(model, build_tokenizer(), prompts, answers, batch))
    return {"seconds": time.perf_counter() - start, "checksum": total,
            "peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}


def render(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, command: str) -> str:
    best = {m: {k: min(r[k] for r in rs) for k in ("seconds", "peak_mib")} for m, rs in results.items()}
    same = len({round(r["checksum"], 3) for rs in results.values() for r in rs}) == 1
    rows = [f"| {m} | {best[m]['peak_mib']:.0f} | {best[m]['seconds']:.2f} | "
            f"{best[m]['peak_mib'] / best['full']['peak_mib']:.2f} | "
            f"{best[m]['seconds'] / best['full']['seconds']:.2f} |"
            for m in results]
    return "\n".join([
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {dt.date.today().isoformat()}  ",
        f"Model: random LlamaForCausalLM, 2 layers, hidden 64, vocab {args.vocab}, float32; one batch of "
        f"{args.batch} prompts of {args.prompt_tokens} tokens with answers of {args.answer_tokens} tokens; "
        f"{args.reps} runs per side, best kept.",
        "",
        "| side | peak RSS rise MiB | s | memory / full | time / full |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Log-prob checksums of the two sides agree: {'yes' if same else '**no**'}. The full forward holds "
        "[batch, prompt + answer, vocabulary] logits and their float32 log-softmax; with `logits_to_keep` "
        "only the answer positions (and the last prompt token) reach the vocabulary projection.",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench scoring", description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=131072, help="vocabulary size, tokens")
    parser.add_argument("--prompt-tokens", type=int, default=400, help="prompt length, tokens")
    parser.add_argument("--answer-tokens", type=int, default=32, help="answer length, tokens")
    parser.add_argument("--batch", type=int, default=16, help="prompts in the batch")
    parser.add_argument("--reps", type=int, default=2, help="runs per side")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    parser.add_argument("--side", choices=("full", "kept"), help=argparse.SUPPRESS)  # one side, in a child process
    args = parser.parse_args(argv)
    shape = (args.vocab, args.prompt_tokens, args.answer_tokens, args.batch)
    if args.side:
        print(json.dumps(side(args.side, *shape)))
        return
    results: dict[str, list[dict[str, Any]]] = {"full": [], "kept": []}
    child = [f"--vocab={args.vocab}", f"--prompt-tokens={args.prompt_tokens}", f"--answer-tokens={args.answer_tokens}",
             f"--batch={args.batch}"]
    for _ in range(args.reps):
        for mode in results:
            out = subprocess.run([sys.executable, "-m", "bench.bench_scoring", *child, f"--side={mode}"],
                                 check=True, capture_output=True, text=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    flags = " ".join(a for a in (argv or []) if a != "--no-write")
    publish(TITLE, render(results, args, f"python -m bench scoring {flags}".strip()), not args.no_write)


if __name__ == "__main__":
    main(sys.argv[1:])
