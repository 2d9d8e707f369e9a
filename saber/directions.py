"""Candidate refusal directions per layer, from harmful (H) and harmless (A) activations.

Methods (DESIGN section 3):

- `svd`: top-k right singular vectors of D = H - mean(A). Centring on the harmless mean (not
  on the harmful mean, and never by pairing H_i with an arbitrary A_i) keeps the shared offset
  mean(H) - mean(A) inside D, so the first direction is close to the classic mean difference
  and the later ones add the harmful spread around it.
- `mean_diff`: normalise(mean(H) - mean(A)), one direction.
- `lda`: Fisher's discriminant (scikit-learn, shrunk covariance), one direction.

`projected` removes the component along the normalised harmless mean first; for `svd` it is
removed from every row of D before the SVD, so the basis stays orthonormal.

Every direction is oriented so that mean(H.v) > mean(A.v). For every method the recorded
"singular value" of v is ||D v|| and its energy share is ||D v||^2 / ||D||_F^2 (for `svd` these
are the singular values of D and their shares of the total energy). Statistics are float64;
the stored basis is float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from saber.tensorfile import save_tensors

if TYPE_CHECKING:
    from saber.config import ExtractConfig

DIRECTIONS_FILE = "directions.safetensors"
DIRECTIONS_TABLE = "directions.parquet"
_RANK_TOL = 1e-10  # singular values below this fraction of the largest count as zero


class ActivationError(ValueError):
    """Activations unusable for a statistic; the message names the layer, kind and split."""


@dataclass
class LayerDirections:
    """The k directions of one layer and how much of D each explains."""

    layer: int
    basis: torch.Tensor  # [k, d] float32, rows orthonormal within each position
    singular_values: torch.Tensor  # [k] float32, ||D v||
    energy_share: torch.Tensor  # [k] float32, ||D v||^2 / ||D||_F^2
    mean_proj_harmful: torch.Tensor  # [k] float32, mean(H.v) on the fit split
    mean_proj_harmless: torch.Tensor  # [k] float32, mean(A.v) on the fit split
    positions: torch.Tensor | None = None  # [k] int64, the position each row was found at (None: all -1)

    def __post_init__(self) -> None:
        if self.positions is None:
            self.positions = torch.full((self.k,), -1, dtype=torch.long)

    @property
    def k(self) -> int:
        return int(self.basis.shape[0])


def join_positions(parts: Mapping[int, LayerDirections]) -> LayerDirections:
    """One layer's directions from several positions, stacked in position order into one basis.

    Rows found at different positions need not be orthogonal; the edit orthonormalises the rows
    it uses in rank order (saber.edit.targets.target_directions).
    """
    labels = sorted(parts)
    first = parts[labels[0]]

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(parts[p], name) for p in labels])

    return LayerDirections(
        layer=first.layer, basis=cat("basis"), singular_values=cat("singular_values"),
        energy_share=cat("energy_share"), mean_proj_harmful=cat("mean_proj_harmful"),
        mean_proj_harmless=cat("mean_proj_harmless"),
        positions=torch.cat([torch.full((parts[p].k,), p, dtype=torch.long) for p in labels]))


def check_activations(x: torch.Tensor, *, layer: int, kind: str, split: str,
                      min_rows: int = 1) -> torch.Tensor:
    """Validate one activation matrix and return it as float64 [n, d].

    Non-finite values or too few rows would otherwise surface as NaN directions or NaN scores
    far downstream; this says where they came from.
    """
    where = f"layer {layer}, kind '{kind}', split '{split}'"
    if x.ndim != 2:
        raise ActivationError(f"{where}: expected activations of shape [n, d], got {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ActivationError(f"{where}: {x.shape[0]} prompts, need at least {min_rows}; "
                              "add prompts to this set or lower the count that needs them")
    x = x.detach().to(torch.float64)
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=1)).flatten().tolist()
        raise ActivationError(f"{where}: {int(bad.sum())} NaN or Inf values in prompt rows "
                              f"{rows[:10]}; the model overflowed (try model.dtype=float32) or the "
                              "collect artifact is corrupt (rerun collect with force=true)")
    return x


def _check_not_constant(h: torch.Tensor, a: torch.Tensor, layer: int, split: str) -> None:
    both = torch.cat([h, a])
    if bool((both == both[0]).all()):
        raise ActivationError(f"layer {layer}, split '{split}': harmful and harmless activations "
                              "are all identical (constant); this layer carries no signal, so no "
                              "direction can be extracted from it")


def _orient(basis: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Flip rows so harmful projects higher than harmless on average."""
    gap = (h.mean(0) - a.mean(0)) @ basis.T
    sign = torch.where(gap < 0, -1.0, 1.0).to(basis.dtype)
    return basis * sign[:, None]


