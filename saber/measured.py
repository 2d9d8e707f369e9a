"""Entanglement measured by its cost: remove one direction at a time and see what it buys and costs.

For each selected direction, ablated alone at alpha 1 with the exact in-memory apply/revert:

- benefit = the mean teacher-forced NLL increase (nats per token) of the base model's own greedy
  openings to the harmful fit prompts (its refusals): how much less likely refusing becomes;
- cost = the same on the protected prompts, capability and harmless fit prompts (its own answers
  there): how much of what the model does where it should not change is lost.

Both use the model's own answers, so no refusal phrase list is needed, and both are in nats per
token, so their ratio is dimensionless. The strength is a continuous map of cost per unit of
benefit, alpha = alpha_base * b / (b + w c) with b, c clipped at 0: alpha_base for a direction
that costs nothing, alpha_base / 2 when the cost equals the benefit (w = 1), and 0 for one that
does not move refusal at all. There is no cliff, and a direction is never turned down merely
because capability prompts vary along it (the geometric rho gate), only when removing it costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from saber.edit import EditPlan, PlanRow, apply_plan
from saber.evaluate.capability import sequence_nll
from saber.evaluate.generation import encode_prompts, greedy_generate


@dataclass(frozen=True)
class DirectionEffect:
    """What removing one direction alone does: benefit on refusal, cost on capability (nats/token)."""

    layer: int
    index: int
    benefit: float
    cost: float


def mean_nll(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
             batch_size: int) -> float:
    """Mean over prompts of the per-token NLL of each answer (prompts with an empty answer skipped)."""
    keep = [i for i, a in enumerate(answers) if a]
    if not keep:
        return float("nan")
    nll = sequence_nll(model, tokenizer, [prompts[i] for i in keep], [answers[i] for i in keep], batch_size)
    return float(np.mean([x.mean() for x in nll if len(x)]))


def measure_effects(model: Any, tokenizer: Any, directions: Sequence[tuple[int, int, torch.Tensor]],
                    harmful: Sequence[str], capability: Sequence[str], edit_cfg: Any, *, n_tokens: int,
                    batch_size: int = 16, system_prompt: str | None = None,
                    max_length: int = 1024) -> list[DirectionEffect]:
    """Benefit and cost of removing each (layer, index, vector) alone at alpha 1 (model restored after each)."""
    h_ids = encode_prompts(tokenizer, list(harmful), system_prompt, max_length)
    c_ids = encode_prompts(tokenizer, list(capability), system_prompt, max_length)
    h_ans = greedy_generate(model, tokenizer, h_ids, n_tokens, batch_size)
    c_ans = greedy_generate(model, tokenizer, c_ids, n_tokens, batch_size)
    base_h = mean_nll(model, tokenizer, h_ids, h_ans, batch_size)
    base_c = mean_nll(model, tokenizer, c_ids, c_ans, batch_size)
    effects = []
    for layer, index, vector in directions:
        plan = EditPlan([PlanRow(layer=layer, index=index, rank=1, alpha=1.0, vector_key="v")], {"v": vector})
        handle = apply_plan(model, plan, edit_cfg)
        try:
            benefit = mean_nll(model, tokenizer, h_ids, h_ans, batch_size) - base_h
            cost = mean_nll(model, tokenizer, c_ids, c_ans, batch_size) - base_c
        finally:
            handle.revert()
        effects.append(DirectionEffect(layer, index, benefit, cost))
    return effects


def measured_strength(benefit: float, cost: float, alpha_base: float, cost_weight: float) -> float:
    """alpha_base * b / (b + w c), b and c clipped at 0 (0 when the direction buys nothing)."""
    b, c = max(benefit, 0.0), max(cost, 0.0)
    if not np.isfinite(b) or b <= 0.0:
        return 0.0
    return alpha_base * b / (b + cost_weight * (c if np.isfinite(c) else 0.0))


@dataclass(frozen=True)
class ScalePoint:
    """One evaluation of the strength search: scale, held-out refusal, drift on protected prompts."""

    scale: float
    refusal: float
    drift: float


def search_scale(evaluate: Any, s_max: float, target: float, steps: int) -> tuple[float, list[ScalePoint]]:
    """The smallest global scale s in (0, s_max] whose held-out refusal is at or below `target`.

    `evaluate(s) -> (refusal, drift)`. Drift grows with s, so the smallest scale that reaches the
    target is the least-drift one. Refusal is taken as non-increasing in s; bisection then needs
    `steps` evaluations after the one at s_max. When even s_max misses the target, s_max is
    returned (the strongest edit allowed) and the trace says so.
    """
    trace = [ScalePoint(s_max, *evaluate(s_max))]
    if not trace[0].refusal <= target:
        return s_max, trace
    lo, hi = 0.0, s_max
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        point = ScalePoint(mid, *evaluate(mid))
        trace.append(point)
        if point.refusal <= target:
            hi = mid
        else:
            lo = mid
    return hi, trace
