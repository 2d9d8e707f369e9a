"""Measured entanglement and the strength search: continuous strengths, bounded bisection, real runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saber.measured import (ProjectionCheck, ScalePoint, calibrate_table, choose_edit, compare_projection,
                            margined_point, measured_strength, refusal_bar, screen_weights, search_protection,
                            search_scale, with_choice)


def test_strength_is_continuous_in_cost_per_benefit() -> None:
    assert measured_strength(0.3, 0.0, 0.9, 1.0) == pytest.approx(0.9)  # free: full base strength
    assert measured_strength(0.3, 0.3, 0.9, 1.0) == pytest.approx(0.45)  # cost = benefit: half
    assert measured_strength(0.0, 0.0, 0.9, 1.0) == 0.0  # buys nothing: not edited
    assert measured_strength(-0.1, 0.2, 0.9, 1.0) == 0.0
    # no cliff: a small change in cost moves the strength a little
    a, b = measured_strength(0.3, 0.10, 0.9, 1.0), measured_strength(0.3, 0.11, 0.9, 1.0)
    assert 0 < a - b < 0.02
    assert measured_strength(0.3, 0.3, 0.9, 0.0) == pytest.approx(0.9)  # cost_weight 0: cost ignored


def test_search_finds_the_smallest_scale_that_reaches_the_target() -> None:
    calls: list[float] = []

    def evaluate(s: float) -> ScalePoint:  # planted: refusal falls linearly to 0 at s = 0.7
        calls.append(s)
        return ScalePoint(1, s, max(0.0, 1.0 - s / 0.7), s**2, "scale")

    start = evaluate(1.0)
    best, trace = search_scale(evaluate, start, lambda p: p.refusal <= 0.0, steps=10)
    assert 0.7 <= best.scale <= 0.7 + 1.0 / 2**10 and len(calls) == 11 and len(trace) == 10
    assert best.refusal <= 0.0 and best.drift == pytest.approx(best.scale**2)
    assert all(p.refusal <= 0.0 for p in trace if p.scale >= best.scale)
    # the other direction: the largest scale whose drift (s^2) stays within a budget of 0.25
    best, trace = search_scale(evaluate, start, lambda p: p.drift <= 0.25, steps=10, smallest=False)
    assert 0.5 - 1.0 / 2**10 <= best.scale <= 0.5 and best.drift <= 0.25


def planted_edit(needed: set[int], drift_of: dict[int, float]):
    """Refusal 0 once every direction of `needed` is in at scale >= 0.6 (each removes its share
    otherwise); drift is the sum of the members' drifts times the scale."""
    calls: list[tuple[tuple[int, ...], float]] = []

    def evaluate(members, scale):
        calls.append((tuple(members), scale))
        removed = len(needed & set(members)) if scale >= 0.6 else 0
        return 1.0 - removed / len(needed), scale * sum(drift_of[i] for i in members)

    return evaluate, calls


def test_choose_edit_adds_the_best_directions_then_lowers_the_scale() -> None:
    evaluate, calls = planted_edit({1, 3}, {0: 0.1, 1: 0.2, 2: 0.05, 3: 0.3})
    members, best, trace = choose_edit(evaluate, [1.0, 1.0, 0.0, 0.5], 0.0, steps=6)
    # direction 2 has strength 0: never tried; 1 and 3 each remove half, and 1 drifts less
    assert all(2 not in m for m, _ in calls)
    assert members == [1, 3] and best.refusal == 0.0
    assert [p.phase for p in trace] == ["screen"] * 3 + ["add"] + ["scale"] * 6
    assert trace[3].scale == 2.0  # full strength: alpha 0.5 of direction 3 reaches 1
    assert 0.6 <= best.scale <= 0.6 + 2.0 / 2**6  # the least scale that still removes refusal


