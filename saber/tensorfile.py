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


def read_header(path: Path) -> tuple[int, dict]:
    """(header length in bytes, header dict) of a safetensors file; ValueError when it is malformed.

    Checks that the header fits in the file and that every tensor's data lies inside it, so a
    truncated file is caught here instead of deep inside a loader.
    """
    size = Path(path).stat().st_size
    with Path(path).open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ValueError(f"the file has {size} bytes, less than a safetensors header")
        (n,) = struct.unpack("<Q", raw_len)
        if n > size - 8:
            raise ValueError(f"header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"unreadable header ({exc})") from exc
    if 8 + n + end > size:
        raise ValueError(f"tensors need {8 + n + end} bytes but the file has {size} (truncated)")
    return n, header


def canonicalise_header(path: Path) -> None:
    """Rewrite a safetensors header in place: metadata keys sorted, tensors by data offset."""
    n, header = read_header(path)
    with path.open("r+b") as f:
        meta = header.pop("__metadata__", None)
        ordered: dict = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
        ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])))
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # cannot happen for a reordering; keep the writer's bytes rather than fail
            return
        f.seek(8)
        f.write(text.ljust(n, b" "))
