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

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd
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
                 system_prompt: str | None, max_length: int, generate_batch_size: int | None = None) -> None:
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.ids = encode_prompts(tokenizer, list(prompts), system_prompt, max_length)
        self.answers = greedy_generate(model, tokenizer, self.ids, n_tokens, generate_batch_size or batch_size)
        self.base = mean_nll(model, tokenizer, self.ids, self.answers, batch_size)

    def shift(self, model: Any) -> float:
        return mean_nll(model, self.tokenizer, self.ids, self.answers, self.batch_size) - self.base


def opening_rows(own: OwnAnswers, refused: Sequence[bool]) -> list[int]:
    """The probes opening_kept_rate scores: refused by the base model, with an opening to keep."""
    return [i for i, r in enumerate(refused) if r and own.answers[i]]


@torch.no_grad()
def opening_kept_rate(model: Any, tokenizer: Any, own: OwnAnswers, refused: Sequence[bool]) -> float:
    """The cheap refusal score: the share of refused prompts whose base refusal opening is still the
    greedy path, from one teacher-forced pass and no generation.

    Greedy decoding takes the argmax at every step, so the model still opens with the base
    refusal's first tokens exactly when the teacher-forced argmax equals each of them. A refusal
    reworded from its first token on is not counted (the generated score catches it).
    """
    from saber.evaluate.generation import teacher_forced

    rows = opening_rows(own, refused)
    if not rows:
        return float("nan")
    kept = 0
    for batch in teacher_forced(model, tokenizer, [own.ids[i] for i in rows], [own.answers[i] for i in rows],
                                own.batch_size):
        same = (batch.logp.argmax(-1) == batch.target) | ~batch.mask
        kept += int(same.all(-1).sum())
    return kept / len(rows)


def scaled_plan(directions: Sequence[tuple[int, int, torch.Tensor, float]], scale: float) -> EditPlan:
    """The plan of (layer, index, vector, alpha) rows in rank order, every alpha times `scale` (at most 1)."""
    rows = [PlanRow(layer=layer, index=index, rank=i + 1, alpha=min(1.0, alpha * scale), vector_key=f"v{i}")
            for i, (layer, index, _, alpha) in enumerate(directions)]
    return EditPlan(rows, {f"v{i}": vector for i, (_, _, vector, _) in enumerate(directions)})


def projection_edit(model: Any, edit_cfg: Any) -> Callable[[EditPlan], Any]:
    """The in-memory edit every measurement applies by default: apply_plan (revert with the handle)."""
    return lambda plan: apply_plan(model, plan, edit_cfg)


def measure_effects(model: Any, tokenizer: Any, directions: Sequence[tuple[int, int, torch.Tensor]],
                    harmful: OwnAnswers, protected: OwnAnswers, edit: Callable[[EditPlan], Any]) -> list[DirectionEffect]:
    """Benefit (refusal answers' NLL shift) and cost (protected answers' shift) of removing each
    (layer, index, vector) alone at alpha 1 with `edit(plan) -> handle`; the model is restored after each."""
    effects = []
    for layer, index, vector in directions:
        handle = edit(scaled_plan([(layer, index, vector, 1.0)], 1.0))
        try:
            effects.append(DirectionEffect(layer, index, harmful.shift(model), protected.shift(model)))
        finally:
            handle.revert()
    return effects


def measured_strength(benefit: float, cost: float, alpha_base: float, cost_weight: float) -> float:
    """alpha_base * b / (b + w c), b and c clipped at 0 (0 when the direction buys nothing)."""
    b, c = max(benefit, 0.0), max(cost, 0.0)
    if not np.isfinite(b) or b <= 0.0:
        return 0.0
    return alpha_base * b / (b + cost_weight * (c if np.isfinite(c) else 0.0))


