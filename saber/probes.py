"""Probe sets: fit and held-out parts per kind, their leakage checks, and counts known up front.

Collect reads the splits from here; the runner calls `check_counts` before any model work, so a
count knob that the prompt sets cannot satisfy fails at start-up with the knob's name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from saber.config.schema import ConfigError

log = logging.getLogger("saber.probes")

KINDS = ("harmful", "harmless", "capability")
EVAL_SETS = ("harmful_eval", "harmless_eval")


def _configured(source: Any) -> bool:
    return source is not None and (source.path is not None or source.hf is not None)


def load_probe_splits(data: Any, roots: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Per kind, {"fit": PromptSet, "heldout": PromptSet}; explicit held-out sets win over splits.

    Raises ValueError when a probe prompt also appears in an evaluation set or in another kind.
    """
    from saber.prompts import assert_disjoint, load_prompts, split_fit_heldout

    splits: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        full = load_prompts(getattr(data, kind), f"data.{kind}", roots)
        explicit = getattr(data, f"{kind}_heldout")
        if _configured(explicit):
            held = load_prompts(explicit, f"data.{kind}_heldout", roots)
            assert_disjoint(full, held)
            splits[kind] = {"fit": full, "heldout": held}
        else:
            fit, held = split_fit_heldout(full, data.heldout_fraction, data.seed)
            splits[kind] = {"fit": fit, "heldout": held}
    for name in EVAL_SETS:
        source = getattr(data, name)
        if not _configured(source):
            log.info("data.%s is not configured; skipping its overlap check", name)
            continue
        eval_set = load_prompts(source, f"data.{name}", roots)
        for kind in ("harmful", "harmless"):
            for part in splits[kind].values():
                assert_disjoint(part, eval_set)
    for part_a in splits["harmful"].values():
        for part_b in splits["harmless"].values():
            assert_disjoint(part_a, part_b)
    return splits


def prompt_frame(splits: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per prompt: kind by kind, fit rows then held-out rows (n_tokens filled later)."""
    rows = [(kind, split, text) for kind, parts in splits.items()
            for split in ("fit", "heldout") for text in parts[split].texts]
    frame = pd.DataFrame(rows, columns=["kind", "split", "text"])
    frame.insert(0, "id", range(len(frame)))
    frame["n_tokens"] = 0
    return frame


def check_counts(cfg: Any, splits: dict[str, dict[str, Any]]) -> None:
    """ConfigError naming the knob when the probe sets are too small for extract.k, entangle.m or the split."""
    sizes = {kind: {split: len(parts[split]) for split in parts} for kind, parts in splits.items()}
    for kind, parts in sizes.items():
        if min(parts.values()) < 2:
            raise ConfigError(
                f"config key 'data.heldout_fraction' = {cfg.data.heldout_fraction}: data.{kind} splits into "
                f"{parts['fit']} fit and {parts['heldout']} held-out prompts; each part needs at least 2. "
                f"Add {kind} prompts or change data.heldout_fraction")
    n_harmful = sizes["harmful"]["fit"]
    if cfg.extract.method == "svd" and cfg.extract.k > n_harmful:
        raise ConfigError(f"config key 'extract.k' = {cfg.extract.k}: data.harmful has only {n_harmful} fit "
                          "prompts, and D = H - mean(A) has rank at most that; lower extract.k or add prompts")
    n_capability = sizes["capability"]["fit"]
    if cfg.entangle.m + 1 > n_capability:
        raise ConfigError(f"config key 'entangle.m' = {cfg.entangle.m}: data.capability has only {n_capability} "
                          "fit prompts and a rank-m subspace needs at least m + 1; lower entangle.m or add prompts")
