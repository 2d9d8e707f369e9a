"""Extract stage: candidate refusal directions per layer from the fit split of collect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saber.pipeline import StageContext, StageSpec
from stages.cli import stage_main


def build(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    from saber.collect import load_activations
    from saber.directions import extract_layer, join_positions, save_directions

    acts = load_activations(ctx.upstream["collect"].path)
    cfg = ctx.cfg.extract
    positions = list(cfg.positions) if cfg.positions is not None else acts.position_labels
    missing = sorted(set(positions) - set(acts.position_labels))
    if missing:
        raise ValueError(f"extract.positions {missing} were not captured by collect (it holds "
                         f"{acts.position_labels}); raise collect.positions or collect.response_positions, "
                         "or set extract.positions=null (every captured position)")
    layers = {l: join_positions({p: extract_layer(acts.get(l, "harmful", "fit", position=p),
                                                  acts.get(l, "harmless", "fit", position=p), cfg,
                                                  layer=l, split="fit")
                                 for p in positions})
              for l in acts.layers}
    save_directions(layers, out_dir)
    return {"layers": len(layers), "k": cfg.k, "method": cfg.method, "n_layers": acts.n_layers,
            "positions": positions}


SPEC = StageSpec(name="extract", schema_version=2, config_keys=("extract",), upstream=("collect",),
                 build=build)
main = stage_main("extract")

if __name__ == "__main__":
    main()