@dataclass(frozen=True)
class ScalePoint:
    """One evaluation of the strength search: how many directions, their scale, held-out refusal, drift."""

    n_directions: int
    scale: float
    refusal: float
    drift: float
    phase: str  # "screen": one direction alone at full strength; "add": one more direction beside the ones
    # kept, all at full strength; "scale": bisection of the global scale; "protect": bisection of the lsq protection weight;
    # "compare": the least-squares edit at the margined mu (and at the edge when that refused more),
    # and the projection of the same directions (full strength, then bisection of its scale), with
    # the capability probes' drift; "margin": the margined mu without the comparison
    protection: Optional[float] = None  # mu of the least-squares edit (None: projection)
    skill_drift: Optional[float] = None  # "compare": NLL increase of the model's own answers to the
    # held-out capability probes, nats/token (None: not measured)

    @property
    def total_drift(self) -> float:
        """Harmless plus capability probe drift: what the method comparison minimises."""
        return self.drift + (self.skill_drift or 0.0)


def calibrate(model: Any, directions: Sequence[tuple[int, int, torch.Tensor, float]], edit: Callable[[EditPlan], Any],
              refusal: Any, drift: OwnAnswers, target: float, steps: int,
              max_drift: Optional[float] = None, min_gain: float = 0.0) -> tuple[list[int], ScalePoint, list[ScalePoint]]:
    """The least edit of `directions` (layer, index, vector, alpha) that reaches `target` (choose_edit).

    `refusal(model) -> rate` is measured on the held-out harmful probes, `drift` on held-out
    harmless ones; every evaluation is applied in memory by `edit(plan) -> handle` and reverted.
    """
    def evaluate(members: Sequence[int], scale: float) -> tuple[float, float]:
        handle = edit(scaled_plan([directions[i] for i in members], scale))
        try:
            return float(refusal(model)), drift.shift(model)
        finally:
            handle.revert()

    return choose_edit(evaluate, [d[3] for d in directions], target, steps, max_drift, min_gain)


def screen_weights(table: pd.DataFrame) -> pd.DataFrame:
    """The table in rank order with every strength > 0, ready for calibration.

    A row whose strength is 0 (its measured benefit was 0) is still screened: that benefit is a
    teacher-forced proxy, the screen measures refusal itself. It is weighted like the weakest
    measured row (1 when no row was measured).
    """
    table = table.sort_values("rank").reset_index(drop=True)
    positive = table["alpha"] > 0
    floor = float(table.loc[positive, "alpha"].min()) if positive.any() else 1.0
    table["alpha"] = table["alpha"].where(positive, floor)
    return table


def with_choice(table: pd.DataFrame, members: Sequence[int], scale: float) -> pd.DataFrame:
    """`joined` (the row is part of the edit) and its final `alpha` (weight x scale, at most 1; 0
    when it did not join) for the rows of a screen_weights table."""
    table = table.copy()
    table["joined"] = [i in members for i in range(len(table))]
    table["alpha"] = [min(1.0, a * scale) if i in members else 0.0 for i, a in enumerate(table["alpha"])]
    return table


