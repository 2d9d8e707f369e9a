"""Stage collect: probe prompts -> residual-stream activations (`python -m stages.collect`).

Loads the harmful, harmless and capability probe sets, splits each into fit and held-out parts,
checks that no probe prompt is also an evaluation prompt, runs the model (with the plans of
earlier iterations applied) and writes `prompts.parquet` and `activations.safetensors`.

From the second iteration on, the harmful fit split keeps only the prompts the edited model still
refuses (`iterate.refused_only_min`); the others move to split `freed`. Where the first plan
removed one kind of refusal, the prompts it freed no longer look harmful to the edited model: in
the fit they pull the next directions toward what is already removed, and the least-squares edit
protects their answers instead, so that the next plan does not bring their refusal back. The
held-out split stays whole, so every iteration's refusal is measured on the same prompts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from saber.pipeline import StageContext, StageSpec
from saber.probes import KINDS, load_probe_splits, prompt_frame
from stages.cli import stage_main
from stages.signature import SCORER_KEYS

log = logging.getLogger("stages.collect")


def build(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Collect activations for every probe prompt and write the collect artifact."""
    from saber.collect import check_finite, collect_with_stats, save_activations

    cfg = ctx.cfg
    splits = load_probe_splits(cfg.data, ctx.prompt_roots())
    frame = prompt_frame(splits)
    model, tokenizer = ctx.load_model()
    kept_fit = None
    if ctx.iteration > 0 and cfg.iterate.refused_only_min > 0:
        frame, kept_fit = refused_fit_only(ctx, model, tokenizer, frame)
    texts = {kind: frame.loc[frame["kind"] == kind, "text"].tolist() for kind in KINDS}
    result = collect_with_stats(
        model, tokenizer, texts,
        positions=cfg.collect.positions, response_positions=cfg.collect.response_positions,
        batch_size=cfg.collect.batch_size,
        max_batch_size=cfg.collect.max_batch_size, max_length=cfg.collect.max_length,
        system_prompt=cfg.model.system_prompt,
    )
    check_finite(result.activations, model, cfg.model.dtype)
    for kind in KINDS:
        frame.loc[frame["kind"] == kind, "n_tokens"] = result.n_tokens[kind]
    save_activations(out_dir, result.activations, frame, cfg.collect.response_positions)
    first = result.activations[KINDS[0]]
    return {
        "n_prompts": {kind: {split: len(parts[split]) for split in parts} for kind, parts in splits.items()},
        "n_layers": int(first.shape[0]),
        "positions": int(first.shape[2]),
        "response_positions": cfg.collect.response_positions,
        "d_model": int(first.shape[3]),
        "batch_size": result.batch_size,
        "truncated": result.truncated,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "iteration": ctx.iteration,
        "plans_applied": len(ctx.plans),
        "harmful_fit_still_refused": kept_fit,
    }


def refused_fit_only(ctx: StageContext, model: Any, tokenizer: Any, frame: Any) -> tuple[Any, int]:
    """`frame` with the harmful fit prompts the edited model no longer refuses (greedy answers,
    the evaluation's scorer) moved to split `freed`, unless fewer than `iterate.refused_only_min`
    are still refused; and how many harmful fit prompts stay in the fit split."""
    from saber.collect import FREED_SPLIT
    from saber.evaluate.reference import generate_responses
    from saber.evaluate.settings import run_settings

    rows = (frame["kind"] == "harmful") & (frame["split"] == "fit")
    prompts = frame.loc[rows, "text"].tolist()
    refused = ctx.pipeline.refusal_scorer().score(prompts, generate_responses(model, tokenizer, prompts,
                                                                              run_settings(ctx.cfg))[1])
    n = int(sum(refused))
    if n < ctx.cfg.iterate.refused_only_min:
        log.info("iteration %d: %d of %d harmful fit prompts still refused, fewer than iterate.refused_only_min = %d: "
                 "fitting on all of them", ctx.iteration, n, len(prompts), ctx.cfg.iterate.refused_only_min)
        return frame, len(prompts)
    log.info("iteration %d: fitting on the %d of %d harmful fit prompts still refused", ctx.iteration, n, len(prompts))
    frame = frame.copy()
    frame.loc[frame.index[rows][[not r for r in refused]], "split"] = FREED_SPLIT
    return frame, n


# iterate.refused_only_min and the scorer's settings (as entangle's) decide the fit split from the second iteration on
SPEC = StageSpec(name="collect", schema_version=2,
                 config_keys=("model", "data", "collect", "iterate.refused_only_min", *SCORER_KEYS),
                 upstream=(), build=build, reads_plans=True)
main = stage_main("collect")

if __name__ == "__main__":
    main()
