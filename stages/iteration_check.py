"""Iteration check stage: held-out harmful refusal with plans 0..i applied, for the stopping rules.

It measures the probe split (never the evaluation set) on the base model with this iteration's
and every earlier plan applied in memory; saber.iteration reads `check.json`. As an artifact of
its own, a rerun of a finished configuration repeats no generation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saber.iteration import CHECK_FILE
from saber.pipeline import StageContext, StageSpec
from stages.cli import stage_main
from stages.signature import signature_upstream


def build(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    from saber.evaluate import refusal_rate
    from saber.evaluate.sets import heldout_eval_sets
    from saber.evaluate.settings import run_settings

    texts = heldout_eval_sets(ctx.upstream["collect"].path).harmful
    scorer = ctx.pipeline.refusal_scorer()
    model, tokenizer = ctx.load_model()
    rate = float(refusal_rate(model, tokenizer, texts, run_settings(ctx.cfg), scorer))
    (out_dir / CHECK_FILE).write_text(json.dumps({"heldout_refusal": rate, "n": len(texts)}))
    return {"heldout_refusal": rate}


# collect is read at iteration 0: its held-out split is the same in every iteration.
SPEC = StageSpec(name="iteration_check", schema_version=2, config_keys=("evaluate", "edit"),
                 upstream=lambda cfg: ("collect@0", *signature_upstream(cfg)), build=build,
                 reads_plans=True)
main = stage_main("iteration_check")

if __name__ == "__main__":
    main()