def calibrate_table(model: Any, table: pd.DataFrame, bases: Mapping[int, torch.Tensor], edit: Callable[[EditPlan], Any],
                    refusal: Any, drift: OwnAnswers, target: float, steps: int,
                    max_drift: Optional[float] = None,
                    edit_at: Optional[Callable[[float], Callable[[EditPlan], Any]]] = None,
                    protect_range: tuple[float, float] = (1e-3, 1e3), protect_margin: float = 1.0,
                    compare: Optional["ProjectionCheck"] = None, min_gain: float = 0.0
                    ) -> tuple[pd.DataFrame, ScalePoint, list[ScalePoint]]:
    """The entanglement table with calibrated strengths (`calibrate` on its rows), the chosen point
    and the trace.

    With `edit_at(mu) -> edit` (the least-squares edit with a protection weight to find), `edit`
    is that edit at the low end of `protect_range`; the directions are chosen at full strength and
    the largest mu that still reaches the target (or, when the target was missed, refuses no more
    than the least refusal seen: refusal_bar) is then found (search_protection) instead of a lower
    global scale: more protection is what lowers drift there.

    With `compare` as well, the least-squares edit at that mu / `protect_margin` is weighed against
    the projection of the same directions (compare_projection); when the projection wins, the
    chosen point is the projection's (`protection` None). `min_gain` is choose_edit's.
    """
    table = screen_weights(table)
    directions = [(int(r.layer), int(r.index), bases[int(r.layer)][int(r.index)].float(), float(r.alpha))
                  for r in table.itertuples(index=False)]
    members, chosen, trace = calibrate(model, directions, edit, refusal, drift, target,
                                       0 if edit_at is not None else steps, max_drift, min_gain)
    if edit_at is not None:
        chosen = dataclasses.replace(chosen, protection=protect_range[0])
        trace = [dataclasses.replace(p, protection=protect_range[0]) for p in trace]
        joined = [directions[i] for i in members]

        def at(mu: float) -> ScalePoint:
            handle = edit_at(mu)(scaled_plan(joined, chosen.scale))
            try:
                return ScalePoint(len(joined), chosen.scale, float(refusal(model)), drift.shift(model), "protect", mu)
            finally:
                handle.revert()

        if max_drift is None or chosen.drift <= max_drift:
            chosen, more = search_protection(at, chosen, refusal_bar(target, chosen.refusal), steps, protect_range[1])
            trace = trace + more

        def point(plan_edit: Callable[[EditPlan], Any], s: float, mu: Optional[float]) -> ScalePoint:
            return probe_point(model, plan_edit, joined, s, refusal, drift, compare.skill, mu)

        def lsq_point(mu: float) -> ScalePoint:  # with the capability probes when the methods are compared
            return point(edit_at(mu), chosen.scale, mu) if compare is not None else dataclasses.replace(at(mu), phase="margin")

        def with_skill(p: ScalePoint) -> ScalePoint:  # refusal and drift are p's own: only the capability probes
            handle = edit_at(p.protection)(scaled_plan(joined, p.scale))
            try:
                return dataclasses.replace(p, phase="compare", skill_drift=compare.skill.shift(model))
            finally:
                handle.revert()

        chosen, more = margined_point(lsq_point, chosen, protect_margin, protect_range[0], target, max_drift)
        trace = trace + more
        if compare is not None:
            lsq = chosen if chosen.skill_drift is not None else with_skill(chosen)
            trace = trace + ([] if lsq is chosen else [lsq])
            alternative, more = compare_projection(point, lsq, compare.projection, chosen.scale, target, steps,
                                                   max_drift)
            trace = trace + more
            chosen = alternative if alternative is not None else lsq
    return with_choice(table, members, chosen.scale), chosen, trace


def margined_point(measure: Callable[[float], ScalePoint], edge: ScalePoint, margin: float, low: float,
                   target: float, max_drift: Optional[float] = None) -> tuple[ScalePoint, list[ScalePoint]]:
    """The least-squares point the edit uses, and the trace: the edge's mu divided by the margin
    (the edge found on the probes does not carry over to new prompts; never below the search's
    low end), measured with `measure(mu)`; the edge itself when that stronger edit
    refuses more on the probes than the edge (or than the target, if more), or leaves the drift
    budget.

    Where the target was missed, refusal need not fall as mu falls (measured on an
    `organism_deep` Llama-style seed: 0.25 at mu = 0.001, 0.04 at the edge mu = 1.24 and 0.24 at
    mu = 0.31), so the margin can step back into an edit that refuses more."""
    mu = max(low, edge.protection / margin)
    if mu >= edge.protection:
        return edge, []
    p = measure(mu)
    kept = p.refusal <= max(target, edge.refusal) and (max_drift is None or p.drift <= max_drift)
    return (p if kept else edge), [p]


@dataclass(frozen=True)
class ProjectionCheck:
    """What calibrate_table needs to weigh the projection against the least-squares edit: the
    projection's in-memory edit and the model's own answers to the held-out capability probes."""

    projection: Callable[[EditPlan], Any]
    skill: OwnAnswers


