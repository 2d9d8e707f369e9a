"""Capability entanglement of refusal directions, edit strengths, and the edit plan.

C_l holds the top-m principal directions (right singular vectors of the centred capability
activations at layer l). For a unit direction v:

- rho(v) = ||C_l^T v||^2 in [0, 1]: the share of v lying in the capability subspace;
- rho_var(v) = v^T S v / lambda_max(S) in [0, 1], S the capability covariance: how much
  capability variance v carries, relative to the most variable capability direction;
- purity = 1 - rho; v is "entangled" when rho > tau, else "refusal". tau null (the default) is
  calibrated: a quantile of rho over the directions with no refusal signal (null_tau).

Strength modes (entangle.mode), every value from config, then scaled by
iterate.alpha_decay ** iteration:

- discrete: alpha_base for refusal directions, alpha_entangled for entangled ones;
- ramp: alpha_base at rho <= ramp_low, alpha_entangled at rho >= ramp_high, linear between;
- split: an entangled v becomes two plan rows, the pure part normalise(v - C C^T v) at
  alpha_base and the entangled part normalise(C C^T v) at alpha_entangled (orthogonal, so the two
  edits commute); refusal directions get one row at alpha_base. The table's alpha is then the
  effective strength along v, alpha_base (1 - rho) + alpha_entangled rho;
- uniform: alpha_base everywhere (entanglement ignored; the ablation baseline);
- kernel: a tent over relative depth x = layer / (L - 1): peak_weight at peak_position, falling
  linearly to min_weight at `distance` away and staying there beyond.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import numpy as np
import pandas as pd
import torch

from saber.directions import ActivationError, check_activations
from saber.ranking import relative_depth

if TYPE_CHECKING:
    from saber.collect import Activations
    from saber.config import EntangleConfig, KernelConfig

log = logging.getLogger("saber.entangle")
ENTANGLEMENT_TABLE = "entanglement.parquet"
CAPABILITY_FILE = "capability.safetensors"  # every layer's C_l, written by rank and read by entangle
PLAN_COLUMNS = ["layer", "index", "position", "rank", "alpha", "vector_key", "rho", "class", "fdr", "part"]
_TABLE_TYPES = {"layer": "int64", "index": "int64", "position": "int64", "rho": "float64", "rho_var": "float64",
                "purity": "float64", "class": "str", "alpha": "float64", "fdr": "float64", "rank": "int64",
                "benefit": "float64", "cost": "float64"}
_PLAN_TYPES = {"layer": "int64", "index": "int64", "position": "int64", "rank": "int64", "alpha": "float64", "vector_key": "str",
               "rho": "float64", "class": "str", "fdr": "float64", "part": "str"}
_MIN_PART = 1e-6  # a split part with squared norm below this is dropped (nothing to edit)


@dataclass
class CapabilitySubspace:
    """Principal directions of one layer's centred capability activations."""

    layer: int
    basis: torch.Tensor  # [m, d] float64, the top-m right singular vectors (rows of C^T)
    directions: torch.Tensor  # [r, d] float64, every right singular vector with nonzero variance
    variances: torch.Tensor  # [r] float64, capability variance along each (descending)

    def rho(self, v: torch.Tensor) -> float:
        """||C^T v||^2 for a unit v."""
        return float(((self.basis @ _unit64(v)) ** 2).sum())

    def rho_var(self, v: torch.Tensor) -> float:
        """v^T S v / lambda_max(S) for a unit v."""
        along = self.directions @ _unit64(v)
        return float((self.variances * along**2).sum() / self.variances[0])

    def entangled_part(self, v: torch.Tensor) -> torch.Tensor:
        """C C^T v (float64)."""
        return self.basis.T @ (self.basis @ _unit64(v))


def _unit64(v: torch.Tensor) -> torch.Tensor:
    v = v.detach().to(torch.float64)
    return v / torch.linalg.vector_norm(v)


