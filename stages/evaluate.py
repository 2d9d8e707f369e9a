"""Evaluate stage: refusal, drift and capability of the edited model against the base model.

The edited model is the edit artifact's exported `model/` directory when there is one, otherwise
the base model with every plan applied in memory; both give the same numbers. The base model's
half of the work lives in the `reference` and `probe_reference` artifacts (stages/reference.py),
so every sweep trial and iteration reuses it.
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
# held-out probe metrics copied into the headline as probe_*, what sweeps and searches choose on
PROBE_HEADLINE = ("refusal_rate", "refusal_fragment_rate", "over_refusal_rate", "kl_first_token", "kl_tf_mean",
                  "kl_tf_p95")


def reference(ctx: StageContext, stage: str = "reference") -> Any:
    """The stored base reference (stage `reference` or `probe_reference`), built on a miss."""
    from saber.evaluate import load_reference

    return load_reference(ctx.pipeline.ensure(stage, 0).path)


def residual_proxy(ctx: StageContext, model: Any, tokenizer: Any) -> tuple[dict[str, Any] | None, Any]:
    """FDR along this iteration's directions, before and after the edit (saber.evaluate.proxy)."""
    from saber.collect import load_activations
    from saber.directions import load_directions
    from saber.evaluate.proxy import proxy_before_after

    collect, extract = ctx.upstream.get("collect"), ctx.upstream.get("extract")
    if collect is None or extract is None:
        log.info("residual refusal proxy skipped: no collect/extract artifact")
        return None, None
    # The proxy re-reads the last prompt token, so it covers the directions found there.
    directions = {layer: ld.basis[ld.positions == -1] for layer, ld in load_directions(extract.path).items()
                  if bool((ld.positions == -1).any())}
    if not directions:
        log.info("residual refusal proxy skipped: extract.positions holds no last-prompt-token direction")
        return None, None
    cfg = ctx.cfg
    return proxy_before_after(load_activations(collect.path), directions, model, tokenizer, eps=cfg.rank.eps,
                              batch_size=cfg.evaluate.batch_size, system_prompt=cfg.model.system_prompt,
                              max_length=cfg.collect.max_length)


def build(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    from saber.config import as_plain
    from saber.evaluate import evaluate_against_reference, model_card_text, write_outputs
    from saber.evaluate.sets import heldout_eval_sets, load_eval_sets
    from saber.evaluate.settings import run_settings
    from saber.model.loading import load_model, load_with_adapter

    cfg = ctx.cfg
    settings = run_settings(cfg)
    sets = load_eval_sets(cfg.evaluate, cfg.data, ctx.prompt_roots())
    scorer = ctx.pipeline.refusal_scorer()
    # Both references first: building one loads the base model without plans.
    base_ref = reference(ctx)
    probe_ref = reference(ctx, "probe_reference") if cfg.evaluate.probe_metrics else None
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
    result = evaluate_against_reference(model, tokenizer, sets, base_ref, settings, scorer)
    if probe_ref is not None:
        held = heldout_eval_sets(ctx.pipeline.ensure("collect", 0).path)
        probe = evaluate_against_reference(model, tokenizer, held, probe_ref, settings, scorer)
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
