"""The edit plan: which residual directions to remove, found where, with which strength.

On disk: `plan.parquet` (one row per direction: layer, index, rank, alpha, vector_key; other
columns are carried along and ignored here) and `plan.safetensors` (vector_key -> float32 [d]).
A least-squares plan (edit.method=lsq, saber.edit.lsq) also has `lsq.safetensors`: per writer
weight the factors of its update, W' = W - left @ right in the residual-first layout; such a
plan edits exactly those weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

PLAN_TABLE = "plan.parquet"
PLAN_TENSORS = "plan.safetensors"
PLAN_DELTAS = "lsq.safetensors"
_COLUMNS = ("layer", "index", "rank", "alpha", "vector_key")


@dataclass(frozen=True)
class PlanRow:
    """Direction `index` of source layer `layer`, applied in `rank` order with strength `alpha`."""

    layer: int
    index: int
    rank: int
    alpha: float
    vector_key: str


@dataclass
class EditPlan:
    rows: list[PlanRow]
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    # least-squares plans: param -> (left [d, k], right [k, m]); empty for a projection plan
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return "lsq" if self.deltas else "projection"

    def __post_init__(self) -> None:
        missing = sorted({r.vector_key for r in self.rows} - set(self.vectors))
        if missing:
            raise ValueError(f"edit plan rows reference vectors that are not in the plan: {missing}")

    def ordered(self) -> list[PlanRow]:
        """Rows in application order: by rank, ties broken by (layer, index)."""
        return sorted(self.rows, key=lambda r: (r.rank, r.layer, r.index))

    def vector(self, row: PlanRow) -> torch.Tensor:
        return self.vectors[row.vector_key].to(torch.float32)

    def summary(self) -> pd.DataFrame:
        """One row per direction with its norm (for model cards and logs)."""
        return pd.DataFrame(
            [
                {
                    "rank": r.rank,
                    "layer": r.layer,
                    "index": r.index,
                    "alpha": r.alpha,
                    "vector_key": r.vector_key,
                    "norm": float(torch.linalg.vector_norm(self.vector(r))),
                }
                for r in self.ordered()
            ],
            columns=["rank", "layer", "index", "alpha", "vector_key", "norm"],
        )


def load_plan(directory: Path) -> EditPlan:
    """Read `plan.parquet` + `plan.safetensors` from `directory`."""
    directory = Path(directory)
    table = pd.read_parquet(directory / PLAN_TABLE)
    missing = [c for c in _COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{directory / PLAN_TABLE} lacks columns {missing}")
    rows = [
        PlanRow(
            layer=int(r.layer), index=int(r.index), rank=int(r.rank), alpha=float(r.alpha), vector_key=str(r.vector_key)
        )
        for r in table[list(_COLUMNS)].itertuples(index=False)
    ]
    vectors = load_file(str(directory / PLAN_TENSORS))
    deltas = {}
    if (directory / PLAN_DELTAS).is_file():
        from saber.edit.lsq import deltas_from_tensors

        deltas = deltas_from_tensors(load_file(str(directory / PLAN_DELTAS)))
    return EditPlan(rows=rows, vectors={k: v.to(torch.float32) for k, v in vectors.items()}, deltas=deltas)


def save_plan(plan: EditPlan, directory: Path) -> None:
    """Write the plan's table and vectors into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([vars(r) for r in plan.rows], columns=list(_COLUMNS))
    table.to_parquet(directory / PLAN_TABLE, index=False)
    used = {r.vector_key for r in plan.rows}
    save_file(
        {k: v.detach().to(torch.float32).contiguous() for k, v in plan.vectors.items() if k in used},
        str(directory / PLAN_TENSORS),
    )
    if plan.deltas:
        from saber.edit.lsq import delta_tensors
        from saber.tensorfile import save_tensors

        save_tensors(delta_tensors(plan.deltas), directory / PLAN_DELTAS)
