"""Entangle stage: capability overlap of the selected directions, strengths, and the edit plan.

With fixed strengths, iteration i scales every strength by iterate.alpha_decay ** i (calibrated
passes find their own), so `iterate` is part of this stage's fingerprint.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from saber.pipeline import StageContext, StageSpec
from stages.cli import stage_main
from stages.signature import SCORER_KEYS

log = logging.getLogger("stages.entangle")


def build(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    import pandas as pd

    from saber.collect import load_activations
    from saber.directions import load_directions
    from saber.entangle import (ENTANGLEMENT_TABLE, entanglement_table, load_capability_subspaces, null_tau,
                                plan_rows, save_plan_files)
    from saber.edit.lsq import projection_only
    from saber.plots import entanglement_scatter
    from saber.ranking import RANKING_TABLE

    cfg = ctx.cfg.entangle
    acts = load_activations(ctx.upstream["collect"].path)
    bases = {l: d.basis for l, d in load_directions(ctx.upstream["extract"].path).items()}
    ranking = pd.read_parquet(ctx.upstream["rank"].file(RANKING_TABLE))
    selected = ranking[ranking["selected"]]
    if selected.empty:
        log.warning("rank selected no (layer, direction) pair: the edit plan is empty")
    subspaces = load_capability_subspaces(ctx.upstream["rank"].path)
    tau = cfg.tau if cfg.tau is not None else null_tau(ranking, bases, subspaces, cfg.tau_quantile)
    if tau is None:
        log.warning("entangle.tau = null but fewer than 3 ranked pairs lack a refusal signal to calibrate it on; "
                    "no direction is classed entangled (set entangle.tau to fix a threshold)")
        tau = 1.0
    cfg = dataclasses.replace(cfg, tau=tau)
    # a calibrated pass finds its own strength; decay would only stop it short of the target
    decay = 1.0 if cfg.calibrate else ctx.cfg.iterate.alpha_decay ** ctx.iteration
    may_lsq = projection_only(ctx.cfg.edit, cfg.calibrate) is None and not selected.empty
    m = _measuring(ctx, acts, bases, selected) if (cfg.mode == "measured" or cfg.calibrate or may_lsq) else None
    effects = measured_effects(ctx, m, acts, bases, selected) if cfg.mode == "measured" else None
    table = entanglement_table(selected, bases, subspaces, cfg, acts.n_layers, decay, effects)
    meta: dict[str, Any] = {}
    if cfg.calibrate and not table.empty:
        table, chosen, trace = calibrate(ctx, m, acts, table, bases)
        pd.DataFrame([vars(p) for p in trace]).to_parquet(out_dir / "calibration.parquet", index=False)
        meta["calibration"] = {**vars(chosen), "evaluations": len(trace)}
    table.to_parquet(out_dir / ENTANGLEMENT_TABLE, index=False)
    plan, vectors = plan_rows(table[table["alpha"] > 0], bases, subspaces, cfg, decay)
    lsq = m is not None and m.lsq is not None  # the calibration may have chosen the projection
    deltas = m.lsq.deltas if lsq else None
    save_plan_files(plan, vectors, out_dir, deltas)
    if m is not None:
        log.info("edit method: %s (%s)", m.method, m.method_reason)
        meta["edit_method"] = {"method": m.method, "why": m.method_reason}
    if lsq:
        meta["lsq_protect_weight"] = m.lsq.protect_weight
    entanglement_scatter(table, cfg.tau, out_dir / "entanglement.png")
    return {"directions": len(table), "plan_rows": len(plan), "decay": decay, "tau": tau,
            "entangled": int((table["class"] == "entangled").sum()), **meta}


def _measuring(ctx: StageContext, acts: Any, bases: dict, rows: Any) -> Any:
    """The model this iteration probes (earlier plans applied), once per build, ready to measure
    (saber.measured.prepare_measuring)."""
    from saber.measured import prepare_measuring

    earlier = [ctx.pipeline.ensure("entangle", j) for j in range(ctx.iteration)]  # what collect[i] probed
    model, tokenizer = ctx.pipeline.load_model(earlier)
    return prepare_measuring(model, tokenizer, ctx.cfg, acts, bases, rows)


def measured_effects(ctx: StageContext, m: Any, acts: Any, bases: dict,
                     selected: Any) -> dict[tuple[int, int], tuple[float, float]]:
    """Benefit and cost of each selected direction, ablated alone (saber.measured), on fit prompts."""
    from saber.measured import OwnAnswers, measure_effects

    n = ctx.cfg.entangle.measure_prompts
    model, tokenizer, kw = m.model, m.tokenizer, m.answers
    harmful = OwnAnswers(model, tokenizer, acts.rows("harmful", "fit")["text"].tolist()[:n], **kw)
    # what the edit must not change: the model's own answers to capability and harmless prompts
    protected = OwnAnswers(model, tokenizer, acts.rows("capability", "fit")["text"].tolist()[:n]
                           + acts.rows("harmless", "fit")["text"].tolist()[:n], **kw)
    directions = [(int(r.layer), int(r.index), bases[int(r.layer)][int(r.index)].float())
                  for r in selected.itertuples(index=False)]
    effects = measure_effects(model, tokenizer, directions, harmful, protected, m.edit)
    for e in effects:
        log.info("layer %d direction %d: benefit %.4f, cost %.4f nats/token", e.layer, e.index, e.benefit, e.cost)
    return {(e.layer, e.index): (e.benefit, e.cost) for e in effects}


def calibrate(ctx: StageContext, m: Any, acts: Any, table: Any, bases: dict) -> tuple[Any, Any, list]:
    """How many directions and what strength (saber.measured.calibrate_table) on the held-out probe
    split: refusal of the harmful probes with the evaluation's own scorer, drift on the harmless
    ones. Evaluation sets are never read."""
    from saber.evaluate import refusal_rate
    from saber.evaluate.reference import generate_responses
    from saber.evaluate.settings import run_settings
    from saber.edit.lsq import PROTECT_RANGE
    from saber.measured import (OwnAnswers, ProjectionCheck, calibrate_table, opening_kept_rate, opening_rows,
                                projection_edit)

    cfg = ctx.cfg
    settings = run_settings(cfg)
    scorer = ctx.pipeline.refusal_scorer()
    harmful = acts.rows("harmful", "heldout")["text"].tolist()
    model, tokenizer, kw = m.model, m.tokenizer, m.answers
    drift = OwnAnswers(model, tokenizer, acts.rows("harmless", "heldout")["text"].tolist()[: cfg.entangle.measure_prompts],
                       **kw)
    if cfg.entangle.calibrate_refusal == "opening":  # one teacher-forced pass per evaluation
        own = OwnAnswers(model, tokenizer, harmful, **kw)
        # labelled from whole answers, as evaluate does: a refusal phrase may come after the opening
        refused = scorer.score(harmful, generate_responses(model, tokenizer, harmful, settings)[1])
        score = lambda edited: opening_kept_rate(edited, tokenizer, own, refused)  # noqa: E731
        n_scored = len(opening_rows(own, refused))
    else:
        score = lambda edited: refusal_rate(edited, tokenizer, harmful, settings, scorer)  # noqa: E731
        n_scored = len(harmful)
    search_mu = m.lsq is not None and cfg.edit.lsq.protect_weight is None
    projection = projection_edit(model, m.edit_cfg)
    compare = None
    if search_mu and cfg.edit.method == "auto" and cfg.edit.lsq.compare_projection:
        skill = OwnAnswers(model, tokenizer, acts.rows("capability", "heldout")["text"].tolist()[: cfg.entangle.measure_prompts],
                           **kw)
        compare = ProjectionCheck(projection, skill)
    table, chosen, trace = calibrate_table(model, table, bases, m.edit, score, drift, cfg.iterate.target_refusal,
                                           cfg.entangle.calibrate_steps, cfg.entangle.max_drift,
                                           m.lsq_edit if search_mu else None, PROTECT_RANGE,
                                           cfg.edit.lsq.protect_margin, compare,
                                           cfg.entangle.join_min_prompts / max(n_scored, 1))
    if search_mu and chosen.protection is None:
        lsq_point = [p for p in trace if p.phase == "compare" and p.protection is not None][-1]
        m.lsq, m.edit, m.method = None, projection, "projection"
        m.method_reason = (f"edit.method=auto: on the held-out probes the projection reached the target with less "
                           f"harmless + capability drift ({chosen.total_drift:.4g} against lsq's "
                           f"{lsq_point.total_drift:.4g} nats/token)")
    elif search_mu:
        m.lsq = m.lsq_at(chosen.protection)
        log.info("lsq protection: the edit uses mu = %.3g, the probes' edge divided by edit.lsq.protect_margin "
                 "unless that refused more on them (calibration.parquet)", chosen.protection)
    for p in trace:
        log.info("calibration (%s): %d direction(s) at scale %.4f%s -> held-out refusal %.3f, drift %.4f nats/token%s",
                 p.phase, p.n_directions, p.scale, "" if p.protection is None else f", protection {p.protection:.3g}",
                 p.refusal, p.drift, "" if p.skill_drift is None else f", capability drift {p.skill_drift:.4f}")
    return table, chosen, trace


# measured mode and calibration remove directions with the edit's own writer settings and score
# refusal with the evaluation's scorer, so those keys are part of this stage's fingerprint
SPEC = StageSpec(name="entangle", schema_version=7,
                 config_keys=("entangle", "iterate.alpha_decay", "iterate.target_refusal", "edit.scope",
                              "edit.roles", "edit.sandwich_correction", "edit.dtype_compute", "edit.method", "edit.lsq",
                              "edit.norm_preserving", *SCORER_KEYS),
                 upstream=("collect", "extract", "rank", "signature"), build=build)
main = stage_main("entangle")

if __name__ == "__main__":
    main()
