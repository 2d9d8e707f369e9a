"""Stopping rules of iterative refinement, on planted measurements (no model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import saber.iteration as iteration


class NoStages:
    """A pipeline whose stages cost nothing: the rules read only the patched measurements."""

    def ensure(self, stage: str, i: int = 0) -> None:
        return None


def run(monkeypatch: pytest.MonkeyPatch, refusals: list[float], fdr: list[float], cos: float = 0.99):
    cfg = SimpleNamespace(iterate=SimpleNamespace(max_iterations=len(refusals), target_refusal=0.0,
                                                  stability_cos=0.98, stability_fdr=0.1))
    monkeypatch.setattr(iteration, "heldout_refusal", lambda p, i: refusals[i])
    monkeypatch.setattr(iteration, "_stability", lambda p, i: cos)
    monkeypatch.setattr(iteration, "_primary_fdr", lambda p, i: fdr[i])
    return iteration.run_iterations(NoStages(), cfg)


def test_a_stable_direction_that_still_separates_is_edited_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # pass 1 leaves the same direction with half its separation: a partial removal, not a stop
    log = run(monkeypatch, [0.5, 0.3, 0.2], [10.0, 5.0, 0.5])
    assert log.stop_reason == "direction stable" and log.last_iteration == 1
    assert log.records[0]["next_primary_fdr_share"] == pytest.approx(0.5)
    assert log.records[1]["next_primary_fdr_share"] == pytest.approx(0.05)


def test_a_stable_direction_with_no_separation_left_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    log = run(monkeypatch, [0.5, 0.3, 0.2], [10.0, 0.5, 0.1])
    assert log.stop_reason == "direction stable" and log.last_iteration == 0
    # a moving direction never stops for stability, whatever the separation left
    log = run(monkeypatch, [0.5, 0.3, 0.2], [10.0, 0.5, 0.1], cos=0.5)
    assert log.stop_reason == "max_iterations=3" and log.last_iteration == 2
