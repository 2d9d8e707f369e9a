"""Rank stage: FDR and AUC of every (layer, direction) on the held-out split, then selection.

It also computes every layer's capability subspace C_l (top `entangle.m` principal directions of
the fit split's capability activations) and stores it for entangle: rank.score = fdr_purity
weighs FDR by 1 - rho, and entangle measures rho against the same C_l.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saber.pipeline import StageContext, StageSpec
from stages.cli import stage_main


def build(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    from saber.collect import load_activations
    from saber.directions import load_directions
    from saber.entangle import capability_subspaces, purity_of, save_capability_subspaces
    from saber.plots import fdr_heatmap
    from saber.ranking import RANKING_TABLE, score_positions, select

    acts = load_activations(ctx.upstream["collect"].path)
    directions = load_directions(ctx.upstream["extract"].path)
    bases = {l: d.basis for l, d in directions.items()}

    def heldout_at(layer: int, position: int) -> tuple[Any, Any]:
        return (acts.get(layer, "harmful", "heldout", position=position),
                acts.get(layer, "harmless", "heldout", position=position))

    rcfg = ctx.cfg.rank
    scores = score_positions(heldout_at, bases, {l: d.positions for l, d in directions.items()}, eps=rcfg.eps,
                             split="heldout", significance=rcfg.significance,
                             n_permutations=rcfg.n_permutations, seed=rcfg.seed)
    subspaces = capability_subspaces(acts, sorted(bases), ctx.cfg.entangle.m, split="fit")
    save_capability_subspaces(subspaces, out_dir)
    purity = purity_of(scores, bases, subspaces) if rcfg.score == "fdr_purity" else None
    ranking = select(scores, ctx.cfg.rank, acts.n_layers, purity)
    ranking.to_parquet(out_dir / RANKING_TABLE, index=False)
    fdr_heatmap(ranking, out_dir / "fdr_heatmap.png")
    best = ranking.sort_values("rank").iloc[0]
    return {"selected": int(ranking["selected"].sum()), "pairs": len(ranking),
            "significant": int(ranking["significant"].sum()), "n_permutations": scores.attrs.get("n_permutations", 0),
            "best": {"layer": int(best["layer"]), "index": int(best["index"]), "position": int(best["position"]),
                     "fdr": float(best["fdr"])}}


SPEC = StageSpec(name="rank", schema_version=3, config_keys=("rank", "entangle.m"),
                 upstream=("collect", "extract"), build=build)
main = stage_main("rank")

if __name__ == "__main__":
    main()
