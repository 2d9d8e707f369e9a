"""Evaluate stage: refusal, drift and capability of the edited model against the base model.

The edited model is the edit artifact's exported `model/` directory when there is one, otherwise
the base model with every plan applied in memory; both give the same numbers. The base model's
half of the work lives in a separate `reference` artifact keyed by model identity and the
evaluate and data configs, so every sweep trial and iteration reuses it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from saber.pipeline import StageContext, StageSpec
from stages.cli import stage_main

log = logging.getLogger("saber.evaluate")
SCHEMA_VERSION = 4
REFERENCE_STAGE = "reference"
PROBE_REFERENCE_STAGE = "probe_reference"
# held-out probe metrics copied into the headline as probe_*, what sweeps and searches choose on
PROBE_HEADLINE = ("refusal_rate", "refusal_fragment_rate", "over_refusal_rate", "kl_first_token", "kl_tf_mean",
                  "kl_tf_p95")
REFERENCE_SCHEMA_VERSION = 3


def reference_config(cfg: Any) -> dict[str, Any]:
    """What the base reference depends on: the model settings and the evaluate and data configs."""
    from saber.config import as_plain

    evaluate = {k: v for k, v in as_plain(cfg.evaluate).items() if k != "adapter"}  # the edited side only
    return {"model": as_plain(cfg.model), "evaluate": evaluate, "data": as_plain(cfg.data)}


def probe_sets(ctx: StageContext) -> Any:
    """The held-out probe prompts of collect (iteration 0) as an evaluation: what sweeps and
    searches choose on, so that the evaluation sets only report."""
    import pandas as pd

    from saber.collect import PROMPTS_FILE
    from saber.evaluate import EvalSets

    prompts = pd.read_parquet(ctx.pipeline.ensure("collect", 0).path / PROMPTS_FILE)
    heldout = prompts[prompts["split"] == "heldout"]
    return EvalSets(harmful=heldout[heldout["kind"] == "harmful"]["text"].tolist(),
                    harmless=heldout[heldout["kind"] == "harmless"]["text"].tolist())


def ensure_reference(ctx: StageContext, sets: Any, settings: Any, scorer: Any, *, probes: bool = False) -> Any:
    """The stored base reference, computing it (base model, no plans) on a cache miss. With
    `probes`, the reference of the held-out probe sets (keyed by collect's fingerprint)."""
    from saber.evaluate import build_reference, load_reference, save_reference

    def build_ref(tmp: Path) -> dict[str, Any]:
        base, tokenizer = ctx.load_model(with_plans=False)
        save_reference(build_reference(base, tokenizer, sets, settings, scorer), tmp)
        return {"n_harmful": len(sets.harmful), "n_harmless": len(sets.harmless)}

    pipeline = ctx.pipeline
    # the base refusal flags depend on the learned signature (which depends on the probe split)
    upstream = {"signature": ctx.upstream["signature"].fingerprint} if ctx.cfg.evaluate.scorer == "auto" else {}
    if probes:
        upstream["collect0"] = pipeline.ensure("collect", 0).fingerprint
    art = pipeline.store.get_or_build(
        PROBE_REFERENCE_STAGE if probes else REFERENCE_STAGE, REFERENCE_SCHEMA_VERSION, reference_config(ctx.cfg),
        upstream, pipeline.model_identity(),
        build_ref, force="evaluate" in pipeline.force_stages, command="python -m stages.evaluate",
    )
    return load_reference(art.path)


def residual_proxy(ctx: StageContext, model: Any, tokenizer: Any) -> tuple[dict[str, Any] | None, Any]:
    """FDR along this iteration's directions, before and after the edit (saber.evaluate.proxy)."""
    from saber.collect import load_activations
    from saber.directions import load_directions
    from saber.evaluate.proxy import proxy_before_after

    collect, extract = ctx.upstream.get("collect"), ctx.upstream.get("extract")
    if collect is None or extract is None:
        log.info("residual refusal proxy skipped: no collect/extract artifact")
        return None, None
    directions = {layer: ld.basis for layer, ld in load_directions(extract.path).items()}
    cfg = ctx.cfg
    return proxy_before_after(load_activations(collect.path), directions, model, tokenizer, eps=cfg.rank.eps,
                              batch_size=cfg.evaluate.batch_size, system_prompt=cfg.model.system_prompt,
                              max_length=cfg.collect.max_length)


def build(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    from saber.config import as_plain
    from saber.evaluate import evaluate_against_reference, model_card_text, write_outputs
    from saber.evaluate.sets import load_eval_sets
    from saber.evaluate.settings import run_settings
    from saber.model.loading import load_model, load_with_adapter

    cfg = ctx.cfg
    settings = run_settings(cfg)
    sets = load_eval_sets(cfg.evaluate, cfg.data, ctx.prompt_roots())
    scorer = ctx.pipeline.refusal_scorer()
    reference = ensure_reference(ctx, sets, settings, scorer)
    exported = ctx.upstream["edit"].path / "model"
    adapter = Path(cfg.evaluate.adapter) if cfg.evaluate.adapter else ctx.upstream["edit"].path / "adapter"
    if cfg.evaluate.adapter or (adapter.is_dir() and not exported.is_dir()):
        model, tokenizer = load_with_adapter(cfg.model, ctx.model_dir(), adapter)
        source = f"adapter:{adapter}" if cfg.evaluate.adapter else "adapter"
    elif exported.is_dir():
        model, tokenizer = load_model(cfg.model, exported)
        source = "exported"
    else:
        model, tokenizer = ctx.load_model()
        source = "in_memory"
    result = evaluate_against_reference(model, tokenizer, sets, reference, settings, scorer)
    if cfg.evaluate.probe_metrics:
        held = probe_sets(ctx)
        probe = evaluate_against_reference(model, tokenizer, held, ensure_reference(ctx, held, settings, scorer,
                                                                                    probes=True), settings, scorer)
        result.summary["probe"] = {k: v for k, v in probe.metrics.items()}
        result.summary["headline"].update({f"probe_{k}": probe.metrics[k] for k in PROBE_HEADLINE if k in probe.metrics})
    proxy, proxy_table = (residual_proxy(ctx, model, tokenizer) if cfg.evaluate.residual_proxy else (None, None))
    if proxy_table is not None:
        proxy_table.to_parquet(out_dir / "residual_proxy.parquet", index=False)
    extra = {"source": source, "method": cfg.method, "iteration": ctx.iteration, "residual_proxy": proxy,
             "config": {"extract": as_plain(cfg.extract), "rank": as_plain(cfg.rank),
                        "entangle": as_plain(cfg.entangle), "edit": as_plain(cfg.edit)}}
    write_outputs(result, out_dir, extra=extra, plots=cfg.evaluate.plots)
    summary = json.loads((out_dir / "summary.json").read_text())
    (out_dir / "model_card.md").write_text(model_card_text(
        summary, method=cfg.method, config=extra["config"], base_model=cfg.model.path or cfg.model.name))
    headline = {k: v for k, v in result.metrics.items() if k in ("refusal_rate", "kl_tf_mean")}
    return {"source": source, **{k: (v if v == v else None) for k, v in headline.items()}}


SPEC = StageSpec(name="evaluate", schema_version=SCHEMA_VERSION, config_keys=("evaluate", "data", "edit"),
                 upstream=("collect", "extract", "signature", "edit"), build=build, reads_plans=True)
main = stage_main("evaluate")

if __name__ == "__main__":
    main()
