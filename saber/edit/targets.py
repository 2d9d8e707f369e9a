"""Which tensors an edit plan touches and which directions each one loses.

Shared by the in-memory and the streaming path so both compute the same directions with the
same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from saber.edit.config import EditConfig
from saber.edit.math import gram_schmidt, sandwich_direction
from saber.edit.plan import EditPlan, PlanRow
from saber.model.adapters import ArchitectureAdapter, NormSpec

EMBEDDING_LAYER = -1  # the token embedding counts as layer -1 for edit.scope


@dataclass(frozen=True)
class EditTarget:
    """One tensor to edit (a writer weight, its bias, or the embedding) with its plan rows."""

    param: str
    role: str
    layer: int
    residual_axis: int
    stacked: bool  # axis 0 indexes experts; each expert is edited on its own
    norms: tuple[NormSpec, ...]
    rows: tuple[PlanRow, ...]


def plan_targets(adapter: ArchitectureAdapter, model: nn.Module, plan: EditPlan, cfg: EditConfig) -> list[EditTarget]:
    """Edit targets for `plan` on `model` (a loaded or a meta-device model), in model order.

    Rows with alpha == 0 are dropped; a target without rows is not listed. A least-squares plan
    touches only the weights it carries deltas for.
    """
    ordered = [r for r in plan.ordered() if r.alpha != 0.0]
    targets: list[EditTarget] = []
    if cfg.embedding:
        rows = tuple(r for r in ordered if cfg.targets_layer(r.layer, EMBEDDING_LAYER))
        if rows:
            spec = adapter.embedding(model)
            targets.append(EditTarget(spec.param, "embedding", EMBEDDING_LAYER, spec.residual_axis, False, (), rows))
    for writer in adapter.writers(model):
        if writer.role not in cfg.roles:
            continue
        rows = tuple(r for r in ordered if cfg.targets_layer(r.layer, writer.layer))
        if not rows:
            continue
        norms = writer.norms if cfg.sandwich_correction else ()
        stacked = writer.role == "fused_expert_down"
        targets.append(
            EditTarget(writer.param, writer.role, writer.layer, writer.residual_axis, stacked, norms, rows)
        )
        if writer.bias is not None:
            # a bias has one residual axis: 0 for [d], 1 for a per-expert stack [experts, d]
            targets.append(EditTarget(writer.bias, writer.role, writer.layer, 1 if stacked else 0, stacked, norms, rows))
    if plan.deltas:
        targets = [t for t in targets if t.param in plan.deltas]
    return targets


def norm_gain(norms: tuple[NormSpec, ...], read: Callable[[str], torch.Tensor], dtype: torch.dtype) -> torch.Tensor | None:
    """Product of the per-channel gains (offset + weight) of `norms`; None without norms."""
    gain: torch.Tensor | None = None
    for norm in norms:
        g = read(norm.param).to(dtype) + norm.offset
        gain = g if gain is None else gain * g
    return gain


def target_directions(
    target: EditTarget, plan: EditPlan, gain: torch.Tensor | None, dtype: torch.dtype
) -> list[tuple[torch.Tensor, float]]:
    """Orthonormal (q, alpha) pairs for `target`: sandwich-corrected, Gram-Schmidt in rank order.

    Rule: u_i = normalise(g * v_i) (g = 1 without a norm); q_i = Gram-Schmidt(u_1..u_i) in rank
    order; q_i carries alpha_i. A u_i already spanned by earlier ones adds nothing.
    """
    us = [sandwich_direction(plan.vector(r).to(dtype), gain) for r in target.rows]
    qs = gram_schmidt(us)
    return [(q, r.alpha) for q, r in zip(qs, target.rows) if q is not None]