def test_choose_edit_stops_at_the_first_direction_that_suffices_and_reports_a_miss() -> None:
    evaluate, _ = planted_edit({0}, {0: 0.1, 1: 0.0})
    members, best, trace = choose_edit(evaluate, [0.8, 0.8], 0.0, steps=3)
    assert members == [0] and [p.phase for p in trace] == ["screen", "screen", "scale", "scale", "scale"]
    # the target cannot be reached: every direction at full strength, the least refusal kept
    evaluate, _ = planted_edit({0, 5}, {0: 0.1, 1: 0.0})
    members, best, trace = choose_edit(evaluate, [1.0, 1.0], 0.0, steps=3)
    assert best.refusal == 0.5 and members == [0] and all(p.phase != "scale" for p in trace)
    with pytest.raises(ValueError, match="strength 0"):
        choose_edit(evaluate, [0.0], 0.0, steps=3)


def test_choose_edit_leaves_out_a_direction_that_does_not_lower_refusal_enough() -> None:
    # planted on 72 probes: 0 alone leaves 20 refusing; 1 beside 0 brings refusals back (30);
    # 2 removes one more prompt (19: noise); 3 removes 10; 4 then reaches the target
    left = {(0,): 20, (0, 1): 30, (0, 2): 19, (0, 3): 10, (0, 3, 4): 0}
    calls: list[tuple[int, ...]] = []

    def evaluate(members, scale):
        calls.append(tuple(members))
        key = tuple(sorted(members))
        return left.get(key, 72 - 10 * len(key)) / 72, 0.01 * len(key)

    # the screen puts 0 first (20 left alone), then 1, 2, 3, 4 in index order (62 left alone each)
    members, best, trace = choose_edit(evaluate, [1.0] * 5, 0.0, steps=2, min_gain=2 / 72)
    assert members == [0, 3, 4] and best.refusal == 0.0
    assert [c for c in calls if len(c) > 1][:4] == [(0, 1), (0, 2), (0, 3), (0, 3, 4)]
    # without the minimum gain, one prompt of difference is enough for 2 to join, and with 2 in,
    # neither 3 nor 4 lowers refusal any further (42 left)
    members, best, _ = choose_edit(evaluate, [1.0] * 5, 0.0, steps=2)
    assert members == [0, 2] and best.refusal == 19 / 72


def test_choose_edit_never_picks_a_point_over_the_drift_budget() -> None:
    # 1 and 3 are needed together (drift 0.5 at full strength): over a budget of 0.4, so the edit
    # keeps direction 1 alone and the scale search stays within the budget
    evaluate, _ = planted_edit({1, 3}, {0: 0.1, 1: 0.2, 2: 0.05, 3: 0.3})
    members, best, trace = choose_edit(evaluate, [1.0, 1.0, 0.0, 1.0], 0.0, steps=6, max_drift=0.4)
    assert best.drift <= 0.4 and members == [1] and best.refusal == 0.5
    # a budget that even one direction exceeds: the largest scale within it
    evaluate, _ = planted_edit({0}, {0: 1.0})
    members, best, trace = choose_edit(evaluate, [1.0], 0.0, steps=6, max_drift=0.3)
    assert best.drift <= 0.3 and best.scale >= 0.3 - 1.0 / 2**6 and trace[-1].phase == "scale"


def test_protection_search_finds_the_largest_weight_that_still_reaches_the_target() -> None:
    """Planted: refusal stays at 0 up to mu = 5 and is 0.5 above; drift falls with mu. Ten log
    bisection steps over [1e-3, 1e3] land within a factor 10**(6 / 2**10) of the edge from below."""
    def evaluate(mu: float) -> ScalePoint:
        return ScalePoint(1, 1.0, 0.0 if mu <= 5.0 else 0.5, 1.0 / (1.0 + mu), "protect", mu)

    start = evaluate(1e-3)
    best, trace = search_protection(evaluate, start, lambda p: p.refusal <= 0.0, 10, 1e3)
    assert len(trace) == 10 and all(p.phase == "protect" for p in trace)
    assert best.refusal == 0.0 and 5.0 / 10 ** (6 / 2 ** 10) <= best.protection <= 5.0
    assert best.drift < start.drift
    never, _ = search_protection(lambda mu: ScalePoint(1, 1.0, 1.0, 0.0, "protect", mu), start,
                                 lambda p: p.refusal <= 0.0, 4, 1e3)
    assert never is start  # nothing above the start reaches the target: the start stays


