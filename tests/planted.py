"""Synthetic Gaussian activations with planted answers, for the analysis-stage tests.

Harmless: mu_a + noise. Harmful: mu_a + U z + noise, z ~ N(shift, diag(spread^2)), U a random
orthonormal d x k basis (the planted refusal subspace). Capability: mu_c + Q w + noise,
w ~ N(0, diag(cap_scale^2)), Q a d x m basis orthogonal to U (the planted capability subspace).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch


@dataclass
class Planted:
    u: torch.Tensor  # [d, k] refusal basis
    q: torch.Tensor  # [d, m] capability basis
    mu_a: torch.Tensor  # [d]


def orthonormal(d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A random d x k matrix with orthonormal columns (float64)."""
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return q


def make_planted(d: int = 64, k: int = 4, m: int = 6, seed: int = 0) -> Planted:
    gen = torch.Generator().manual_seed(seed)
    basis = orthonormal(d, k + m, gen)
    mu_a = 3.0 * orthonormal(d, 1, gen)[:, 0]
    return Planted(u=basis[:, :k], q=basis[:, k:], mu_a=mu_a)


def harmful_harmless(p: Planted, n_h: int, n_a: int, *, seed: int, noise: float = 1.0,
                     shift: Sequence[float] = (3.0, 2.0, 1.5, 1.0),
                     spread: Sequence[float] = (8.0, 7.0, 6.0, 5.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 harmful [n_h, d] and harmless [n_a, d] rows."""
    gen = torch.Generator().manual_seed(seed)
    d, k = p.u.shape
    z = torch.tensor(shift[:k], dtype=torch.float64) + torch.tensor(spread[:k], dtype=torch.float64) * \
        torch.randn(n_h, k, generator=gen, dtype=torch.float64)
    h = p.mu_a + z @ p.u.T + noise * torch.randn(n_h, d, generator=gen, dtype=torch.float64)
    a = p.mu_a + noise * torch.randn(n_a, d, generator=gen, dtype=torch.float64)
    return h.float(), a.float()


def capability(p: Planted, n: int, *, seed: int, noise: float = 0.05,
               scale: Sequence[float] | None = None) -> torch.Tensor:
    """Float32 capability rows [n, d] spread over the planted capability subspace."""
    gen = torch.Generator().manual_seed(seed)
    d, m = p.q.shape
    s = torch.tensor(scale if scale is not None else np.linspace(5.0, 2.0, m), dtype=torch.float64)
    w = s * torch.randn(n, m, generator=gen, dtype=torch.float64)
    return (2.0 * p.mu_a + w @ p.q.T + noise * torch.randn(n, d, generator=gen, dtype=torch.float64)).float()


def write_collect_artifact(out: Path, layers: dict[int, dict[str, dict[str, torch.Tensor]]]) -> None:
    """Write a collect artifact (prompts.parquet + activations.safetensors) with collect's writer.

    layers[l][kind][split] = [n, d] for l = 0..L-1; every layer has the same rows per (kind, split).
    """
    from saber.collect import save_activations

    first = layers[0]
    rows = []
    for kind in first:
        for split in ("fit", "heldout"):
            for _ in range(first[kind][split].shape[0]):
                rows.append({"id": len(rows), "kind": kind, "split": split,
                             "text": f"{kind} prompt {len(rows)}", "n_tokens": 8})
    acts = {kind: torch.stack([torch.cat([layers[l][kind]["fit"], layers[l][kind]["heldout"]])
                               for l in sorted(layers)])[:, :, None, :]
            for kind in first}
    save_activations(out, acts, pd.DataFrame(rows))
