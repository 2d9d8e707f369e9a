"""The answer-position pass: when it runs, and which pass the run keeps (saber/escalation.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import saber.escalation as esc
from saber.iteration import IterationLog
from saber.testing import compose_config


class FakePipeline(SimpleNamespace):
    """A pipeline that only knows its config and the held-out refusal its pass leaves."""


def planted(monkeypatch: pytest.MonkeyPatch, refusal_of: dict[int, float]) -> list[int]:
    """pass_refusal reads the planted refusal of a pipeline by its collect.response_positions;
    returns the list of response_positions the second passes were run with."""
    runs: list[int] = []
    monkeypatch.setattr(esc, "pass_refusal", lambda p, i: refusal_of[p.cfg.collect.response_positions])
    monkeypatch.setattr(esc, "Pipeline", lambda cfg, store, session: FakePipeline(cfg=cfg, store=store, session=session))
    monkeypatch.setattr(esc, "run_iterations", lambda p, cfg: runs.append(cfg.collect.response_positions) or
                        IterationLog(0, "max_iterations=1"))
    return runs


def test_a_last_token_pass_that_leaves_refusal_gets_answer_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_config("iterate.escalate_positions=8", "iterate.escalate_above=0.1")
    runs = planted(monkeypatch, {0: 0.9, 8: 0.05})
    first = FakePipeline(cfg=cfg, store="store", session="session")
    pipeline, kept, log = esc.escalate(first, cfg, IterationLog(0, "max_iterations=1"))
    assert runs == [8] and kept.collect.response_positions == 8
    assert pipeline.store == "store" and pipeline.session == "session"  # same store, same loaded model
    assert "0.900 -> 0.050" in log.stop_reason and [r["heldout_refusal"] for r in log.records] == [0.9, 0.05]
    assert cfg.collect.response_positions == 0  # the caller's config is not modified


@pytest.mark.parametrize(("overrides", "refusals", "ran"), [
    (("iterate.escalate_positions=8",), {0: 0.05, 8: 0.0}, []),  # at or below escalate_above: no second pass
    (("iterate.escalate_positions=0",), {0: 0.9, 8: 0.0}, []),   # off
    (("iterate.escalate_positions=8", "collect.response_positions=4"), {4: 0.9, 8: 0.0}, []),  # asked for already
    (("iterate.escalate_positions=8",), {0: 0.5, 8: 0.5}, [8]),  # tried, not better: the last-token pass stays
])
def test_the_last_token_pass_is_kept_unless_answer_positions_lower_refusal(
        monkeypatch: pytest.MonkeyPatch, overrides: tuple[str, ...], refusals: dict[int, float], ran: list[int]) -> None:
    cfg = compose_config(*overrides)
    runs = planted(monkeypatch, refusals)
    first = FakePipeline(cfg=cfg, store="store", session="session")
    pipeline, kept, log = esc.escalate(first, cfg, IterationLog(0, "max_iterations=1"))
    assert runs == ran and pipeline is first and kept is cfg
    assert ("answer positions tried" in log.stop_reason) == bool(ran)


def test_an_iterated_answer_position_pass_is_compared_at_its_last_iteration(monkeypatch: pytest.MonkeyPatch) -> None:
    """With iterations, each pass is judged by the refusal its last kept iteration leaves, and the
    run keeps that iteration of the pass it chooses."""
    cfg = compose_config("iterate.escalate_positions=8", "iterate.escalate_above=0.1", "iterate.max_iterations=3")
    seen: list[tuple[int, int]] = []

    def refusal(p: FakePipeline, i: int) -> float:
        seen.append((p.cfg.collect.response_positions, i))
        return {(0, 2): 0.5, (8, 1): 0.02}[(p.cfg.collect.response_positions, i)]

    monkeypatch.setattr(esc, "pass_refusal", refusal)
    monkeypatch.setattr(esc, "Pipeline", lambda cfg, store, session: FakePipeline(cfg=cfg, store=store, session=session))
    monkeypatch.setattr(esc, "run_iterations", lambda p, cfg: IterationLog(1, "target refusal reached",
                                                                           [{"iteration": 0, "heldout_refusal": 0.3}]))
    first = FakePipeline(cfg=cfg, store="store", session="session")
    pipeline, kept, log = esc.escalate(first, cfg, IterationLog(2, "max_iterations=3"))
    assert seen == [(0, 2), (8, 1)]
    assert kept.collect.response_positions == 8 and log.last_iteration == 1
    assert "0.500 -> 0.020" in log.stop_reason and "target refusal reached" in log.stop_reason


def test_escalation_settings_are_checked() -> None:
    with pytest.raises(Exception, match="iterate.escalate_positions"):
        compose_config("iterate.escalate_positions=-1")
    with pytest.raises(Exception, match="iterate.escalate_above"):
        compose_config("iterate.escalate_above=1.5")


@pytest.mark.slow
def test_a_weak_fixed_edit_escalates_through_the_real_stages(organism_store: Path) -> None:
    """On the shipped organism a fixed, weak strength leaves refusal; the run then collects
    answer positions in the same store and records both passes' held-out refusal."""
    from saber.pipeline import Pipeline
    from saber.run import run_pipeline

    cfg = compose_config(f"store_root={organism_store}", "entangle.calibrate=false", "entangle.mode=uniform",
                         "entangle.alpha_base=0.05", "edit.method=projection", "edit.export=false",
                         "iterate.escalate_positions=2", "iterate.escalate_above=0.1",
                         "stages=[collect,extract,rank,entangle,edit]")
    result = run_pipeline(cfg, Pipeline(cfg))
    passes = {r["pass"]: r["heldout_refusal"] for r in result.iterations.records if "pass" in r}
    assert set(passes) == {"last token", "2 answer positions"} and passes["last token"] > 0.1
    collected = [d for d in (organism_store / "collect").iterdir() if (d / "manifest.json").is_file()]
    widths = {json.loads((d / "manifest.json").read_text())["config"]["collect"]["response_positions"]
              for d in collected}
    # the second pass published its own collect artifacts beside the first (one per iteration)
    assert widths == {0, 2}
    uses_answers = passes["2 answer positions"] < passes["last token"]
    assert ("answer positions (" in result.iterations.stop_reason) == uses_answers