def _unit(v: torch.Tensor, what: str, layer: int, split: str) -> torch.Tensor:
    norm = torch.linalg.vector_norm(v)
    if not torch.isfinite(norm) or norm <= 1e-12:
        raise ActivationError(f"layer {layer}, split '{split}': {what} is zero, so it has no "
                              "direction; harmful and harmless activations do not differ here")
    return v / norm


def svd_directions(h: torch.Tensor, a: torch.Tensor, k: int, *, projected: bool = False,
                   layer: int = -1, split: str = "fit") -> torch.Tensor:
    """Top-k right singular vectors of D = H - mean(A) as float64 rows [k, d] (unoriented)."""
    if h.shape[0] < k:
        raise ActivationError(f"layer {layer}, split '{split}': {h.shape[0]} harmful prompts but "
                              f"extract.k = {k} directions; D = H - mean(A) has rank at most the "
                              "number of harmful prompts. Lower extract.k or add harmful prompts")
    d = h - a.mean(0)
    if projected:
        m = _unit(a.mean(0), "the harmless mean", layer, split)
        d = d - (d @ m)[:, None] * m[None, :]
    _, s, vt = torch.linalg.svd(d, full_matrices=False)
    if s[0] <= 0 or s[k - 1] <= _RANK_TOL * s[0]:
        rank = int((s > _RANK_TOL * s[0]).sum()) if s[0] > 0 else 0
        raise ActivationError(f"layer {layer}, split '{split}': D = H - mean(A) has rank {rank} "
                              f"< extract.k = {k}; the harmful activations are (nearly) constant "
                              "or degenerate here. Lower extract.k or check the collect artifact")
    return vt[:k]


def mean_diff_direction(h: torch.Tensor, a: torch.Tensor, *, projected: bool = False,
                        layer: int = -1, split: str = "fit") -> torch.Tensor:
    """normalise(mean(H) - mean(A)) as float64 [1, d]."""
    r = h.mean(0) - a.mean(0)
    if projected:
        m = _unit(a.mean(0), "the harmless mean", layer, split)
        r = r - (r @ m) * m
    return _unit(r, "mean(H) - mean(A)", layer, split)[None, :]


