"""A second pass with answer-position directions, where the last prompt token does not carry refusal.

Some models do not decide to refuse at the last prompt token: their refusal opens with the same
words as a helpful answer and parts from it several tokens in (docs/ORGANISM.md, `organism_deep`).
No last-token direction removes that refusal, while directions read at the first answer positions
do (docs/BENCHMARKS.md). Collecting answer positions costs a generation pass and doubles the
candidate pool, so it is not the first pass: when the calibrated last-token pass still leaves
held-out refusal above `iterate.escalate_above`, the run collects again with
`collect.response_positions = iterate.escalate_positions` and keeps whichever pass leaves less
held-out refusal on the probes (the first one on a tie). Evaluation sets are never read.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from saber.config import SaberConfig
from saber.iteration import IterationLog, heldout_refusal, run_iterations
from saber.pipeline import Pipeline

log = logging.getLogger("saber.escalation")


def pass_refusal(pipeline: Pipeline, iteration: int) -> float:
    """Held-out refusal of a pass: the calibration's chosen point (no new generation), or the
    iteration check when the strengths were not calibrated."""
    calibration = pipeline.ensure("entangle", iteration).manifest.get("meta", {}).get("calibration")
    if calibration is not None:
        return float(calibration["refusal"])
    return heldout_refusal(pipeline, iteration)


def wants_answer_positions(cfg: SaberConfig) -> bool:
    """Whether this run may escalate: on, and no answer positions asked for already."""
    return cfg.iterate.escalate_positions > 0 and cfg.collect.response_positions == 0


def escalate(pipeline: Pipeline, cfg: SaberConfig, first: IterationLog) -> tuple[Pipeline, SaberConfig, IterationLog]:
    """The pass the run keeps (its pipeline, config and iteration log): the answer-position pass
    when it is needed and leaves less held-out refusal than the last-token pass, else this one."""
    if not wants_answer_positions(cfg):
        return pipeline, cfg, first
    before = pass_refusal(pipeline, first.last_iteration)
    if before <= cfg.iterate.escalate_above:
        return pipeline, cfg, first
    r = cfg.iterate.escalate_positions
    log.info("held-out refusal %.3f after the last-token pass is above iterate.escalate_above = %g: "
             "collecting %d answer positions too", before, cfg.iterate.escalate_above, r)
    wider = dataclasses.replace(cfg, collect=dataclasses.replace(cfg.collect, response_positions=r))
    second = Pipeline(wider, store=pipeline.store, session=pipeline.session)
    wide = run_iterations(second, wider)
    after = pass_refusal(second, wide.last_iteration)
    records = [*first.records, {"pass": "last token", "heldout_refusal": before},
               *wide.records, {"pass": f"{r} answer positions", "heldout_refusal": after}]
    if after < before:
        log.info("answer positions: held-out refusal %.3f -> %.3f; the run uses them", before, after)
        return second, wider, IterationLog(wide.last_iteration,
                                           f"answer positions ({before:.3f} -> {after:.3f} held-out refusal; "
                                           f"{wide.stop_reason})", records)
    log.info("answer positions: held-out refusal %.3f, not below %.3f; the run keeps the last-token pass",
             after, before)
    kept = f"{first.stop_reason}; answer positions tried ({after:.3f} held-out refusal, not below {before:.3f})"
    return pipeline, cfg, IterationLog(first.last_iteration, kept, records)
