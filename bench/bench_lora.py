"""LoRA export at 8B scale: adapter size and time against the full checkpoint and a plain copy.

`python -m bench lora [--scale=full|small|tiny] [--no-write]`

Writes the streaming benchmark's synthetic Llama-3-8B-shaped bf16 checkpoint (bench_edit_stream,
random weights, ~5 GB shards), then times, alternating in one run: `shutil.copyfile` of every
file (the floor of a full export) and `export_lora` of the same 14-direction plan the streaming
benchmark uses (scope "all", default roles, the sandwich correction a Llama does not need).
Reports the adapter's bytes against the checkpoint's and the two times as a ratio. Results at
--scale=full replace the section "LoRA export at 8B scale" of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.bench_edit_stream import SCALES, bench_plan, llama_config, write_checkpoint
from bench.report import cpu_name, publish

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "BENCHMARKS.md"
TITLE = "LoRA export at 8B scale"
SHARD_BYTES = 5 * 10**9


def _copy(src: Path, out: Path) -> float:
    t = time.perf_counter()
    out.mkdir()
    for f in src.iterdir():
        shutil.copyfile(f, out / f.name)
        with (out / f.name).open("rb") as handle:
            os.fsync(handle.fileno())
    return time.perf_counter() - t


def main(argv: list[str]) -> None:
    from saber.edit import EditConfig
    from saber.edit.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_lora

    parser = argparse.ArgumentParser(prog="python -m bench lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    config = llama_config(args.scale)
    with tempfile.TemporaryDirectory(prefix="saber-lora-", dir=REPO / "outputs") as tmp:
        src = Path(tmp) / "src"
        write_checkpoint(src, args.scale, SHARD_BYTES)
        plan = bench_plan(config.hidden_size, config.num_hidden_layers)
        copy_s = _copy(src, Path(tmp) / "copy")
        shutil.rmtree(Path(tmp) / "copy")
        t = time.perf_counter()
        out = export_lora(src, Path(tmp) / "adapter", plan, EditConfig())
        lora_s = time.perf_counter() - t
        adapter_bytes = sum(f.stat().st_size for f in out.iterdir())
        weights_bytes = (out / ADAPTER_WEIGHTS).stat().st_size
        rank = json.loads((out / ADAPTER_CONFIG).read_text())["r"]
        modules = len(json.loads((out / ADAPTER_CONFIG).read_text())["target_modules"])
        full_bytes = sum(f.stat().st_size for f in src.iterdir())
    body = "\n".join([
        f"Command: `python -m bench lora --scale={args.scale}`  ",
        f"Machine: {os.cpu_count()}-core {cpu_name()}; date {dt.date.today().isoformat()}; other jobs may share the cores  ",
        f"Checkpoint: synthetic Llama checkpoint, scale {args.scale} ({config.num_hidden_layers} layers, hidden {config.hidden_size}; full = Llama-3-8B), "
        f"bf16, {full_bytes / 1e9:.2f} GB; plan: 14 directions, scope all, default roles",
        "",
        "| output | bytes | share of the full checkpoint | time (s) |",
        "|---|---|---|---|",
        f"| full checkpoint (plain copy, the floor of a full export) | {full_bytes / 1e9:.2f} GB | 1 | {copy_s:.1f} |",
        f"| LoRA adapter (rank {rank}, {modules} modules, float32 factors) | {adapter_bytes / 1e6:.1f} MB "
        f"(weights {weights_bytes / 1e6:.1f} MB) | {adapter_bytes / full_bytes:.4f} | {lora_s:.1f} "
        f"({lora_s / copy_s:.2f}x the copy) |",
        "",
        "The adapter reads only the edited writers (o_proj and down_proj of every layer) and writes the "
        "factors; PEFT's `PeftModel.from_pretrained(base, adapter)` reproduces the full export's logits "
        "(tests/test_lora.py).",
    ])
    publish(TITLE, body, write=not args.no_write, path=DOC)