def lda_direction(h: torch.Tensor, a: torch.Tensor, *, shrinkage: Optional[float] = None,
                  solver: str = "lsqr", projected: bool = False, layer: int = -1,
                  split: str = "fit") -> torch.Tensor:
    """Fisher discriminant w = S^-1 (mean(H) - mean(A)) with a shrunk covariance, float64 [1, d].

    Shrinkage (Ledoit-Wolf when None) keeps S invertible when d exceeds the number of prompts,
    which is the usual case for residual streams.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    if h.shape[0] < 2 or a.shape[0] < 2:
        raise ActivationError(f"layer {layer}, split '{split}': LDA needs at least 2 harmful and 2 "
                              f"harmless prompts, got {h.shape[0]} and {a.shape[0]}")
    x = torch.cat([h, a]).numpy()
    y = np.r_[np.ones(h.shape[0]), np.zeros(a.shape[0])]
    lda = LinearDiscriminantAnalysis(solver=solver, shrinkage="auto" if shrinkage is None else shrinkage)
    lda.fit(x, y)
    w = torch.from_numpy(np.asarray(lda.coef_[0], dtype=np.float64))
    if projected:
        m = _unit(a.mean(0), "the harmless mean", layer, split)
        w = w - (w @ m) * m
    return _unit(w, "the LDA discriminant", layer, split)[None, :]


def extract_layer(h: torch.Tensor, a: torch.Tensor, cfg: "ExtractConfig", *, layer: int = -1,
                  split: str = "fit") -> LayerDirections:
    """Directions of one layer from its fit-split harmful [n_h, d] and harmless [n_a, d] rows."""
    h = check_activations(h, layer=layer, kind="harmful", split=split)
    a = check_activations(a, layer=layer, kind="harmless", split=split)
    if h.shape[1] != a.shape[1]:
        raise ActivationError(f"layer {layer}, split '{split}': harmful width {h.shape[1]} != "
                              f"harmless width {a.shape[1]}")
    _check_not_constant(h, a, layer, split)
    if cfg.method == "svd":
        basis = svd_directions(h, a, cfg.k, projected=cfg.projected, layer=layer, split=split)
    elif cfg.method == "mean_diff":
        basis = mean_diff_direction(h, a, projected=cfg.projected, layer=layer, split=split)
    elif cfg.method == "lda":
        basis = lda_direction(h, a, shrinkage=cfg.lda_shrinkage, solver=cfg.lda_solver,
                              projected=cfg.projected, layer=layer, split=split)
    else:
        raise ValueError(f"extract.method = {cfg.method!r}; use svd, mean_diff or lda")
    basis = _orient(basis, h, a)
    d = h - a.mean(0)
    along = d @ basis.T  # [n_h, k]
    sv = torch.linalg.vector_norm(along, dim=0)
    energy = sv**2 / (d**2).sum()
    return LayerDirections(
        layer=layer,
        basis=basis.float(),
        singular_values=sv.float(),
        energy_share=energy.float(),
        mean_proj_harmful=(h @ basis.T).mean(0).float(),
        mean_proj_harmless=(a @ basis.T).mean(0).float(),
    )


def directions_frame(layers: Mapping[int, LayerDirections]) -> pd.DataFrame:
    """One row per (layer, index): the directions.parquet table."""
    rows = []
    for layer in sorted(layers):
        ld = layers[layer]
        for i in range(ld.k):
            rows.append({
                "layer": layer, "index": i, "position": int(ld.positions[i]),
                "singular_value": float(ld.singular_values[i]),
                "energy_share": float(ld.energy_share[i]),
                "mean_proj_harmful": float(ld.mean_proj_harmful[i]),
                "mean_proj_harmless": float(ld.mean_proj_harmless[i]),
            })
    return pd.DataFrame(rows, columns=["layer", "index", "position", "singular_value", "energy_share",
                                       "mean_proj_harmful", "mean_proj_harmless"])


def save_directions(layers: Mapping[int, LayerDirections], out_dir: Path) -> None:
    """Write directions.safetensors and directions.parquet."""
    tensors: dict[str, torch.Tensor] = {}
    for layer, ld in layers.items():
        tensors[f"layer{layer}.basis"] = ld.basis.contiguous()
        tensors[f"layer{layer}.singular_values"] = ld.singular_values.contiguous()
    save_tensors(tensors, Path(out_dir) / DIRECTIONS_FILE)
    directions_frame(layers).to_parquet(Path(out_dir) / DIRECTIONS_TABLE, index=False)


def load_directions(art_dir: Path) -> dict[int, LayerDirections]:
    """Read what `save_directions` wrote, keyed by layer."""
    art_dir = Path(art_dir)
    tensors = load_file(str(art_dir / DIRECTIONS_FILE))
    table = pd.read_parquet(art_dir / DIRECTIONS_TABLE)
    out: dict[int, LayerDirections] = {}
    for layer, rows in table.groupby("layer"):
        rows = rows.sort_values("index")
        key = f"layer{int(layer)}.basis"
        if key not in tensors:
            raise KeyError(f"{art_dir / DIRECTIONS_FILE} has no tensor {key!r} although "
                           f"{DIRECTIONS_TABLE} lists layer {layer}; rerun extract with force=true")

        def col(name: str) -> torch.Tensor:
            return torch.tensor(rows[name].to_numpy(), dtype=torch.float32)

        out[int(layer)] = LayerDirections(
            layer=int(layer), basis=tensors[key],
            singular_values=tensors[f"layer{int(layer)}.singular_values"],
            energy_share=col("energy_share"), mean_proj_harmful=col("mean_proj_harmful"),
            mean_proj_harmless=col("mean_proj_harmless"),
            positions=(torch.tensor(rows["position"].to_numpy(), dtype=torch.long) if "position" in rows
                       else None))
    return out