def probe_point(model: Any, edit: Callable[[EditPlan], Any], joined: Sequence[tuple[int, int, torch.Tensor, float]],
                scale: float, refusal: Any, drift: OwnAnswers, skill: OwnAnswers,
                protection: Optional[float]) -> ScalePoint:
    """Held-out refusal, harmless drift and capability drift of `joined` at `scale` under `edit`."""
    handle = edit(scaled_plan(joined, scale))
    try:
        return ScalePoint(len(joined), scale, float(refusal(model)), drift.shift(model), "compare", protection,
                          skill.shift(model))
    finally:
        handle.revert()


def compare_projection(point: Callable[[Callable[[EditPlan], Any], float, Optional[float]], ScalePoint],
                       lsq: ScalePoint, projection: Callable[[EditPlan], Any],
                       full_scale: float, target: float, steps: int,
                       max_drift: Optional[float] = None) -> tuple[Optional[ScalePoint], list[ScalePoint]]:
    """The projection of the joined directions when it is the better edit on the probes, else None.

    `lsq` is the least-squares edit as it will be applied, measured with the capability probes;
    the projection is measured at full strength, then at the smallest scale that still reaches
    `target` (search_scale). The
    projection wins when it reaches the target within `max_drift` with less harmless plus
    capability drift (ScalePoint.total_drift): the least-squares update trades the protected
    prompts' outputs against the harmful ones, and on some models that costs capability the
    projection keeps. `point(edit, scale, mu)` measures one point. Returns the winner and the
    projection's trace.
    """
    def accept(p: ScalePoint) -> bool:
        return p.refusal <= target and (max_drift is None or p.drift <= max_drift)

    start = point(projection, full_scale, None)
    if not accept(start):
        return None, [start]

    def hopeless(p: ScalePoint) -> bool:
        # drift grows with the scale: once a scale too small to reach the target drifts more than
        # the least-squares edit, every scale that reaches it does too
        return not accept(p) and p.total_drift >= lsq.total_drift

    best, more = search_scale(lambda s: point(projection, s, None), start, accept, steps, smallest=True, stop=hopeless)
    return (best if best.total_drift < lsq.total_drift else None), [start, *more]


def refusal_bar(target: float, start: float) -> Callable[[ScalePoint], bool]:
    """The protection search's acceptance: refusal at most the target or, while the target is
    missed, at most the least refusal accepted so far (starting from `start`).

    Refusal need not grow monotonically with mu where the target is missed (measured on an
    `organism_hard` Gemma-style seed: 0.74 at mu = 0.001, 0.33 at mu = 1, 0.72 at mu = 13), so a
    fixed bar at the start's refusal would accept a larger mu that refuses far more than the best
    point seen. Call it once per evaluated point, in order."""
    bar = [max(target, start)]

    def accept(point: ScalePoint) -> bool:
        if point.refusal > bar[0]:
            return False
        bar[0] = max(target, point.refusal)
        return True

    return accept


def search_protection(evaluate: Any, start: ScalePoint, accept: Any, steps: int,
                      high: float) -> tuple[ScalePoint, list[ScalePoint]]:
    """The largest protection weight mu in [start.protection, high] whose point is accepted, by
    bisection of log mu in `steps` evaluations of `evaluate(mu) -> ScalePoint` (`start` is
    accepted; refusal grows with mu, drift falls). Returns the best point and the trace."""
    lo, hi = np.log(start.protection), np.log(high)
    best, trace = start, []
    for _ in range(steps):
        point = evaluate(float(np.exp(0.5 * (lo + hi))))
        trace.append(point)
        if accept(point):
            lo, best = np.log(point.protection), point
        else:
            hi = np.log(point.protection)
    return best, trace


