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


class OwnAnswers:
    """A prompt set with the model's own greedy openings, and their NLL under the unedited model.

    `shift(model)` is the NLL increase of those same answers under the model as it is now (after
    an in-memory edit): how much less likely the model's original behaviour has become.
    """

    def __init__(self, model: Any, tokenizer: Any, prompts: Sequence[str], *, n_tokens: int, batch_size: int,
                 system_prompt: str | None, max_length: int) -> None:
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.ids = encode_prompts(tokenizer, list(prompts), system_prompt, max_length)
        self.answers = greedy_generate(model, tokenizer, self.ids, n_tokens, batch_size)
        self.base = mean_nll(model, tokenizer, self.ids, self.answers, batch_size)

    def shift(self, model: Any) -> float:
        return mean_nll(model, self.tokenizer, self.ids, self.answers, self.batch_size) - self.base


def single_direction_plan(layer: int, index: int, vector: torch.Tensor) -> EditPlan:
    return EditPlan([PlanRow(layer=layer, index=index, rank=1, alpha=1.0, vector_key="v")], {"v": vector})


def scaled_plan(directions: Sequence[tuple[int, int, torch.Tensor, float]], scale: float) -> EditPlan:
    """The plan of (layer, index, vector, alpha) rows in rank order, every alpha times `scale` (at most 1)."""
    rows = [PlanRow(layer=layer, index=index, rank=i + 1, alpha=min(1.0, alpha * scale), vector_key=f"v{i}")
            for i, (layer, index, _, alpha) in enumerate(directions)]
    return EditPlan(rows, {f"v{i}": vector for i, (_, _, vector, _) in enumerate(directions)})


def measure_effects(model: Any, tokenizer: Any, directions: Sequence[tuple[int, int, torch.Tensor]],
                    harmful: OwnAnswers, protected: OwnAnswers, edit_cfg: Any) -> list[DirectionEffect]:
    """Benefit (refusal answers' NLL shift) and cost (protected answers' shift) of removing each
    (layer, index, vector) alone at alpha 1; the model is restored after each."""
    effects = []
    for layer, index, vector in directions:
        handle = apply_plan(model, single_direction_plan(layer, index, vector), edit_cfg)
        try:
            effects.append(DirectionEffect(layer, index, harmful.shift(model), protected.shift(model)))
        finally:
            handle.revert()
    return effects


def calibrate_scale(model: Any, directions: Sequence[tuple[int, int, torch.Tensor, float]], edit_cfg: Any,
                    refusal: Any, drift: OwnAnswers, target: float, steps: int) -> tuple[ScalePoint, list[ScalePoint]]:
    """The global strength scale of `directions` (see search_scale); `refusal(model) -> rate` on held-out
    harmful probes, `drift` on held-out harmless ones. Every evaluation is applied in memory and reverted."""
    def evaluate(scale: float) -> tuple[float, float]:
        handle = apply_plan(model, scaled_plan(directions, scale), edit_cfg)
        try:
            return float(refusal(model)), drift.shift(model)
        finally:
            handle.revert()

    s_max = 1.0 / max(alpha for *_, alpha in directions)
    return search_scale(evaluate, s_max, target, steps)


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


def search_scale(evaluate: Any, s_max: float, target: float, steps: int) -> tuple[ScalePoint, list[ScalePoint]]:
    """The evaluated point with the smallest global scale in (0, s_max] whose refusal is at or below `target`.

    `evaluate(s) -> (refusal, drift)`. Drift grows with s, so the smallest scale that reaches the
    target is the least-drift one. Refusal is taken as non-increasing in s; bisection then needs
    `steps` evaluations after the one at s_max. When even s_max misses the target, s_max is
    returned (the strongest edit allowed) and the trace says so.
    """
    best = ScalePoint(s_max, *evaluate(s_max))
    trace = [best]
    if not best.refusal <= target:
        return best, trace
    lo = 0.0
    for _ in range(steps):
        point = ScalePoint(0.5 * (lo + best.scale), *evaluate(0.5 * (lo + best.scale)))
        trace.append(point)
        if point.refusal <= target:
            best = point
        else:
            lo = point.scale
    return best, trace