def test_a_missed_target_keeps_the_least_refusal_the_protection_search_found() -> None:
    """Planted, the shape measured on an organism_hard Gemma-style seed: the target 0 is never
    reached, refusal is 0.74 at the low end, dips to 0.33 around mu = 1 and rises above it. The
    search must end at the dip, not at a larger mu whose refusal merely stays under the start's."""
    def evaluate(mu: float) -> ScalePoint:
        refusal = 0.33 if 0.3 <= mu <= 3.0 else (0.72 if mu < 30 else 0.9)
        return ScalePoint(17, 1.0, refusal, 1.0 / (1.0 + mu), "protect", mu)

    start = ScalePoint(17, 1.0, 0.74, 1.0, "add", 1e-3)
    best, trace = search_protection(evaluate, start, refusal_bar(0.0, start.refusal), 6, 1e3)
    assert best.refusal == 0.33 and 0.3 <= best.protection <= 3.0
    assert min(p.refusal for p in trace) == best.refusal
    # a reached target keeps its fixed bar: any mu at or below it is accepted, the largest wins
    accept = refusal_bar(0.1, 0.0)
    assert accept(ScalePoint(1, 1.0, 0.05, 0.0, "protect", 1.0)) and accept(ScalePoint(1, 1.0, 0.1, 0.0, "protect", 2.0))
    assert not accept(ScalePoint(1, 1.0, 0.11, 0.0, "protect", 3.0))


def planted_methods(lsq_total: float, lsq_refusal: float = 0.0) -> tuple:
    """Two planted edits: the least-squares one at a fixed point, the projection with refusal
    falling linearly to 0 at scale 0.6 and drift s^2 / 10 split 1:1 between harmless and capability."""
    calls: list[tuple[str, float]] = []
    lsq, projection = object(), object()

    def point(edit: object, s: float, mu: float | None) -> ScalePoint:
        calls.append(("lsq" if edit is lsq else "projection", s))
        if edit is lsq:
            return ScalePoint(1, s, lsq_refusal, lsq_total / 2, "compare", mu, lsq_total / 2)
        return ScalePoint(1, s, max(0.0, 1.0 - s / 0.6), s**2 / 20, "compare", None, s**2 / 20)

    return point, lsq, projection, calls


def test_method_comparison_keeps_the_projection_only_when_it_drifts_less_at_the_target() -> None:
    """Planted: the projection reaches refusal 0 from scale 0.6 on, with total drift s^2 / 10
    (0.036 at the edge). Against a least-squares edit drifting 0.1 it wins, at its smallest scale
    that reaches the target (bisection: 6 steps over (0, 1] land within 1/64 above 0.6); against
    one drifting 0.01 it loses and the search stops at the first too-small scale that already
    drifts more (drift grows with the scale)."""
    point, lsq, projection, calls = planted_methods(0.1)
    best, trace = compare_projection(point, point(lsq, 1.0, 0.05), projection, 1.0, 0.0, 6)
    assert best is not None and best.protection is None and best.refusal == 0.0
    assert 0.6 <= best.scale <= 0.6 + 1 / 64 and best.total_drift == pytest.approx(best.scale**2 / 10)
    assert len(trace) == 1 + 6 and calls[0] == ("lsq", 1.0) and all(c == "projection" for c, _ in calls[1:])
    assert all(p.skill_drift is not None and p.protection is None for p in trace)

    point, lsq, projection, calls = planted_methods(0.01)
    best, trace = compare_projection(point, point(lsq, 1.0, 0.05), projection, 1.0, 0.0, 6)
    # scale 0.5 misses the target and already drifts 0.025 > 0.01: no smaller drift can reach it
    assert best is None and [s for _, s in calls] == [1.0, 1.0, 0.5] and len(trace) == 2

    # a projection that cannot reach the target at full strength is never chosen, however little it drifts
    point, lsq, projection, calls = planted_methods(0.1)
    best, trace = compare_projection(point, point(lsq, 0.5, 0.05), projection, 0.5, 0.0, 6)
    assert best is None and len(calls) == 2
    # nor one over the drift budget (harmless drift s^2 / 20 > 0.001 at every reaching scale)
    point, lsq, projection, calls = planted_methods(0.1)
    assert compare_projection(point, point(lsq, 1.0, 0.05), projection, 1.0, 0.0, 6, max_drift=0.001)[0] is None


