"""Extract stage: candidate refusal directions per layer from the fit split of collect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saber.pipeline import StageContext, StageSpec
from stages.cli import stage_main


def build(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    from saber.collect import load_activations
    from saber.directions import extract_layer, save_directions

    acts = load_activations(ctx.upstream["collect"].path)
    cfg = ctx.cfg.extract
    layers = {l: extract_layer(acts.get(l, "harmful", "fit"), acts.get(l, "harmless", "fit"), cfg,
                               layer=l, split="fit")
              for l in acts.layers}
    save_directions(layers, out_dir)
    return {"layers": len(layers), "k": cfg.k, "method": cfg.method, "n_layers": acts.n_layers}


SPEC = StageSpec(name="extract", schema_version=1, config_keys=("extract",), upstream=("collect",),
                 build=build)
main = stage_main("extract")

if __name__ == "__main__":
    main()