def capability_subspace(x: torch.Tensor, m: int, *, layer: int = -1,
                        split: str = "fit") -> CapabilitySubspace:
    """Top-m principal directions of capability activations x [n, d] (centred on their mean)."""
    x = check_activations(x, layer=layer, kind="capability", split=split, min_rows=m + 1)
    centred = x - x.mean(0)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    keep = s > 1e-10 * s[0] if s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    rank = int(keep.sum())
    if rank == 0:
        raise ActivationError(f"layer {layer}, kind 'capability', split '{split}': the capability "
                              "activations are all the same (constant or duplicated prompts); add "
                              "varied capability prompts")
    if rank < m:
        # Early layers can map prompts that end alike to identical last-token states: the
        # subspace is then all the capability variance there is.
        log.warning("layer %d: the centred capability activations (%s split) have rank %d < entangle.m = %d; "
                    "that layer's capability subspace has %d directions", layer, split, rank, m, rank)
    variances = s[keep] ** 2 / (x.shape[0] - 1)
    return CapabilitySubspace(layer=layer, basis=vt[:min(m, rank)], directions=vt[keep], variances=variances)


def classify(rho: float, tau: float) -> str:
    """'entangled' when rho > tau, else 'refusal'."""
    return "entangled" if rho > tau else "refusal"


def kernel_weight(depth: float, kernel: "KernelConfig") -> float:
    """Tent over relative depth: peak_weight at peak_position, min_weight at >= distance away."""
    t = max(0.0, 1.0 - abs(depth - kernel.peak_position) / kernel.distance)
    return kernel.min_weight + (kernel.peak_weight - kernel.min_weight) * t


# The entangle strength knobs each mode reads (tau also labels the table's `class` column in every mode).
STRENGTH_KNOBS_BY_MODE = {
    "discrete": {"alpha_base", "alpha_entangled", "tau", "tau_quantile"},
    "ramp": {"alpha_base", "alpha_entangled", "ramp_low", "ramp_high"},
    "split": {"alpha_base", "alpha_entangled", "tau", "tau_quantile"},
    "uniform": {"alpha_base"},
    "kernel": {"kernel"},
    "measured": {"alpha_base", "cost_weight"},
}


def unused_strength_knobs(mode: str, calibrate: bool) -> dict[str, str]:
    """The entangle strength knobs (key below `entangle.` -> why) that cannot change the edit."""
    known = set().union(*STRENGTH_KNOBS_BY_MODE.values())
    unused = {k: f"entangle.mode={mode} does not read it" for k in known - STRENGTH_KNOBS_BY_MODE.get(mode, known)}
    if calibrate and mode in ("measured", "uniform"):
        unused["alpha_base"] = ("with entangle.calibrate=true it is a common factor of every strength, which the "
                                "calibration's full-strength screen and relative scale cancel")
    return unused


def strength(rho: float, depth: float, cfg: "EntangleConfig") -> float:
    """Edit strength of a whole direction before iteration decay (split: effective along v)."""
    if cfg.mode == "uniform":
        return cfg.alpha_base
    if cfg.mode == "kernel":
        return kernel_weight(depth, cfg.kernel)
    if cfg.mode == "discrete":
        return cfg.alpha_entangled if rho > cfg.tau else cfg.alpha_base
    if cfg.mode == "ramp":
        t = min(max((rho - cfg.ramp_low) / (cfg.ramp_high - cfg.ramp_low), 0.0), 1.0)
        return cfg.alpha_base + (cfg.alpha_entangled - cfg.alpha_base) * t
    if cfg.mode == "split":
        if rho > cfg.tau:
            return cfg.alpha_base * (1.0 - rho) + cfg.alpha_entangled * rho
        return cfg.alpha_base
    if cfg.mode == "measured":
        raise ValueError("entangle.mode = measured takes its strengths from measured effects "
                         "(saber.measured); pass them to entanglement_table")
    raise ValueError(f"entangle.mode = {cfg.mode!r}; use discrete, ramp, split, kernel, uniform or measured")


