"""Reference stages: the base model's half of an evaluation, computed once per model and config.

`reference` holds the base answers, refusal labels, teacher-forced distributions and capability
scores on the evaluation sets; `probe_reference` holds the same on collect's held-out probe
prompts (what sweeps and searches choose on). Evaluate builds them on demand, so every sweep
trial and iteration reuses them; forcing evaluate rebuilds them too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saber.pipeline import StageContext, StageSpec
from stages.cli import stage_main
from stages.signature import signature_upstream

SCHEMA_VERSION = 4
CONFIG_KEYS = ("model", "evaluate", "data")
EDITED_SIDE_ONLY = ("evaluate.adapter",)  # settings of the edited model, not of the base reference


def _write(ctx: StageContext, sets: Any, out_dir: Path) -> dict[str, Any]:
    from saber.evaluate import build_reference, save_reference
    from saber.evaluate.settings import run_settings

    base, tokenizer = ctx.load_model(with_plans=False)
    save_reference(build_reference(base, tokenizer, sets, run_settings(ctx.cfg), ctx.pipeline.refusal_scorer()),
                   out_dir)
    return {"n_harmful": len(sets.harmful), "n_harmless": len(sets.harmless)}


def build_evaluation(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    from saber.evaluate.sets import load_eval_sets

    return _write(ctx, load_eval_sets(ctx.cfg.evaluate, ctx.cfg.data, ctx.prompt_roots()), out_dir)


def build_probes(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    from saber.evaluate.sets import heldout_eval_sets

    return _write(ctx, heldout_eval_sets(ctx.upstream["collect"].path), out_dir)


SPEC = StageSpec(name="reference", schema_version=SCHEMA_VERSION, config_keys=CONFIG_KEYS,
                 upstream=signature_upstream, build=build_evaluation, base_model_only=True, part_of="evaluate",
                 exclude_keys=EDITED_SIDE_ONLY)
PROBE_SPEC = StageSpec(name="probe_reference", schema_version=SCHEMA_VERSION, config_keys=CONFIG_KEYS,
                       upstream=lambda cfg: ("collect", *signature_upstream(cfg)), build=build_probes, base_model_only=True,
                       part_of="evaluate", exclude_keys=EDITED_SIDE_ONLY)
main = stage_main("reference")

if __name__ == "__main__":
    main()