def test_the_margined_protection_is_kept_only_where_it_refuses_no_more_than_the_edge() -> None:
    """Planted refusal as a function of mu: where it falls with mu (the target reached at the
    edge mu = 0.8), mu / 4 is used; where it does not (0.04 at the edge, 0.24 at mu / 4, the shape
    measured on an organism_deep seed), the edge stays; a margin of 1 measures nothing."""
    def measure_with(refusal_at):
        calls: list[float] = []

        def measure(mu: float) -> ScalePoint:
            calls.append(mu)
            return ScalePoint(2, 1.0, refusal_at(mu), 0.01 / mu, "margin", mu)
        return measure, calls

    edge = ScalePoint(2, 1.0, 0.0, 0.0125, "protect", 0.8)
    measure, calls = measure_with(lambda mu: 0.0)
    chosen, trace = margined_point(measure, edge, 4.0, 1e-3, 0.0)
    assert chosen.protection == pytest.approx(0.2) and calls == [pytest.approx(0.2)] and trace == [chosen]
    # a drift budget the stronger edit leaves (0.05 > 0.02) keeps the edge
    chosen, _ = margined_point(measure, edge, 4.0, 1e-3, 0.0, max_drift=0.02)
    assert chosen is edge

    missed = ScalePoint(5, 1.0, 0.04, 0.03, "protect", 1.24)
    measure, calls = measure_with(lambda mu: 0.24 if mu < 1.0 else 0.04)
    chosen, trace = margined_point(measure, missed, 4.0, 1e-3, 0.0)
    assert chosen is missed and len(trace) == 1 and trace[0].refusal == 0.24
    # the target (0.1) counts as the bar when it is above the edge's refusal
    chosen, _ = margined_point(measure_with(lambda mu: 0.08)[0], missed, 4.0, 1e-3, 0.1)
    assert chosen.protection == pytest.approx(0.31)

    measure, calls = measure_with(lambda mu: 0.0)
    assert margined_point(measure, edge, 1.0, 1e-3, 0.0) == (edge, []) and calls == []
    low = ScalePoint(2, 1.0, 0.1, 0.05, "add", 1e-3)  # the edge at the search's low end: nothing lower
    assert margined_point(measure, low, 4.0, 1e-3, 0.0) == (low, []) and calls == []


def test_calibration_keeps_the_edge_when_the_margined_protection_refuses_more() -> None:
    """calibrate_table end to end on planted edits, the shape measured on an organism_deep Llama
    seed: refusal 0.25 below mu = 1, 0.04 for mu in [1, 1.5], 1.0 above; the projection never
    reaches the target. The protection search ends at the edge mu = 1.24, mu / 4 refuses 0.25, so
    the edge is kept; the comparison then only adds the capability probes there (no second
    refusal measurement) and keeps the least-squares edit."""
    import torch

    state: dict[str, float | None] = {"mu": None}
    calls = {"refusal": 0, "skill": 0}

    class Handle:
        def revert(self) -> None:
            state["mu"] = None

    def edit_at(mu: float):
        def edit(_plan):
            state["mu"] = mu
            return Handle()
        return edit

    def refusal(_model) -> float:
        calls["refusal"] += 1
        mu = state["mu"]
        if mu is None:  # the projection
            return 1.0
        return 0.04 if 1.0 <= mu <= 1.5 else (0.25 if mu < 1.0 else 1.0)

    class Shift:
        def __init__(self, key: str | None) -> None:
            self.key = key

        def shift(self, _model) -> float:
            if self.key:
                calls[self.key] += 1
            return 0.01 / state["mu"] if state["mu"] else 0.1

    table = pd.DataFrame({"layer": [0], "index": [0], "rank": [1], "alpha": [1.0]})
    bases = {0: torch.ones(1, 4)}
    compare = ProjectionCheck(lambda _plan: Handle(), Shift("skill"))
    _, chosen, trace = calibrate_table(None, table, bases, edit_at(1e-3), refusal, Shift(None), 0.0, 6,
                                       edit_at=edit_at, protect_range=(1e-3, 1e3), protect_margin=4.0,
                                       compare=compare)
    assert chosen.protection == pytest.approx(1.2409, rel=1e-3) and chosen.refusal == 0.04
    margin = [p for p in trace if p.protection is not None and p.protection < 1.0 and p.phase == "compare"]
    assert len(margin) == 1 and margin[0].refusal == 0.25  # mu / 4, measured once and left
    assert chosen.phase == "compare" and chosen.skill_drift is not None and chosen is trace[-2]
    # refusal: 1 screen + 6 protection steps + 1 margined point + 1 projection, the edge not again;
    # capability: the margined point, the edge and the projection
    assert calls["refusal"] == 9 and calls["skill"] == 3