def entanglement_table(selected: pd.DataFrame, bases: Mapping[int, torch.Tensor],
                       subspaces: Mapping[int, CapabilitySubspace], cfg: "EntangleConfig",
                       n_layers: int, decay: float = 1.0,
                       effects: Optional[Mapping[tuple[int, int], tuple[float, float]]] = None) -> pd.DataFrame:
    """rho, rho_var, purity, class and alpha for each (layer, index) row of `selected`.

    `selected` needs columns layer, index (fdr, rank and position are carried along when present);
    `decay` is iterate.alpha_decay ** iteration. With mode = measured, `effects[(layer, index)]`
    = (benefit, cost) sets alpha (saber.measured.measured_strength); rho stays for the report.
    """
    from saber.measured import measured_strength

    if cfg.tau is None:
        raise ValueError("entangle.tau is null (calibrated): resolve it with saber.entangle.null_tau first")
    rows = []
    for rec in selected.itertuples(index=False):
        layer, index = int(rec.layer), int(rec.index)
        if layer not in subspaces:
            raise ActivationError(f"layer {layer}: no capability subspace (capability activations "
                                  "missing for this layer)")
        v = bases[layer][index]
        sub = subspaces[layer]
        rho = sub.rho(v)
        depth = float(relative_depth(layer, n_layers))
        benefit, cost = (effects or {}).get((layer, index), (np.nan, np.nan))
        if cfg.mode == "measured":
            if effects is None or (layer, index) not in effects:
                raise ValueError(f"entangle.mode = measured: no measured effect for layer {layer} direction {index}")
            alpha = measured_strength(benefit, cost, cfg.alpha_base, cfg.cost_weight)
        else:
            alpha = strength(rho, depth, cfg)
        rows.append({
            "layer": layer, "index": index, "position": int(getattr(rec, "position", -1)),
            "rho": rho, "rho_var": sub.rho_var(v),
            "purity": 1.0 - rho, "class": classify(rho, cfg.tau),
            "alpha": alpha * decay,
            "fdr": float(getattr(rec, "fdr", np.nan)),
            "rank": int(getattr(rec, "rank", len(rows) + 1)),
            "benefit": float(benefit), "cost": float(cost),
        })
    return pd.DataFrame(rows, columns=["layer", "index", "position", "rho", "rho_var", "purity", "class",
                                       "alpha", "fdr", "rank", "benefit", "cost"]).astype(_TABLE_TYPES)


def plan_rows(table: pd.DataFrame, bases: Mapping[int, torch.Tensor],
              subspaces: Mapping[int, CapabilitySubspace], cfg: "EntangleConfig",
              decay: float = 1.0) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """The edit plan: one row per vector to remove, and the vectors (float32 [d]) by key.

    Plan rank is the order of application (1 first): ranking order, and within a split
    direction the pure part before the entangled part.
    """
    rows: list[dict[str, object]] = []
    vectors: dict[str, torch.Tensor] = {}
    for rec in table.sort_values(["rank", "layer", "index"]).to_dict("records"):
        layer, index = int(rec["layer"]), int(rec["index"])
        v = _unit64(bases[layer][index])
        key = f"layer{layer}.dir{index}"
        common = {"layer": layer, "index": index, "position": int(rec.get("position", -1)),
                  "rho": float(rec["rho"]), "class": rec["class"],
                  "fdr": float(rec["fdr"])}
        if cfg.mode == "split" and rec["class"] == "entangled":
            ent = subspaces[layer].entangled_part(v)
            for part, vec, alpha in (("pure", v - ent, cfg.alpha_base),
                                     ("entangled", ent, cfg.alpha_entangled)):
                if float(vec @ vec) < _MIN_PART:
                    log.info("layer %d direction %d: %s part is empty, not edited", layer, index, part)
                    continue
                vectors[f"{key}.{part}"] = (vec / torch.linalg.vector_norm(vec)).float()
                rows.append({**common, "alpha": alpha * decay, "vector_key": f"{key}.{part}", "part": part})
        else:
            vectors[key] = v.float()
            rows.append({**common, "alpha": float(rec["alpha"]), "vector_key": key, "part": "full"})
    for i, row in enumerate(rows):
        row["rank"] = i + 1
    return pd.DataFrame(rows, columns=PLAN_COLUMNS).astype(_PLAN_TYPES), vectors


