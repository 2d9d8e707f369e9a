"""Pareto front and sweep report on planted job summaries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saber.search import parse_space
from saber.sweep import pareto_mask, write_report


def test_pareto_mask_planted() -> None:
    values = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0], [0.6, 0.6], [0.5, 0.5], [np.nan, 0.0]])
    # (0.6, 0.6) is dominated by (0.5, 0.5); duplicates do not dominate each other; NaN never on the front.
    assert pareto_mask(values).tolist() == [True, True, True, False, True, False]


def test_pareto_mask_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    values = rng.random((40, 3))
    expected = [not any((values[j] <= values[i]).all() and (values[j] < values[i]).any() for j in range(40))
                for i in range(40)]
    assert pareto_mask(values).tolist() == expected


def test_write_report(tmp_path: Path) -> None:
    points = {"0": (0.0, 0.3), "1": (0.1, 0.1), "2": (0.2, 0.2), "3": (0.5, 0.01)}
    for job, (refusal, kl) in points.items():
        (tmp_path / job).mkdir()
        (tmp_path / job / "run_summary.json").write_text(json.dumps(
            {"overrides": [f"x={job}"], "headline": {"probe_refusal_rate": refusal, "probe_kl_tf_mean": kl,
                                                      "refusal_rate": 1.0 - refusal, "kl_tf_mean": kl}}))
    front = write_report(tmp_path)  # chosen on the held-out probe metrics; the evaluation ones only report
    assert sorted(front.job) == ["0", "1", "3"]
    for name in ("sweep.parquet", "pareto.parquet", "pareto.png", "leaderboard.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert len(pd.read_parquet(tmp_path / "sweep.parquet")) == 4
    board = (tmp_path / "leaderboard.md").read_text()
    assert "Pareto front (3 of 4 jobs)" in board and "chosen on the held-out probe prompts" in board
    assert "refusal_rate" in board.split("\n\n## All jobs")[0].split("| job |")[1]  # reported beside the objectives


def test_report_names_missing_objective(tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "run_summary.json").write_text(json.dumps({"headline": {"probe_refusal_rate": 0.1}}))
    with pytest.raises(KeyError, match="probe_kl_tf_mean"):
        write_report(tmp_path)


def test_parse_space() -> None:
    space = parse_space({"a": "int:1:5", "b": "float:0.1:0.9", "c": "cat:x,2"})
    assert space == {"a": ("int", (1, 5)), "b": ("float", (0.1, 0.9)), "c": ("cat", ["x", 2])}
    with pytest.raises(ValueError, match="search.space.d"):
        parse_space({"d": "gauss:0:1"})