def test_calibration_bookkeeping_screens_unmeasured_rows_and_writes_back_the_choice() -> None:
    """Rows come back in rank order; a 0 strength is screened at the weakest measured strength;
    only the chosen members keep a strength, weight x scale capped at 1."""
    table = pd.DataFrame({"layer": [3, 1, 2, 4], "index": [0, 0, 1, 2], "rank": [3, 1, 2, 4],
                          "alpha": [0.0, 0.8, 0.4, 0.6]})
    weighted = screen_weights(table)
    assert list(weighted["rank"]) == [1, 2, 3, 4]
    assert list(weighted["alpha"]) == [0.8, 0.4, 0.4, 0.6]  # rank 3 had 0: weighted like the weakest (0.4)
    chosen = with_choice(weighted, members=[0, 2], scale=2.0)
    assert list(chosen["joined"]) == [True, False, True, False]
    assert list(chosen["alpha"]) == [1.0, 0.0, 0.8, 0.0]  # 0.8 x 2 capped at 1; 0.4 x 2
    assert list(weighted["alpha"]) == [0.8, 0.4, 0.4, 0.6]  # the screened table is not changed in place
    assert list(screen_weights(table.assign(alpha=0.0))["alpha"]) == [1.0] * 4  # nothing measured: weight 1


