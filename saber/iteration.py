"""Iterative refinement: re-probe the edited model and edit again until a stopping rule fires.

Iteration i collects on the model edited by plans 0..i-1, extracts, ranks and plans again; with
fixed strengths (entangle.calibrate=false) they are scaled by alpha_decay**i, with calibration
each pass finds its own. After each plan the runner measures held-out refusal on the
probe split (never the evaluation set) with plans 0..i applied in memory, and stops when

- refusal is at or below `iterate.target_refusal` (keep plans 0..i);
- refusal did not improve on the previous iteration (drop plan i, keep 0..i-1);
- the next iteration's primary direction has |cos| >= `iterate.stability_cos` with this one's
  and its held-out FDR is at most `iterate.stability_fdr` of the first iteration's (the geometry
  stopped moving and little separation is left: keep 0..i; an incomplete removal also leaves a
  stable direction, but one that still separates, so iteration goes on);
- `iterate.max_iterations` is reached.

The refusal measurement is an artifact of its own (stage `iteration_check`), so a rerun of a
finished configuration repeats no generation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch
from safetensors.torch import load_file

from saber.config import SaberConfig
from saber.pipeline import Pipeline
from saber.stage_names import ANALYSIS_STAGES

log = logging.getLogger("saber.iteration")
CHECK_FILE = "check.json"  # written by the iteration_check stage


@dataclass
class IterationLog:
    """Which iteration's plans the edit uses, why iteration stopped, and what was measured."""

    last_iteration: int
    stop_reason: str
    records: list[dict[str, Any]] = field(default_factory=list)


def primary_direction(rank_dir: Path, directions_dir: Path) -> tuple[int, torch.Tensor]:
    """The best-ranked (layer, direction) of an iteration, as (layer, unit vector)."""
    ranking = pd.read_parquet(rank_dir / "ranking.parquet")
    best = ranking.sort_values("rank").iloc[0]
    layer, index = int(best["layer"]), int(best["index"])
    basis = load_file(str(directions_dir / "directions.safetensors"))[f"layer{layer}.basis"]
    return layer, basis[index].double()


def heldout_refusal(pipeline: Pipeline, iteration: int) -> float:
    """Held-out harmful refusal with plans 0..iteration applied (stage `iteration_check`)."""
    art = pipeline.ensure("iteration_check", iteration)
    return float(json.loads(art.file(CHECK_FILE).read_text())["heldout_refusal"])


def _primary_fdr(pipeline: Pipeline, i: int) -> float:
    """Held-out FDR of iteration i's best-ranked pair (on the model iteration i probed)."""
    ranking = pd.read_parquet(pipeline.ensure("rank", i).path / "ranking.parquet")
    return float(ranking.sort_values("rank").iloc[0]["fdr"])


def _stability(pipeline: Pipeline, i: int) -> float:
    """|cos| between the primary directions of iterations i-1 and i (0 if from different layers)."""
    layer_a, v_a = primary_direction(pipeline.ensure("rank", i - 1).path, pipeline.ensure("extract", i - 1).path)
    layer_b, v_b = primary_direction(pipeline.ensure("rank", i).path, pipeline.ensure("extract", i).path)
    if layer_a != layer_b:
        return 0.0
    return float(abs(torch.dot(v_a, v_b) / (v_a.norm() * v_b.norm())))


def run_iterations(pipeline: Pipeline, cfg: SaberConfig) -> IterationLog:
    """Run analysis iterations and decide which plans the final edit uses."""
    n = cfg.iterate.max_iterations
    for stage in ANALYSIS_STAGES:
        pipeline.ensure(stage, 0)
    if n == 1:
        return IterationLog(0, "max_iterations=1")
    records: list[dict[str, Any]] = []
    previous: Optional[float] = None
    for i in range(n):
        refusal = heldout_refusal(pipeline, i)
        records.append({"iteration": i, "heldout_refusal": refusal})
        log.info("iteration %d: held-out refusal %.3f", i, refusal)
        if refusal <= cfg.iterate.target_refusal:
            return IterationLog(i, "target refusal reached", records)
        if previous is not None and refusal >= previous:
            return IterationLog(i - 1, "no improvement", records)
        if i == n - 1:
            return IterationLog(i, f"max_iterations={n}", records)
        previous = refusal
        for stage in ANALYSIS_STAGES:
            pipeline.ensure(stage, i + 1)
        cos = _stability(pipeline, i + 1)
        left = _primary_fdr(pipeline, i + 1) / max(_primary_fdr(pipeline, 0), 1e-12)
        records[-1].update(next_primary_cos=cos, next_primary_fdr_share=left)
        # a stable direction that still separates is a partial removal: edit again
        if cos >= cfg.iterate.stability_cos and left <= cfg.iterate.stability_fdr:
            return IterationLog(i, "direction stable", records)
    raise AssertionError("unreachable: the loop returns at i == n - 1")
