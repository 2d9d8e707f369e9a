"""Entangle stage: capability overlap of the selected directions, strengths, and the edit plan.

Iteration i scales every strength by iterate.alpha_decay ** i, so `iterate` is part of this
stage's fingerprint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from saber.pipeline import StageContext, StageSpec
from stages.cli import stage_main

log = logging.getLogger("stages.entangle")


def build(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    import pandas as pd

    from saber.collect import load_activations
    from saber.directions import load_directions
    from saber.entangle import (ENTANGLEMENT_TABLE, capability_subspaces, entanglement_table,
                                plan_rows, save_plan_files)
    from saber.plots import entanglement_scatter
    from saber.ranking import RANKING_TABLE

    cfg = ctx.cfg.entangle
    acts = load_activations(ctx.upstream["collect"].path)
    bases = {l: d.basis for l, d in load_directions(ctx.upstream["extract"].path).items()}
    ranking = pd.read_parquet(ctx.upstream["rank"].file(RANKING_TABLE))
    selected = ranking[ranking["selected"]]
    if selected.empty:
        log.warning("rank selected no (layer, direction) pair: the edit plan is empty")
    subspaces = capability_subspaces(acts, sorted(selected["layer"].unique().tolist()), cfg.m, split="fit")
    decay = ctx.cfg.iterate.alpha_decay ** ctx.iteration
    table = entanglement_table(selected, bases, subspaces, cfg, acts.n_layers, decay)
    table.to_parquet(out_dir / ENTANGLEMENT_TABLE, index=False)
    plan, vectors = plan_rows(table, bases, subspaces, cfg, decay)
    save_plan_files(plan, vectors, out_dir)
    entanglement_scatter(table, cfg.tau, out_dir / "entanglement.png")
    return {"directions": len(table), "plan_rows": len(plan), "decay": decay,
            "entangled": int((table["class"] == "entangled").sum())}


SPEC = StageSpec(name="entangle", schema_version=1, config_keys=("entangle", "iterate.alpha_decay"),
                 upstream=("collect", "extract", "rank"), build=build)
main = stage_main("entangle")

if __name__ == "__main__":
    main()
