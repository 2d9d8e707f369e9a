"""Measured entanglement and the strength search: continuous strengths, bounded bisection, real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from saber.measured import measured_strength, search_scale


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

    def evaluate(s: float) -> tuple[float, float]:  # planted: refusal falls linearly to 0 at s = 0.7
        calls.append(s)
        return max(0.0, 1.0 - s / 0.7), s**2

    best, trace = search_scale(evaluate, 1.0, 0.0, steps=10)
    assert 0.7 <= best.scale <= 0.7 + 1.0 / 2**10 and len(calls) == 11 and trace[0].scale == 1.0
    assert best in trace and best.refusal <= 0.0 and best.drift == pytest.approx(best.scale**2)
    assert all(p.refusal <= 0.0 for p in trace if p.scale >= best.scale)
    # even full strength misses the target: the strongest allowed edit, after one evaluation
    best, trace = search_scale(lambda s: (0.5, s), 2.0, 0.0, steps=5)
    assert best.scale == 2.0 and len(trace) == 1


@pytest.mark.slow
def test_calibrated_run_on_the_shipped_organism(organism_store: Path) -> None:
    """One direction at a calibrated uniform strength removes refusal on held-out probes and on the
    evaluation set (measured: evaluation refusal 0.00 at scale 1.04 with 7 evaluations)."""
    from configs import compose_config
    from saber.run import run_pipeline

    cfg = compose_config(f"store_root={organism_store}", "edit.export=false", "rank.top_k=1",
                         "entangle.mode=uniform", "entangle.alpha_base=0.9", "entangle.calibrate=true")
    result = run_pipeline(cfg)
    trace = pd.read_parquet(result.artifacts["entangle"] / "calibration.parquet")
    assert len(trace) == 1 + cfg.entangle.calibrate_steps and trace["scale"].iloc[0] == pytest.approx(1 / 0.9)
    manifest = json.loads((result.artifacts["entangle"] / "manifest.json").read_text())
    chosen = manifest["meta"]["calibration"]["scale"]
    assert chosen < trace["scale"].iloc[0]  # the target was reached below full strength
    assert (trace.loc[trace["scale"] >= chosen, "refusal"] <= cfg.iterate.target_refusal).all()
    plan = pd.read_parquet(result.artifacts["entangle"] / "plan.parquet")
    assert plan["alpha"].iloc[0] == pytest.approx(min(1.0, 0.9 * chosen))
    assert result.summary["headline"]["refusal_rate"] <= 0.05  # 96 eval prompts: at most 4 refusals
    assert result.summary["headline"]["skill_accuracy"] >= 0.95


@pytest.mark.slow
def test_measured_mode_sets_strengths_from_benefit_and_cost(organism_store: Path) -> None:
    from configs import compose_config
    from saber.run import run_pipeline

    cfg = compose_config(f"store_root={organism_store}", "stages=[collect,extract,rank,entangle]",
                         "entangle.mode=measured")
    result = run_pipeline(cfg)
    table = pd.read_parquet(result.artifacts["entangle"] / "entanglement.parquet")
    assert len(table) >= 1 and table[["benefit", "cost"]].notna().all().all()
    expected = [measured_strength(b, c, cfg.entangle.alpha_base, cfg.entangle.cost_weight)
                for b, c in zip(table["benefit"], table["cost"])]
    assert table["alpha"].tolist() == pytest.approx(expected)
    # the best-ranked direction is the refusal direction: removing it alone makes refusing less likely
    assert table.sort_values("rank")["benefit"].iloc[0] > 0.05
