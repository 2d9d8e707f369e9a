"""Stage collect: probe prompts -> residual-stream activations (`python -m stages.collect`).

Loads the harmful, harmless and capability probe sets, splits each into fit and held-out parts,
checks that no probe prompt is also an evaluation prompt, runs the model (with the plans of
earlier iterations applied) and writes `prompts.parquet` and `activations.safetensors`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from saber.pipeline import StageContext, StageSpec
from stages.cli import stage_main

log = logging.getLogger("saber.stages.collect")

KINDS = ("harmful", "harmless", "capability")
EVAL_SETS = ("harmful_eval", "harmless_eval")


def _configured(source: Any) -> bool:
    return source is not None and (getattr(source, "path", None) is not None
                                   or getattr(source, "hf", None) is not None)


def load_probe_splits(data: Any, roots: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Per kind, {"fit": PromptSet, "heldout": PromptSet}; explicit held-out sets win over splits.

    Raises ValueError when a probe prompt also appears in an evaluation set or in another kind.
    """
    from saber.prompts import assert_disjoint, load_prompts, split_fit_heldout

    splits: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        full = load_prompts(getattr(data, kind), f"data.{kind}", roots)
        explicit = getattr(data, f"{kind}_heldout", None)
        if _configured(explicit):
            held = load_prompts(explicit, f"data.{kind}_heldout", roots)
            assert_disjoint(full, held)
            splits[kind] = {"fit": full, "heldout": held}
        else:
            fit, held = split_fit_heldout(full, data.heldout_fraction, data.seed)
            splits[kind] = {"fit": fit, "heldout": held}
    for name in EVAL_SETS:
        source = getattr(data, name, None)
        if not _configured(source):
            log.info("data.%s is not configured; skipping its overlap check", name)
            continue
        eval_set = load_prompts(source, f"data.{name}", roots)
        for kind in ("harmful", "harmless"):
            for part in splits[kind].values():
                assert_disjoint(part, eval_set)
    for part_a in splits["harmful"].values():
        for part_b in splits["harmless"].values():
            assert_disjoint(part_a, part_b)
    return splits


def prompt_frame(splits: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per prompt: kind by kind, fit rows then held-out rows (n_tokens filled later)."""
    rows = [(kind, split, text) for kind, parts in splits.items()
            for split in ("fit", "heldout") for text in parts[split].texts]
    frame = pd.DataFrame(rows, columns=["kind", "split", "text"])
    frame.insert(0, "id", range(len(frame)))
    frame["n_tokens"] = 0
    return frame


def build(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Collect activations for every probe prompt and write the collect artifact."""
    from saber.collect import check_finite, collect_with_stats, save_activations

    cfg = ctx.cfg
    splits = load_probe_splits(cfg.data, ctx.prompt_roots())
    frame = prompt_frame(splits)
    texts = {kind: frame.loc[frame["kind"] == kind, "text"].tolist() for kind in KINDS}
    model, tokenizer = ctx.load_model()
    result = collect_with_stats(
        model, tokenizer, texts,
        positions=cfg.collect.positions, batch_size=cfg.collect.batch_size,
        max_batch_size=cfg.collect.max_batch_size, max_length=cfg.collect.max_length,
        system_prompt=cfg.model.system_prompt,
    )
    check_finite(result.activations, model, cfg.model.dtype)
    for kind in KINDS:
        frame.loc[frame["kind"] == kind, "n_tokens"] = result.n_tokens[kind]
    save_activations(out_dir, result.activations, frame)
    first = result.activations[KINDS[0]]
    return {
        "n_prompts": {kind: {split: len(parts[split]) for split in parts} for kind, parts in splits.items()},
        "n_layers": int(first.shape[0]),
        "positions": int(first.shape[2]),
        "d_model": int(first.shape[3]),
        "batch_size": result.batch_size,
        "truncated": result.truncated,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "iteration": ctx.iteration,
        "plans_applied": len(ctx.plans),
    }


SPEC = StageSpec(name="collect", schema_version=1, config_keys=("model", "data", "collect"),
                 upstream=(), build=build, reads_plans=True)
main = stage_main("collect")

if __name__ == "__main__":
    main()