def save_plan_files(plan: pd.DataFrame, vectors: Mapping[str, torch.Tensor], out_dir: Path,
                    deltas: Optional[Callable[[Any], dict]] = None) -> None:
    """Write plan.parquet and plan.safetensors (vector_key -> float32 [d]) for the edit stage.

    The edit library's `save_plan` writes the columns edit reads; the table is then rewritten
    with the report columns (rho, class, fdr, part) added, which `load_plan` carries along.
    `deltas(plan)`, for edit.method=lsq, gives the least-squares factors saved beside the plan.
    """
    from saber.edit.plan import PLAN_TABLE, EditPlan, PlanRow, save_plan

    rows = [PlanRow(layer=int(r["layer"]), index=int(r["index"]), rank=int(r["rank"]),
                    alpha=float(r["alpha"]), vector_key=str(r["vector_key"]))
            for r in plan.to_dict("records")]
    edit_plan = EditPlan(rows=rows, vectors=dict(vectors))
    if deltas is not None:
        edit_plan.deltas = deltas(edit_plan)
    save_plan(edit_plan, Path(out_dir))
    plan[PLAN_COLUMNS].to_parquet(Path(out_dir) / PLAN_TABLE, index=False)


def null_tau(ranking: pd.DataFrame, bases: Mapping[int, torch.Tensor],
             subspaces: Mapping[int, CapabilitySubspace], quantile: float) -> Optional[float]:
    """The `quantile` of rho over the ranked directions that carry no refusal signal.

    Those are the pairs that do not beat their permutation null (`significant` False in the
    ranking). Data-derived directions lie in the capability subspace far more than random ones
    (on the organism their median rho is about 0.75), so a fixed tau below that null marks
    nearly every direction entangled. None when fewer than 3 such pairs have a subspace.
    """
    null = ranking[~ranking["significant"].astype(bool)] if "significant" in ranking else ranking.iloc[0:0]
    rhos = [subspaces[int(r.layer)].rho(bases[int(r.layer)][int(r.index)])
            for r in null.itertuples(index=False) if int(r.layer) in subspaces]
    return float(np.quantile(rhos, quantile)) if len(rhos) >= 3 else None


def capability_subspaces(acts: "Activations", layers: list[int], m: int,
                         split: str = "fit") -> dict[int, CapabilitySubspace]:
    """C_l for each layer from the capability activations of `split`."""
    return {l: capability_subspace(acts.get(l, "capability", split), m, layer=l, split=split)
            for l in layers}


def save_capability_subspaces(subspaces: Mapping[int, CapabilitySubspace], out_dir: Path) -> None:
    """Write every layer's subspace (float64) to CAPABILITY_FILE, so that later stages reuse it."""
    from saber.tensorfile import save_tensors

    tensors = {}
    for layer, sub in subspaces.items():
        for name in ("basis", "directions", "variances"):
            tensors[f"layer{layer}.{name}"] = getattr(sub, name).to(torch.float64).contiguous()
    save_tensors(tensors, Path(out_dir) / CAPABILITY_FILE)


def load_capability_subspaces(art_dir: Path) -> dict[int, CapabilitySubspace]:
    """The subspaces save_capability_subspaces wrote; names the file when it is missing."""
    from safetensors.torch import load_file

    path = Path(art_dir) / CAPABILITY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the rank artifact predates it; rerun rank with force=true")
    tensors = load_file(str(path))
    layers = sorted({int(key.split(".")[0][len("layer"):]) for key in tensors})
    return {l: CapabilitySubspace(layer=l, basis=tensors[f"layer{l}.basis"], directions=tensors[f"layer{l}.directions"],
                                  variances=tensors[f"layer{l}.variances"]) for l in layers}


def purity_of(scores: pd.DataFrame, bases: Mapping[int, torch.Tensor],
              subspaces: Mapping[int, CapabilitySubspace]) -> pd.Series:
    """1 - rho for each (layer, index) row of `scores` (used by rank.score = fdr_purity)."""
    return pd.Series([1.0 - subspaces[int(r["layer"])].rho(bases[int(r["layer"])][int(r["index"])])
                      for r in scores.to_dict("records")], index=scores.index, dtype="float64")