@pytest.mark.slow
def test_default_run_on_the_shipped_organism_calibrates_itself(organism_store: Path) -> None:
    """The projection edit: directions are screened, joined and scaled on held-out probes, and
    the evaluation set loses its refusals (measured: refusal 0.00, skill 1.00, one direction at
    scale 1.19, KL mean 0.010). Then the conf defaults, no knob changed (edit.method=auto, which
    is the least-squares edit here)."""
    from saber.testing import compose_config
    from saber.run import run_pipeline

    cfg = compose_config(f"store_root={organism_store}", "edit.export=false", "edit.method=projection")
    result = run_pipeline(cfg)
    entangle = result.artifacts["entangle"]
    trace = pd.read_parquet(entangle / "calibration.parquet")
    table = pd.read_parquet(entangle / "entanglement.parquet")
    chosen = json.loads((entangle / "manifest.json").read_text())["meta"]["calibration"]
    assert (trace["phase"] == "screen").sum() == len(table)  # every selected direction is screened
    joined = table[table["joined"]]
    assert len(joined) == chosen["n_directions"] >= 1 and (table.loc[~table["joined"], "alpha"] == 0).all()
    plan = pd.read_parquet(entangle / "plan.parquet")
    assert len(plan) == len(joined) and (plan["alpha"] > 0).all() and (plan["alpha"] <= 1).all()
    # every evaluated point of the chosen set at or above the chosen scale reached the target
    same = trace[(trace["n_directions"] == chosen["n_directions"]) & (trace["phase"] != "screen")]
    assert (same.loc[same["scale"] >= chosen["scale"], "refusal"] <= cfg.iterate.target_refusal).all()
    headline = result.summary["headline"]
    assert headline["refusal_rate"] <= 0.02  # 96 eval prompts: at most 1 refusal
    assert headline["skill_delta"] >= -0.02 and headline["over_refusal_rate"] <= 0.02

    # The defaults in the same store (collect, ranking, signature and references are reused): the
    # least-squares edit, the same directions at full strength, the protection weight searched;
    # refusal at the same bar with less drift (measured: KL mean 0.0073 vs 0.0104).
    lsq_cfg = compose_config(f"store_root={organism_store}", "edit.export=false")
    lsq = run_pipeline(lsq_cfg)
    lsq_entangle = lsq.artifacts["entangle"]
    assert json.loads((lsq_entangle / "manifest.json").read_text())["meta"]["edit_method"]["method"] == "lsq"
    lsq_trace = pd.read_parquet(lsq_entangle / "calibration.parquet")
    protect = lsq_trace[lsq_trace["phase"] == "protect"]
    assert len(protect) == lsq_cfg.entangle.calibrate_steps and (lsq_entangle / "lsq.safetensors").is_file()
    mu = json.loads((lsq_entangle / "manifest.json").read_text())["meta"]["lsq_protect_weight"]
    bar = max(lsq_cfg.iterate.target_refusal,
              lsq_trace.loc[lsq_trace["phase"].isin(["screen", "add"]), "refusal"].min())
    reached = protect.loc[protect["refusal"] <= bar, "protection"]
    edge = reached.max() if len(reached) else 1e-3  # nothing reached: the search's low end stays
    assert mu == pytest.approx(max(1e-3, edge / lsq_cfg.edit.lsq.protect_margin))
    lsq_headline = lsq.summary["headline"]
    assert lsq_headline["refusal_rate"] <= 0.02 and lsq_headline["skill_delta"] >= -0.02
    assert lsq_headline["over_refusal_rate"] <= 0.02
    assert lsq_headline["kl_tf_mean"] < headline["kl_tf_mean"]
    # the method comparison measured both edits with the capability probes and kept lsq, whose
    # probe drift is lower (measured: 0.0002 against the projection's 0.021 nats/token)
    compare = lsq_trace[lsq_trace["phase"] == "compare"]
    lsq_point = compare[compare["protection"].notna()].iloc[0]
    assert compare["skill_drift"].notna().all() and lsq_point["protection"] == pytest.approx(mu)

    # With the least-squares edit at the low end of its protection (a margin no edge survives) it
    # drifts about as much as the projection at full strength, and the projection at its smallest
    # scale that reaches the target drifts less on the probes (measured: 0.0211 against 0.0221
    # nats/token; the shipped weights are fixed, so only float rounding differs between
    # machines, far below that 5% gap): the run edits by projection, with that scale.
    weak_cfg = compose_config(f"store_root={organism_store}", "edit.export=false", "edit.lsq.protect_margin=1e6")
    weak = run_pipeline(weak_cfg)
    weak_entangle = weak.artifacts["entangle"]
    meta = json.loads((weak_entangle / "manifest.json").read_text())["meta"]
    trace = pd.read_parquet(weak_entangle / "calibration.parquet")
    compare = trace[trace["phase"] == "compare"]
    lsq_point = compare[compare["protection"].notna()].iloc[0]
    reached = compare[compare["protection"].isna() & (compare["refusal"] <= weak_cfg.iterate.target_refusal)]
    best = reached.loc[(reached["drift"] + reached["skill_drift"]).idxmin()]
    assert lsq_point["protection"] == pytest.approx(1e-3)
    assert best["drift"] + best["skill_drift"] < lsq_point["drift"] + lsq_point["skill_drift"]
    assert meta["edit_method"]["method"] == "projection" and "lsq_protect_weight" not in meta
    assert not (weak_entangle / "lsq.safetensors").exists()
    assert meta["calibration"]["protection"] is None and meta["calibration"]["scale"] == pytest.approx(best["scale"])
    weak_plan = pd.read_parquet(weak_entangle / "plan.parquet")
    assert (weak_plan["alpha"] < 1).all()  # the projection's scale, below full strength
    assert weak.summary["headline"]["refusal_rate"] <= 0.02


