"""Model identity cost: sampled weight identity against hashing every byte of the checkpoint.

`python -m bench identity [--scale=full] [--reps=N] [--no-write]`

Writes a synthetic checkpoint (random bytes in safetensors shards: 4 x 4 GiB at --scale=full,
the size of an 8B bf16 model; 2 x 256 MiB otherwise) into a temporary directory, then times
`model_identity` (config, headers, 256 x 64 KiB samples per shard) against a plain sha256 of
every shard, alternating the two, best of N. The files were just written, so both read from the
page cache where it holds them: the ratio compares work, not a cold disk. Results replace the
section "Model identity" of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import struct
import tempfile
import time
from pathlib import Path

from bench.report import cpu_name, publish
from saber.model.identity import SAMPLE_BYTES, SAMPLES_PER_FILE, model_identity

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "BENCHMARKS.md"
TITLE = "Model identity"
BLOCK = 64 << 20  # bytes written per call while building the synthetic shards


def write_shard(path: Path, size: int) -> None:
    """A valid safetensors file holding one uint8 tensor of `size` random-looking bytes."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    block = os.urandom(BLOCK)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        written = 0
        while written < size:
            chunk = block[: min(BLOCK, size - written)]
            f.write(chunk)
            written += len(chunk)
            block = block[1:] + block[:1]  # shift so that no two blocks are equal


def full_sha256(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        with f.open("rb") as handle:
            while chunk := handle.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench identity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=("small", "full"), default="small")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    shards, size = (4, 4 << 30) if args.scale == "full" else (2, 256 << 20)
    with tempfile.TemporaryDirectory(prefix="saber-identity-") as tmp:
        model = Path(tmp) / "model"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "llama"}')
        t0 = time.perf_counter()
        for i in range(shards):
            write_shard(model / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", size)
        write_s = time.perf_counter() - t0
        sampled, full = [], []
        for _ in range(args.reps):
            t = time.perf_counter()
            model_identity(str(model))
            sampled.append(time.perf_counter() - t)
            t = time.perf_counter()
            full_sha256(model)
            full.append(time.perf_counter() - t)
    total = shards * size
    body = "\n".join([
        f"Command: `python -m bench identity --scale={args.scale} --reps={args.reps}`  ",
        f"Machine: {os.cpu_count()}-core {cpu_name()}; date {dt.date.today().isoformat()}  ",
        f"Checkpoint: {shards} safetensors shards, {total / 2**30:.1f} GiB in all (written in {write_s:.0f} s, "
        "so mostly in the page cache)",
        "",
        "| identity | reads per shard | best time (s) | ratio to full sha256 |",
        "|---|---|---|---|",
        f"| `model_identity` (header + {SAMPLES_PER_FILE} x {SAMPLE_BYTES >> 10} KiB samples) | "
        f"{SAMPLES_PER_FILE * SAMPLE_BYTES / 2**20:.0f} MiB | {min(sampled):.3f} | {min(sampled) / min(full):.4f} |",
        f"| sha256 of every byte (baseline) | {size / 2**20:.0f} MiB | {min(full):.2f} | 1 |",
        "",
        "A same-size rewrite of the weights changes the samples (tests/test_identity.py), so cached "
        "artifacts are not reused for other weights; a change confined to the bytes between samples is "
        "not seen (use force=true).",
    ])
    publish(TITLE, body, write=not args.no_write, path=DOC)