def choose_edit(evaluate: Any, alphas: Sequence[float], target: float, steps: int,
                max_drift: Optional[float] = None, min_gain: float = 0.0) -> tuple[list[int], ScalePoint, list[ScalePoint]]:
    """Which directions, at what global scale: the least edit that reaches `target` refusal.

    `evaluate(members, scale) -> (refusal, drift)` with every alpha of `members` times `scale`
    (capped at 1); a direction with alpha 0 never joins. A point with drift above `max_drift`
    (None: no budget) is never chosen.

    1. "screen": each direction removed alone at full strength; they join in order of the
       refusal left (least first), then drift.
    2. "add": the next direction in that order joins the ones kept so far, all at full strength,
       and stays only when, within the budget, it reaches the target or lowers held-out refusal
       by at least `min_gain`, until refusal reaches the target or the directions run out; the
       trace shows a miss. A direction that raises refusal beside the others (measured: one
       joined direction left 0.14 on an `organism_deep` seed and the first two together 0.20) is
       left out instead of being carried into every later point.
    3. "scale": bisection of the global scale of those directions: the smallest scale that still
       reaches the target, or, when even the kept point is over budget, the largest within it.

    Returns the indices of the joined directions, the chosen point and the trace.
    """
    def point(members: Sequence[int], scale: float, phase: str) -> ScalePoint:
        return ScalePoint(len(members), scale, *evaluate(members, scale), phase)

    def full(members: Sequence[int]) -> float:  # every alpha reaches 1
        return 1.0 / min(alphas[i] for i in members)

    def within(p: ScalePoint) -> bool:
        return max_drift is None or p.drift <= max_drift

    def reached(p: ScalePoint) -> bool:
        return p.refusal <= target and within(p)

    def pays(trial: ScalePoint, kept: ScalePoint) -> bool:  # rates are counts / n: 1e-12 absorbs the rounding
        gain = kept.refusal - trial.refusal
        return reached(trial) or (within(trial) and gain > 0 and gain >= min_gain - 1e-12)

    live = [i for i, a in enumerate(alphas) if a > 0]
    if not live:
        raise ValueError("calibration: every direction has strength 0; nothing to calibrate")
    screen = {i: point([i], full([i]), "screen") for i in live}
    order = sorted(live, key=lambda i: (not within(screen[i]), screen[i].refusal, screen[i].drift))
    members, start, tried = [order[0]], screen[order[0]], []
    for i in order[1:]:
        if reached(start) or not within(start):
            break
        trial = point(members + [i], full(members + [i]), "add")
        tried.append(trial)
        if pays(trial, start):
            members, start = members + [i], trial
    trace = [screen[i] for i in live] + tried
    if reached(start):
        best, more = search_scale(lambda s: point(members, s, "scale"), start, reached, steps, smallest=True)
    elif not within(start):
        best, more = search_scale(lambda s: point(members, s, "scale"), start, within, steps, smallest=False)
    else:
        return members, start, trace
    return members, best, trace + more


def search_scale(evaluate: Any, start: ScalePoint, accept: Any, steps: int, smallest: bool = True,
                 stop: Optional[Callable[[ScalePoint], bool]] = None) -> tuple[ScalePoint, list[ScalePoint]]:
    """Bisection of the scale in (0, start.scale], `steps` evaluations of `evaluate(s) -> ScalePoint`.

    smallest=True: the smallest accepted scale, `start` being accepted (refusal falls as the scale
    grows, so the least scale that reaches the target is the least-drift one). smallest=False:
    the largest accepted scale, `start` not accepted (drift grows with the scale: the strongest
    edit within the drift budget); `start` itself when no scale is accepted. The search ends early
    at a point where `stop(point)` holds.
    """
    best, trace, lo, hi = start, [], 0.0, start.scale
    found = smallest
    for _ in range(steps):
        point = evaluate(0.5 * (lo + hi))
        trace.append(point)
        if accept(point) == smallest:
            hi = point.scale
        else:
            lo = point.scale
        if accept(point):
            if smallest or not found or point.scale > best.scale:
                best, found = point, True
        if stop is not None and stop(point):
            break
    return best, trace


