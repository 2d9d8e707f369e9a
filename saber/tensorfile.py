"""Safetensors files with deterministic bytes: the same tensors and metadata give the same file.

The safetensors writer stores `__metadata__` from a hash map, so its key order (and the file's
sha256) changes from process to process. `save_tensors` writes with safetensors and then
rewrites the header in place with the metadata keys sorted; the header keeps its length, so the
tensor data and offsets are untouched.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path | str,
                 metadata: Mapping[str, str] | None = None) -> None:
    """save_file with a canonical header (sorted metadata, tensors in data order)."""
    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)
    canonicalise_header(Path(path))


def canonicalise_header(path: Path) -> None:
    """Rewrite a safetensors header in place: metadata keys sorted, tensors by data offset."""
    with path.open("r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        ordered: dict = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
        ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])))
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # cannot happen for a reordering; keep the writer's bytes rather than fail
            return
        f.seek(8)
        f.write(text.ljust(n, b" "))
