"""The stage list: one source for the schema default, the runner, iteration, the shells and tests."""

from __future__ import annotations

# What `python -m saber.run` executes, in order.
STAGE_ORDER: tuple[str, ...] = ("collect", "extract", "rank", "entangle", "edit", "evaluate")
# The stages each iteration re-runs on the model edited by the earlier iterations' plans.
ANALYSIS_STAGES: tuple[str, ...] = STAGE_ORDER[:4]
# Stages the others read but the runner does not list: built on demand through the store.
AUXILIARY: tuple[str, ...] = ("signature", "reference", "probe_reference", "iteration_check")