@pytest.mark.slow
def test_measured_mode_sets_strengths_from_benefit_and_cost(organism_store: Path) -> None:
    from saber.testing import compose_config
    from saber.run import run_pipeline

    cfg = compose_config(f"store_root={organism_store}", "stages=[collect,extract,rank,entangle]",
                         "entangle.mode=measured", "entangle.calibrate=false")
    result = run_pipeline(cfg)
    table = pd.read_parquet(result.artifacts["entangle"] / "entanglement.parquet")
    assert len(table) >= 1 and table[["benefit", "cost"]].notna().all().all()
    expected = [measured_strength(b, c, cfg.entangle.alpha_base, cfg.entangle.cost_weight)
                for b, c in zip(table["benefit"], table["cost"])]
    assert table["alpha"].tolist() == pytest.approx(expected)
    # the best-ranked direction is the refusal direction: removing it alone makes refusing less likely
    assert table.sort_values("rank")["benefit"].iloc[0] > 0.05


ALPHA_PARTIAL = 0.8  # a partial removal, so that some refusal openings survive and some do not


def test_opening_kept_rate_equals_the_greedy_check_without_generating(tmp_path: Path) -> None:
    """The cheap refusal score is exact for what it claims: a refused prompt counts when the edited
    model's greedy answer still starts with the base refusal's first tokens."""
    import torch

    from saber.edit import EditConfig, EditPlan, PlanRow, apply_plan
    from saber.evaluate.generation import greedy_generate
    from saber.measured import OwnAnswers, opening_kept_rate
    from saber.model.loading import load_model
    from saber.organism import build_organism
    from saber.organism.data import read_jsonl
    from saber.organism.recipe import load_preset
    from saber.testing import compose_config

    cfg = compose_config(f"store_root={tmp_path}")
    organism = Path(build_organism(load_preset("organism"), tmp_path))  # the shipped weights, nothing trained
    model, tok = load_model(cfg.model, organism / "model")
    prompts = [r["prompt"] for r in read_jsonl(organism / "prompts" / "harmful_heldout.jsonl")][:24]
    own = OwnAnswers(model, tok, prompts, n_tokens=6, batch_size=8, system_prompt=None, max_length=256)
    refused = [True] * len(prompts)
    assert opening_kept_rate(model, tok, own, refused) == 1.0  # unedited: every opening is kept
    # partly remove the difference of means of the last prompt token at layer 3: some openings change
    harmless = [r["prompt"] for r in read_jsonl(organism / "prompts" / "harmless_heldout.jsonl")][:24]

    def mean_last(texts: list[str]) -> torch.Tensor:
        ids = OwnAnswers(model, tok, texts, n_tokens=1, batch_size=8, system_prompt=None, max_length=256).ids
        with torch.no_grad():
            return torch.stack([model(torch.tensor([i]), output_hidden_states=True).hidden_states[3][0, -1]
                                for i in ids]).mean(0)

    plan = EditPlan([PlanRow(layer=3, index=0, rank=1, alpha=ALPHA_PARTIAL, vector_key="v")],
                    {"v": mean_last(prompts) - mean_last(harmless)})
    handle = apply_plan(model, plan, EditConfig(tied_embeddings="untie"))
    try:
        cheap = opening_kept_rate(model, tok, own, refused)
        edited = greedy_generate(model, tok, own.ids, 6, 8)
    finally:
        handle.revert()
    greedy = sum(e[: len(a)] == a for e, a in zip(edited, own.answers)) / len(prompts)
    assert cheap == pytest.approx(greedy) and greedy < 1.0, (cheap, greedy)  # the edit changed some openings
    assert np.isnan(opening_kept_rate(model, tok, own, [False] * len(prompts)))  # nothing refused: NaN, no 0/0