@dataclass
class Measuring:
    """The model a pass probes, its tokenizer, the in-memory edit every measurement applies
    (projection, or the least-squares edit with its input maps), and the arguments of OwnAnswers."""

    model: Any
    tokenizer: Any
    edit: Callable[[EditPlan], Any]
    answers: dict[str, Any]
    edit_cfg: Any
    lsq: Any = None  # the LsqEditor when the run edits by least squares
    method: str = "projection"
    method_reason: str = "edit.method=projection"
    _last: Any = None  # (mu, editor) of the last lsq_at call: its input maps are solved once

    def lsq_at(self, protect_weight: float) -> Any:
        """The least-squares editor at another protection weight. The last one is kept, so the
        point the calibration compares last is not solved again when the edit adopts it."""
        if self._last is None or self._last[0] != protect_weight:
            self._last = (protect_weight, self.lsq.with_protection(protect_weight))
        return self._last[1]

    def lsq_edit(self, protect_weight: Optional[float] = None) -> Callable[[EditPlan], Any]:
        """The in-memory least-squares edit, at the editor's protection weight or another one."""
        editor = self.lsq if protect_weight is None else self.lsq_at(protect_weight)
        return lambda plan: apply_plan(self.model, editor.with_deltas(plan), self.edit_cfg)


def full_strength_plan(rows: pd.DataFrame, bases: Mapping[int, torch.Tensor]) -> EditPlan:
    """Every (layer, index) row's direction at alpha 1: the writers any plan of this pass can touch."""
    return scaled_plan([(int(r.layer), int(r.index), bases[int(r.layer)][int(r.index)].float(), 1.0)
                        for r in rows.itertuples(index=False)], 1.0)


def prepare_measuring(model: Any, tokenizer: Any, cfg: Any, acts: Any, bases: Mapping[int, torch.Tensor],
                      rows: pd.DataFrame) -> Measuring:
    """Measurement settings for a pass over `rows` (the selected directions), and the edit method
    it uses (saber.edit.lsq.resolve_method); with lsq, the writers' inputs are measured here."""
    from saber.collect import FREED_SPLIT
    from saber.edit.lsq import resolve_method

    # every writer setting of the edit, but the measurement never edits the embedding
    edit_cfg = dataclasses.replace(cfg.edit, tied_embeddings="untie", embedding=False, norm_preserving=False)
    answers = {"n_tokens": cfg.entangle.measure_tokens, "batch_size": cfg.evaluate.batch_size,
               "generate_batch_size": cfg.evaluate.generate_batch_size,
               "system_prompt": cfg.model.system_prompt, "max_length": cfg.collect.max_length}
    m = Measuring(model, tokenizer, projection_edit(model, edit_cfg), answers, edit_cfg)
    plan = full_strength_plan(rows, bases)
    if cfg.edit.method != "projection" and not rows.empty:
        m.method, m.method_reason = resolve_method(model, cfg.edit, plan, cfg.entangle.calibrate,
                                                   kept=FREED_SPLIT in acts.splits("harmful"))
    if m.method == "lsq":
        m.lsq = lsq_editor(m, acts, plan, cfg.edit.lsq.protect_prompts)
        m.edit = m.lsq_edit()
    return m


def lsq_editor(m: Measuring, acts: Any, plan: EditPlan, n_protect: int) -> Any:
    """The least-squares editor of every writer `plan` touches: its inputs on the harmful fit
    prompts, on the protected ones (harmless and capability fit) and on the kept ones (the harmful
    fit prompts an earlier plan freed from refusal, so that this plan keeps them answered), each
    with the model's answer."""
    from saber.collect import FREED_SPLIT
    from saber.edit.lsq import build_editor
    from saber.evaluate.generation import pad_id_of

    def sequences(prompts: list[str]) -> list[list[int]]:
        own = OwnAnswers(m.model, m.tokenizer, prompts, **m.answers)
        return [list(p) + list(a) for p, a in zip(own.ids, own.answers)]

    harmful = sequences(acts.rows("harmful", "fit")["text"].tolist())
    freed = acts.rows("harmful", FREED_SPLIT)["text"].tolist() if FREED_SPLIT in acts.splits("harmful") else []
    protected = sequences(acts.rows("harmless", "fit")["text"].tolist()[:n_protect]
                          + acts.rows("capability", "fit")["text"].tolist()[:n_protect])
    return build_editor(m.model, m.edit_cfg, plan, harmful, protected, m.answers["batch_size"], pad_id_of(m.tokenizer),
                        kept=sequences(freed) if freed else ())
