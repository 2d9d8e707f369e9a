"""Model identity: the part of an artifact fingerprint that says which weights were used."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def model_identity(path: str) -> str:
    """Identify a local model directory by its config and weight files, or a hub id by name.

    Hashing every weight byte of a 16 GB checkpoint on each run would cost minutes, so a local
    directory is identified by config.json, the shard index and each weight file's name and size;
    replacing weights in place with same-sized files is not detected (use force=true then).
    """
    p = Path(path)
    if not p.is_dir():
        return f"hub:{path}"
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "generation_config.json"):
        f = p / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    for f in sorted(p.iterdir()):
        if f.suffix in _WEIGHT_SUFFIXES:
            h.update(json.dumps([f.name, f.stat().st_size]).encode())
    return f"local:{p.name}:{h.hexdigest()[:32]}"
