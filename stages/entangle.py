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
    effects = measured_effects(ctx, acts, bases, selected) if cfg.mode == "measured" else None
    table = entanglement_table(selected, bases, subspaces, cfg, acts.n_layers, decay, effects)
    meta: dict[str, Any] = {}
    if cfg.calibrate and not table.empty and table["alpha"].max() > 0:
        scale, trace = calibrate(ctx, acts, bases, table)
        table["alpha"] = (table["alpha"] * scale).clip(upper=1.0)
        pd.DataFrame([vars(p) for p in trace]).to_parquet(out_dir / "calibration.parquet", index=False)
        meta["calibration"] = {"scale": scale, "evaluations": len(trace),
                               "refusal": next(p.refusal for p in trace if p.scale == scale) if
                               any(p.scale == scale for p in trace) else None}
    table.to_parquet(out_dir / ENTANGLEMENT_TABLE, index=False)
    plan, vectors = plan_rows(table, bases, subspaces, cfg, decay)
    save_plan_files(plan, vectors, out_dir)
    entanglement_scatter(table, cfg.tau, out_dir / "entanglement.png")
    return {"directions": len(table), "plan_rows": len(plan), "decay": decay,
            "entangled": int((table["class"] == "entangled").sum()), **meta}


def calibrate(ctx: StageContext, acts: Any, bases: dict, table: Any) -> tuple[float, list]:
    """Global strength scale: least drift that reaches iterate.target_refusal on held-out harmful probes.

    Every evaluation applies the whole plan in memory (exact revert after), generates answers to
    the held-out harmful probe prompts and scores them with the evaluation's own scorer; drift is
    the NLL increase of the model's own answers to held-out harmless probes. Evaluation sets are
    never read.
    """
    from saber.edit import EditConfig, EditPlan, PlanRow, apply_plan
    from saber.evaluate import make_scorer, refusal_rate
    from saber.evaluate.generation import encode_prompts, greedy_generate
    from saber.measured import mean_nll, search_scale
    from stages.evaluate import run_settings

    cfg = ctx.cfg
    settings = run_settings(cfg)
    scorer = make_scorer(settings)
    harmful = acts.rows("harmful", "heldout")["text"].tolist()
    harmless = acts.rows("harmless", "heldout")["text"].tolist()[: cfg.entangle.measure_prompts]
    earlier = [ctx.pipeline.ensure("entangle", j) for j in range(ctx.iteration)]
    model, tokenizer = ctx.pipeline.load_model(earlier)
    edit_cfg = EditConfig(scope=cfg.edit.scope, roles=list(cfg.edit.roles),
                          sandwich_correction=cfg.edit.sandwich_correction, tied_embeddings="untie")
    a_ids = encode_prompts(tokenizer, harmless, cfg.model.system_prompt, cfg.collect.max_length)
    a_ans = greedy_generate(model, tokenizer, a_ids, cfg.entangle.measure_tokens, cfg.evaluate.batch_size)
    base_drift = mean_nll(model, tokenizer, a_ids, a_ans, cfg.evaluate.batch_size)
    rows = list(table.sort_values("rank").itertuples(index=False))

    def evaluate(scale: float) -> tuple[float, float]:
        plan_rows = [PlanRow(layer=int(r.layer), index=int(r.index), rank=i + 1,
                             alpha=min(1.0, float(r.alpha) * scale), vector_key=f"v{i}") for i, r in enumerate(rows)]
        plan = EditPlan(plan_rows, {f"v{i}": bases[int(r.layer)][int(r.index)].float() for i, r in enumerate(rows)})
        handle = apply_plan(model, plan, edit_cfg)
        try:
            refusal = float(refusal_rate(model, tokenizer, harmful, settings, scorer))
            drift = mean_nll(model, tokenizer, a_ids, a_ans, cfg.evaluate.batch_size) - base_drift
        finally:
            handle.revert()
        log.info("calibration: scale %.4f -> held-out refusal %.3f, drift %.4f nats/token", scale, refusal, drift)
        return refusal, drift

    s_max = 1.0 / float(table["alpha"].max())
    return search_scale(evaluate, s_max, cfg.iterate.target_refusal, cfg.entangle.calibrate_steps)


def measured_effects(ctx: StageContext, acts: Any, bases: dict, selected: Any) -> dict[tuple[int, int], tuple[float, float]]:
    """Benefit and cost of each selected direction, ablated alone on the model this iteration probes."""
    from saber.edit import EditConfig
    from saber.measured import measure_effects

    cfg = ctx.cfg
    n = cfg.entangle.measure_prompts
    harmful = acts.rows("harmful", "fit")["text"].tolist()[:n]
    # what the edit must not change: the model's own answers to capability and harmless prompts
    capability = acts.rows("capability", "fit")["text"].tolist()[:n] + acts.rows("harmless", "fit")["text"].tolist()[:n]
    earlier = [ctx.pipeline.ensure("entangle", j) for j in range(ctx.iteration)]  # what collect[i] probed
    model, tokenizer = ctx.pipeline.load_model(earlier)
    edit_cfg = EditConfig(scope=cfg.edit.scope, roles=list(cfg.edit.roles),
                          sandwich_correction=cfg.edit.sandwich_correction, tied_embeddings="untie")
    directions = [(int(r.layer), int(r.index), bases[int(r.layer)][int(r.index)].float())
                  for r in selected.itertuples(index=False)]
    effects = measure_effects(model, tokenizer, directions, harmful, capability, edit_cfg,
                              n_tokens=cfg.entangle.measure_tokens, batch_size=cfg.evaluate.batch_size,
                              system_prompt=cfg.model.system_prompt, max_length=cfg.collect.max_length)
    for e in effects:
        log.info("layer %d direction %d: benefit %.4f, cost %.4f nats/token", e.layer, e.index, e.benefit, e.cost)
    return {(e.layer, e.index): (e.benefit, e.cost) for e in effects}


# measured mode and calibration remove directions with the edit's own writer settings and score
# refusal with the evaluation's scorer, so those keys are part of this stage's fingerprint
SPEC = StageSpec(name="entangle", schema_version=1,
                 config_keys=("entangle", "iterate.alpha_decay", "iterate.target_refusal", "edit.scope",
                              "edit.roles", "edit.sandwich_correction", "evaluate.scorer", "evaluate.markers",
                              "evaluate.prefixes", "evaluate.judge_path", "evaluate.judge_refusal_labels",
                              "evaluate.judge_pair", "evaluate.max_new_tokens", "evaluate.batch_size",
                              "evaluate.max_prompt_tokens"),
                 upstream=("collect", "extract", "rank"), build=build)
main = stage_main("entangle")

if __name__ == "__main__":
    main()
