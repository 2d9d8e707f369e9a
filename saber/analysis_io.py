"""Read a collect artifact the way the analysis stages (extract, rank, entangle) need it.

`saber.collect.load_activations(dir)` is the reader; this module only adds what the analysis
stages share: the layer list, the model depth, and per-layer (kind, split) matrices.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import torch

_KEY = re.compile(r"^layer(\d+)\.(\w+)$")


class ActivationReader(Protocol):
    def get(self, layer: int, kind: str, split: str) -> torch.Tensor: ...


class CollectedActivations:
    """Per-layer activations of one collect artifact: `get(layer, kind, split) -> [n, d]`."""

    def __init__(self, art_dir: Path) -> None:
        from safetensors import safe_open

        self.path = Path(art_dir)
        self.reader = _reader(self.path)
        with safe_open(str(self.path / "activations.safetensors"), framework="pt") as fh:
            keys = list(fh.keys())
        found = sorted({int(m.group(1)) for m in map(_KEY.match, keys) if m})
        if not found:
            raise ValueError(f"{self.path / 'activations.safetensors'} holds no 'layer{{l}}.{{kind}}' "
                             "tensors; rerun collect with force=true")
        self.layers: list[int] = found
        self.kinds = sorted({m.group(2) for m in map(_KEY.match, keys) if m})
        # Collect captures every decoder layer, so depth is the largest index + 1.
        self.n_layers: int = int(getattr(self.reader, "n_layers", found[-1] + 1))

    def get(self, layer: int, kind: str, split: str) -> torch.Tensor:
        if kind not in self.kinds:
            raise KeyError(f"collect artifact {self.path} has no '{kind}' activations (it has "
                           f"{', '.join(self.kinds)}); add that prompt set under data/ and rerun collect")
        return self.reader.get(layer, kind, split)


def _reader(art_dir: Path) -> ActivationReader:
    try:
        from saber.collect import load_activations
    except ImportError:
        return _LayoutReader(art_dir)
    return load_activations(art_dir)


class _LayoutReader:
    """Reads the documented layout directly (docs/ARCHITECTURE.md, 'Activations layout')."""

    def __init__(self, art_dir: Path) -> None:
        import pandas as pd

        self.prompts = pd.read_parquet(Path(art_dir) / "prompts.parquet")
        self.file = Path(art_dir) / "activations.safetensors"

    def get(self, layer: int, kind: str, split: str) -> torch.Tensor:
        from safetensors import safe_open

        rows = self.prompts[self.prompts["kind"] == kind].reset_index(drop=True)
        mask = torch.from_numpy((rows["split"] == split).to_numpy())
        with safe_open(str(self.file), framework="pt") as fh:
            x = fh.get_tensor(f"layer{layer}.{kind}")
        if x.shape[0] != len(rows):
            raise ValueError(f"{self.file}: layer{layer}.{kind} has {x.shape[0]} rows but "
                             f"prompts.parquet lists {len(rows)} {kind} prompts; rerun collect with force=true")
        x = x[mask]
        return x[:, -1, :] if x.ndim == 3 else x
