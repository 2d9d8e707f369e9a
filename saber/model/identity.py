"""Model identity: the part of an artifact fingerprint that says which weights were used."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
SAMPLES_PER_FILE = 256  # evenly spaced content samples per weight file, count
SAMPLE_BYTES = 1 << 16  # bytes read per sample (64 KiB): 16 MiB per file


def model_identity(path: str) -> str:
    """Identify a local model directory by its config, its weight headers and sampled weight bytes.

    Hashing every byte of a 16 GB checkpoint on each run would cost a minute, so each weight file
    contributes its name, size, safetensors header (names, dtypes, shapes, offsets) and
    SAMPLES_PER_FILE evenly spaced 64 KiB samples of its content. Rewriting the weights in place,
    even with same-sized files (an edited copy over the original), changes the samples and so the
    identity; file times are not used, so a copied model keeps its identity on another machine.
    A change confined to bytes between the samples is not detected (use force=true then).
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
        if f.suffix in _WEIGHT_SUFFIXES and f.is_file():
            h.update(json.dumps([f.name, f.stat().st_size]).encode())
            h.update(weight_file_digest(f))
    return f"local:{p.name}:{h.hexdigest()[:32]}"


def weight_file_digest(path: Path) -> bytes:
    """sha256 of a weight file's safetensors header (if any) and its evenly spaced content samples."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len <= size:
                h.update(f.read(header_len))
        if size <= SAMPLES_PER_FILE * SAMPLE_BYTES:
            f.seek(0)
            h.update(f.read())
        else:
            step = (size - SAMPLE_BYTES) // (SAMPLES_PER_FILE - 1)
            for i in range(SAMPLES_PER_FILE):
                f.seek(i * step)
                h.update(f.read(SAMPLE_BYTES))
    return h.digest()
