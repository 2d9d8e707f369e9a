"""Signature stage: the base model's own refusal signature, for the `auto` refusal scorer.

It reads the harmful and harmless fit probes of collect (iteration 0), generates the unedited
model's greedy answers and learns what its refusals look like (saber.evaluate.signature). The
entangle calibration, the iteration check and evaluate all score refusal with it. With another
scorer it writes nothing and loads no model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from saber.pipeline import StageContext, StageSpec
from stages.cli import stage_main

log = logging.getLogger("stages.signature")


def build(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    import pandas as pd

    from saber.collect import PROMPTS_FILE
    from saber.evaluate.reference import generate_responses
    from saber.evaluate.scorers import marker_list
    from saber.evaluate.settings import run_settings
    from saber.evaluate.signature import CANDIDATES_FILE, learn_signature

    cfg = ctx.cfg.evaluate
    if cfg.scorer != "auto":
        return {"learned": False, "scorer": cfg.scorer}
    prompts = pd.read_parquet(ctx.upstream["collect"].path / PROMPTS_FILE)
    fit = {kind: prompts[(prompts["kind"] == kind) & (prompts["split"] == "fit")]["text"].tolist()[: cfg.signature_prompts]
           for kind in ("harmful", "harmless")}
    model, tokenizer = ctx.load_model(with_plans=False)
    settings = run_settings(ctx.cfg)
    answers = {kind: generate_responses(model, tokenizer, texts, settings)[1] for kind, texts in fit.items()}
    signature, table = learn_signature(fit["harmful"], answers["harmful"], fit["harmless"], answers["harmless"],
                                       cfg.auto, marker_list(cfg))
    signature.save(out_dir)
    table.to_parquet(out_dir / CANDIDATES_FILE, index=False)
    pd.DataFrame([{"kind": kind, "prompt": p, "answer": a} for kind in fit for p, a in zip(fit[kind], answers[kind])]
                 ).to_parquet(out_dir / "answers.parquet", index=False)
    log.info("refusal signature: %d openings %s, %d phrases %s; labels %.3f of harmful and %.3f of harmless fit answers",
             len(signature.openings), signature.openings[:4], len(signature.phrases), signature.phrases[:4],
             signature.base_harmful_refusal, signature.base_harmless_refusal)
    return {"learned": True, "openings": len(signature.openings), "phrases": len(signature.phrases),
            "base_harmful_refusal_fit": signature.base_harmful_refusal,
            "base_harmless_refusal_fit": signature.base_harmless_refusal}


# the settings that decide how a stage's generated answers are labelled refusals (besides the signature itself)
SCORER_KEYS = ("evaluate.scorer", "evaluate.markers", "evaluate.extra_markers", "evaluate.prefixes", "evaluate.judge_path",
               "evaluate.judge_refusal_labels", "evaluate.judge_pair", "evaluate.max_new_tokens", "evaluate.batch_size",
               "evaluate.max_prompt_tokens")


def signature_upstream(cfg: Any) -> tuple[str, ...]:
    """("signature",) when the `auto` scorer labels refusals (a stage reading them depends on it), else ()."""
    return ("signature",) if cfg.evaluate.scorer == "auto" else ()


SPEC = StageSpec(name="signature", schema_version=2,
                 config_keys=("evaluate.scorer", "evaluate.markers", "evaluate.extra_markers", "evaluate.auto",
                              "evaluate.signature_prompts", "evaluate.max_new_tokens", "evaluate.batch_size",
                              "evaluate.max_prompt_tokens", "model.system_prompt"),
                 upstream=("collect",), build=build, base_model_only=True)
main = stage_main("signature")

if __name__ == "__main__":
    main()
