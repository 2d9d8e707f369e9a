"""Stage collect: probe prompts -> residual-stream activations (`python -m stages.collect`).

Loads the harmful, harmless and capability probe sets, splits each into fit and held-out parts,
checks that no probe prompt is also an evaluation prompt, runs the model (with the plans of
earlier iterations applied) and writes `prompts.parquet` and `activations.safetensors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saber.pipeline import StageContext, StageSpec
from saber.probes import KINDS, load_probe_splits, prompt_frame
from stages.cli import stage_main


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
    }


SPEC = StageSpec(name="collect", schema_version=1, config_keys=("model", "data", "collect"),
                 upstream=(), build=build, reads_plans=True)
main = stage_main("collect")

if __name__ == "__main__":
    main()
