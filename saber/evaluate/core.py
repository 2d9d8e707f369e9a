"""The evaluator: compare an edited model with the base model's reference.

`evaluate_models(base, edited, tokenizer, sets, cfg)` is the pipeline-free entry point;
`evaluate_against_reference` does the edited-model half against a stored `Reference`, which is
how the stage shares one base computation across sweep trials and iterations.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from saber.evaluate.capability import mc_accuracy, mc_choice_scores, perplexity
from saber.evaluate.divergence import LOGP_FLOOR, CompressedDist, kl_compressed
from saber.evaluate.reference import (EvalSets, Reference, build_reference, continuation_logp, exact_probes,
                                      generate_responses, nll_arrays, reference_text_nll)
from saber.evaluate.scorers import RefusalScorer, make_scorer
from saber.evaluate.stats import aggregate, proportion
from saber.evaluate.settings import EvalSettings

log = logging.getLogger("saber.evaluate")


@dataclass
class EvalResult:
    """Everything one evaluation produced: the summary and its per-item tables."""

    summary: dict[str, Any]
    generations: pd.DataFrame
    divergence: pd.DataFrame
    warnings: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        return self.summary["headline"]


def _warn(messages: list[str], text: str) -> None:
    messages.append(text)
    warnings.warn(text, RuntimeWarning, stacklevel=3)
    log.warning(text)


@torch.no_grad()
def divergence_table(edited: Any, tokenizer: Any, prompts: Sequence[str], ref: Reference, cfg: EvalSettings,
                     messages: list[str]) -> pd.DataFrame:
    """Per (prompt, position) KL(P_base || P_edit), top-1 agreement and log p(y_t) on the base continuation."""
    rows: list[pd.DataFrame] = []
    invalid = floored = 0
    for batch in continuation_logp(edited, tokenizer, prompts, ref.continuations, cfg):
        n = batch.logp.shape[1]
        if n == 0:
            continue
        idx = torch.tensor(batch.index)
        base = CompressedDist(ref.dist.ids[idx, :n].to(batch.logp.device), ref.dist.logp[idx, :n].to(batch.logp.device),
                              ref.dist.tail[idx, :n].to(batch.logp.device))
        kl, floor = kl_compressed(base, batch.logp)
        base_mask = ref.mask[idx, :n].to(batch.mask.device)
        mask = batch.mask & base_mask
        invalid += int((batch.real & base_mask & ~batch.mask).sum())
        floored += int((floor & mask).sum())
        top1 = batch.logp.argmax(-1) == base.ids[..., 0].long()
        tok_edit = torch.gather(batch.logp, -1, batch.target.unsqueeze(-1)).squeeze(-1)
        b, n_pos = mask.shape
        rows.append(pd.DataFrame({
            "prompt_id": np.repeat(np.asarray(batch.index), n_pos),
            "position": np.tile(np.arange(n_pos), b),
            "token_id": batch.target.reshape(-1).cpu().numpy(),
            "kl": kl.reshape(-1).cpu().numpy(),
            "top1_agree": top1.reshape(-1).cpu().numpy(),
            "logp_base": ref.token_logp[idx, :n].reshape(-1).double().numpy(),
            "logp_edit": tok_edit.reshape(-1).double().cpu().numpy(),
            "floored": floor.reshape(-1).cpu().numpy(),
            "valid": mask.reshape(-1).cpu().numpy(),
            "real": (batch.real & base_mask).reshape(-1).cpu().numpy(),
        }))
    if invalid:
        _warn(messages, f"{invalid} response position(s) have edited logits with NaN/+inf or no finite "
                        "value; they are excluded from KL and perplexity (a sign of numerical damage)")
    if floored:
        _warn(messages, f"{floored} position(s) where the edited model gives probability 0 to a token the "
                        "base model can emit; their KL uses the float32 floor log(2^-149)")
    cols = ["prompt_id", "position", "token_id", "kl", "top1_agree", "logp_base", "logp_edit", "floored",
            "valid", "real"]
    if not rows:
        return pd.DataFrame({c: pd.Series([], dtype=bool if c in ("top1_agree", "floored", "valid") else float)
                             for c in cols if c != "real"})
    frame = pd.concat(rows, ignore_index=True)
    return frame.loc[frame["real"].astype(bool)].drop(columns="real").reset_index(drop=True)


def _kl_summary(div: pd.DataFrame, messages: list[str]) -> dict[str, Any]:
    valid = div[div["valid"].astype(bool)] if len(div) else div
    if len(valid) == 0:
        _warn(messages, "teacher-forced KL: no valid response positions (empty continuations or "
                        "all logits unusable); KL is reported as NaN")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the empty case was warned about above
        tf = aggregate(valid["kl"].to_numpy() if len(valid) else [], "teacher-forced KL")
        first = valid[valid["position"] == 0] if len(valid) else valid
        ft = aggregate(first["kl"].to_numpy() if len(first) else [], "first-token KL")
    tf["top1_agreement"] = float(valid["top1_agree"].mean()) if len(valid) else float("nan")
    tf["n_prompts"] = int(valid["prompt_id"].nunique()) if len(valid) else 0
    per_position = (valid.groupby("position")["kl"].mean() if len(valid) else pd.Series(dtype=float))
    return {"first_token": ft, "teacher_forced": tf,
            "profile": {int(k): float(v) for k, v in per_position.items()},
            "n_floored": int(valid["floored"].sum()) if len(valid) else 0}


def _ppl_pair(base_nll: list[np.ndarray], edit_nll: list[np.ndarray]) -> dict[str, float]:
    b, e = perplexity(base_nll), perplexity(edit_nll)
    return {"base": b, "edited": e, "delta": e - b, "ratio": e / b if b and math.isfinite(b) else float("nan")}


def _delta(base: dict[str, Any], edited: dict[str, Any]) -> dict[str, Any]:
    return {"base": base, "edited": edited, "delta": edited["rate"] - base["rate"]}


@torch.no_grad()
def evaluate_against_reference(edited: Any, tokenizer: Any, sets: EvalSets, ref: Reference, cfg: EvalSettings,
                               scorer: RefusalScorer | None = None) -> EvalResult:
    """Run the edited model on every probe and compare with the base reference."""
    scorer = scorer or make_scorer(cfg)
    messages: list[str] = []
    gen_rows: list[dict[str, Any]] = []
    refusal: dict[str, Any] = {}
    for name, prompts in sets.refusal_sets().items():
        if not prompts:
            continue
        if len(ref.responses.get(name, [])) != len(prompts):
            raise ValueError(f"reference holds {len(ref.responses.get(name, []))} base responses for set "
                             f"'{name}' but the evaluation has {len(prompts)} prompts; rebuild the reference")
        _, texts = generate_responses(edited, tokenizer, prompts, cfg)
        flags = scorer.score(prompts, texts)
        frags = scorer.fragments(prompts, texts) if hasattr(scorer, "fragments") else [None] * len(texts)
        refusal[name] = _delta(proportion(ref.refused[name]), proportion(flags))
        if frags and frags[0] is not None:
            refusal[name]["fragments"] = proportion(frags)
        for i, (p, bt, et, bf, ef, fr) in enumerate(zip(prompts, ref.responses[name], texts, ref.refused[name],
                                                        flags, frags)):
            gen_rows.append({"set": name, "prompt_id": i, "prompt": p, "base_response": bt, "edited_response": et,
                             "base_refused": bool(bf), "edited_refused": bool(ef), "edited_fragment": fr,
                             "answer": None, "base_correct": None, "edited_correct": None})

    div = divergence_table(edited, tokenizer, sets.harmless, ref, cfg, messages)
    kl = _kl_summary(div, messages)
    valid = div[div["valid"].astype(bool)] if len(div) else div
    cont_base = [-np.maximum(valid["logp_base"].to_numpy(), LOGP_FLOOR)] if len(valid) else []
    cont_edit = [-np.maximum(valid["logp_edit"].to_numpy(), LOGP_FLOOR)] if len(valid) else []
    ppl = {"continuation": _ppl_pair(cont_base, cont_edit)}
    if ref.ref_nll:
        ppl["reference_text"] = _ppl_pair(nll_arrays(ref.ref_nll), reference_text_nll(edited, tokenizer, sets, cfg))

    capability: dict[str, Any] = {}
    for name, items in sets.mc.items():
        if not items:
            continue
        base_ok = mc_accuracy(ref.mc_scores[name], items)
        edit_ok = mc_accuracy(mc_choice_scores(edited, tokenizer, items, cfg.batch_size, cfg.mc_norm,
                                               cfg.system_prompt), items)
        capability[name] = _delta(proportion(base_ok), proportion(edit_ok))
        capability[name]["kind"] = "multiple_choice"
    edited_exact = exact_probes(edited, tokenizer, sets, cfg)
    for name, res in edited_exact.items():
        items = sets.gsm8k if name == "gsm8k" else sets.skill
        base = ref.exact[name]
        capability[name] = _delta(proportion(base["correct"]), proportion(res["correct"]))
        capability[name]["kind"] = "exact_match"
        for i, it in enumerate(items):
            gen_rows.append({"set": name, "prompt_id": i, "prompt": it.prompt, "base_response": base["responses"][i],
                             "edited_response": res["responses"][i], "base_refused": None, "edited_refused": None,
                             "edited_fragment": None, "answer": it.answer, "base_correct": bool(base["correct"][i]),
                             "edited_correct": bool(res["correct"][i])})

    summary = {"refusal": refusal, "kl": kl, "perplexity": ppl, "capability": capability,
               "settings": {"max_new_tokens": cfg.max_new_tokens, "kl_tokens": cfg.kl_tokens,
                            "kl_topk": cfg.kl_topk, "vocab": ref.vocab, "scorer": cfg.scorer},
               "warnings": messages}
    summary["headline"] = flat_metrics(summary)
    if hasattr(scorer, "signature"):
        from saber.evaluate.signature import signature_summary

        summary["signature"] = signature_summary(scorer.signature)
    gens = pd.DataFrame(gen_rows, columns=["set", "prompt_id", "prompt", "base_response", "edited_response",
                                           "base_refused", "edited_refused", "edited_fragment", "answer", "base_correct",
                                           "edited_correct"])
    return EvalResult(summary=summary, generations=gens, divergence=div, warnings=messages)


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """One flat name -> number table (what sweeps, Pareto fronts and stopping rules read)."""
    m: dict[str, float] = {}
    nan = float("nan")
    names = {"harmful": "refusal_rate", "harmless": "over_refusal_rate", "xstest": "xstest_refusal_rate"}
    for key, name in names.items():
        r = summary["refusal"].get(key)
        if r is None and key != "harmful":
            continue  # an absent optional set has no entry; the refusal rate is always present
        m[name] = r["edited"]["rate"] if r else nan
        m[f"{name}_lo"] = r["edited"]["lo"] if r else nan
        m[f"{name}_hi"] = r["edited"]["hi"] if r else nan
        m[f"base_{name}"] = r["base"]["rate"] if r else nan
        if r and "fragments" in r:
            m[name.replace("_rate", "_fragment_rate")] = r["fragments"]["rate"]
    kl = summary["kl"]
    m["kl_first_token"] = kl["first_token"]["mean"]
    for stat in ("mean", "rmse", "p95", "max"):
        m[f"kl_tf_{stat}"] = kl["teacher_forced"][stat]
    m["top1_agreement"] = kl["teacher_forced"]["top1_agreement"]
    for key, val in summary["perplexity"].items():
        m[f"ppl_delta_{key}"] = val["delta"]
    for key, val in summary["capability"].items():
        m[f"{key}_accuracy"] = val["edited"]["rate"]
        m[f"{key}_delta"] = val["delta"]
    return m


def evaluate_models(base: Any, edited: Any, tokenizer: Any, sets: EvalSets, cfg: EvalSettings,
                    scorer: RefusalScorer | None = None) -> EvalResult:
    """Evaluate `edited` against `base` (two model objects; they may not be the same object)."""
    if base is edited:
        raise ValueError("evaluate_models got the same object as base and edited model; build the base "
                         "reference first (build_reference) and then edit the model in place")
    scorer = scorer or make_scorer(cfg)
    ref = build_reference(base, tokenizer, sets, cfg, scorer)
    return evaluate_against_reference(edited, tokenizer, sets, ref, cfg, scorer)


def refusal_rate(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: EvalSettings,
                 scorer: RefusalScorer | None = None) -> float:
    """Share of prompts whose greedy response is scored as a refusal (NaN for no prompts)."""
    if not prompts:
        warnings.warn("refusal_rate of an empty prompt set is undefined (NaN)", RuntimeWarning, stacklevel=2)
        return float("nan")
    scorer = scorer or make_scorer(cfg)
    _, texts = generate_responses(model, tokenizer, list(prompts), cfg)
    flags = scorer.score(list(prompts), texts)
    return sum(flags) / len(flags)
