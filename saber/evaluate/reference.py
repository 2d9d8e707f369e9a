"""The base model's reference: everything the evaluator needs from the unedited model.

Computed once per (model, evaluate config, eval data) and stored as an artifact, so every sweep
trial and iteration compares against the same numbers without loading the base model again:
greedy responses on each prompt set and their refusal labels, the greedy continuation y of
each drift prompt with the base next-token distributions along it (top-k + tail, see
divergence.py), and the base capability and perplexity results.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from saber.evaluate.capability import (ExactItem, MCItem, exact_match, mc_accuracy, mc_choice_scores,
                                       sequence_nll, text_windows)
from saber.evaluate.divergence import CompressedDist, compress
from saber.evaluate.generation import decode, encode_prompts, greedy_generate, teacher_forced
from saber.evaluate.scorers import RefusalScorer
from saber.evaluate.settings import EvalSettings

log = logging.getLogger("saber.evaluate")

REFERENCE_TENSORS = "reference.safetensors"
REFERENCE_JSON = "reference.json"
REFUSAL_SETS = ("harmful", "harmless", "xstest")


@dataclass
class EvalSets:
    """Prompt sets and probes of one evaluation (already limited to the configured sizes)."""

    harmful: list[str]
    harmless: list[str]
    xstest: list[str] = field(default_factory=list)
    mc: dict[str, list[MCItem]] = field(default_factory=dict)
    gsm8k: list[ExactItem] = field(default_factory=list)
    skill: list[ExactItem] = field(default_factory=list)
    reference_text: str | None = None

    def refusal_sets(self) -> dict[str, list[str]]:
        return {"harmful": self.harmful, "harmless": self.harmless, "xstest": self.xstest}


@dataclass
class Reference:
    """Base-model results (see module docstring). Tensors are on the CPU."""

    responses: dict[str, list[str]]
    refused: dict[str, list[bool]]
    continuations: list[list[int]]
    dist: CompressedDist          # [n, N, k] base next-token distributions along y
    mask: torch.Tensor            # bool [n, N]: real continuation tokens with valid base logits
    token_logp: torch.Tensor      # float32 [n, N]: base log p(y_t)
    ref_nll: list[list[float]]    # per reference-text window, per-token NLL
    mc_scores: dict[str, list[list[float]]]
    exact: dict[str, dict[str, list[Any]]]  # name -> {"responses": [...], "correct": [...]}
    vocab: int = 0


def generate_responses(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: EvalSettings,
                       max_new_tokens: int | None = None) -> tuple[list[list[int]], list[str]]:
    """Greedy response tokens (through EOS) and texts for chat prompts."""
    if not prompts:
        return [], []
    ids = encode_prompts(tokenizer, prompts, cfg.system_prompt,
                         cfg.max_prompt_tokens)
    toks = greedy_generate(model, tokenizer, ids, max_new_tokens or cfg.max_new_tokens,
                           cfg.generate_batch_size)
    return toks, decode(tokenizer, toks)


def continuation_logp(model: Any, tokenizer: Any, prompts: Sequence[str], continuations: Sequence[Sequence[int]],
                      cfg: EvalSettings):
    """Teacher-forced batches of [prompt; y] (see generation.teacher_forced)."""
    ids = encode_prompts(tokenizer, prompts, cfg.system_prompt,
                         cfg.max_prompt_tokens)
    return teacher_forced(model, tokenizer, ids, continuations, cfg.batch_size)


def _pad_rows(rows: list[torch.Tensor], n: int, fill: float | int | bool) -> torch.Tensor:
    """Stack [b, m, ...] batches whose m <= n, padding axis 1 to n with `fill`."""
    out = []
    for r in rows:
        if r.shape[1] < n:
            pad_shape = (r.shape[0], n - r.shape[1], *r.shape[2:])
            r = torch.cat([r, torch.full(pad_shape, fill, dtype=r.dtype)], dim=1)
        out.append(r)
    return torch.cat(out, dim=0)


@torch.no_grad()
def build_reference(model: Any, tokenizer: Any, sets: EvalSets, cfg: EvalSettings, scorer: RefusalScorer) -> Reference:
    """Run every base-model computation of the evaluation once."""
    responses: dict[str, list[str]] = {}
    refused: dict[str, list[bool]] = {}
    continuations: list[list[int]] = []
    for name, prompts in sets.refusal_sets().items():
        if name == "harmless":
            # One generation serves both over-refusal (first max_new_tokens) and drift (first kl_tokens):
            # greedy decoding is deterministic, so a shorter run is a prefix of a longer one.
            n_tok = max(cfg.max_new_tokens, cfg.kl_tokens)
            toks, _ = generate_responses(model, tokenizer, prompts, cfg, n_tok)
            continuations = [t[:cfg.kl_tokens] for t in toks]
            texts = decode(tokenizer, [t[:cfg.max_new_tokens] for t in toks])
        else:
            _, texts = generate_responses(model, tokenizer, prompts, cfg)
        responses[name] = texts
        refused[name] = scorer.score(prompts, texts) if prompts else []
    n_pos = max((len(c) for c in continuations), default=0)
    k = cfg.kl_topk
    ids, logp, tail, mask, tok = [], [], [], [], []
    vocab = 0
    for batch in continuation_logp(model, tokenizer, sets.harmless, continuations, cfg):
        if batch.logp.shape[1] == 0:
            continue
        vocab = batch.logp.shape[-1]
        d = compress(batch.logp, k)
        ids.append(d.ids.cpu().to(torch.int32)); logp.append(d.logp.cpu()); tail.append(d.tail.cpu())
        mask.append(batch.mask.cpu())
        tok.append(torch.gather(batch.logp, -1, batch.target.unsqueeze(-1)).squeeze(-1).cpu())
    if ids:
        dist = CompressedDist(_pad_rows(ids, n_pos, 0), _pad_rows(logp, n_pos, float("-inf")),
                              _pad_rows(tail, n_pos, float("-inf")))
        mask_t, tok_t = _pad_rows(mask, n_pos, False), _pad_rows(tok, n_pos, float("-inf"))
    else:
        n = len(sets.harmless)
        dist = CompressedDist(torch.zeros(n, 0, 0, dtype=torch.int32), torch.zeros(n, 0, 0), torch.zeros(n, 0))
        mask_t, tok_t = torch.zeros(n, 0, dtype=torch.bool), torch.zeros(n, 0)
    return Reference(
        responses=responses, refused=refused, continuations=continuations, dist=dist, mask=mask_t,
        token_logp=tok_t, ref_nll=reference_text_nll(model, tokenizer, sets, cfg),
        mc_scores={name: mc_choice_scores(model, tokenizer, items, cfg.batch_size, cfg.mc_norm,
                                          cfg.system_prompt)
                   for name, items in sets.mc.items() if items},
        exact=exact_probes(model, tokenizer, sets, cfg), vocab=vocab,
    )


def reference_text_nll(model: Any, tokenizer: Any, sets: EvalSets, cfg: EvalSettings) -> list[list[float]]:
    if not sets.reference_text:
        return []
    windows = text_windows(tokenizer, sets.reference_text, cfg.ppl_window)
    nll = sequence_nll(model, tokenizer, [w[:1] for w in windows], [w[1:] for w in windows], cfg.batch_size)
    return [x.tolist() for x in nll]


def exact_probes(model: Any, tokenizer: Any, sets: EvalSets, cfg: EvalSettings) -> dict[str, dict[str, list[Any]]]:
    out: dict[str, dict[str, list[Any]]] = {}
    system = cfg.system_prompt
    if sets.gsm8k:
        texts, ok = exact_match(model, tokenizer, sets.gsm8k, "number", cfg.gsm8k_max_new_tokens,
                                cfg.generate_batch_size, system)
        out["gsm8k"] = {"responses": texts, "correct": ok}
    if sets.skill:
        texts, ok = exact_match(model, tokenizer, sets.skill, "text", cfg.skill_max_new_tokens,
                                cfg.generate_batch_size, system)
        out["skill"] = {"responses": texts, "correct": ok}
    return out


def mc_correct(ref_scores: dict[str, list[list[float]]], sets: EvalSets) -> dict[str, list[bool]]:
    return {name: mc_accuracy(scores, sets.mc[name]) for name, scores in ref_scores.items()}


# ----------------------------------------------------------------------------- persistence


def save_reference(ref: Reference, out_dir: Path) -> None:
    """reference.safetensors (distributions along y) + reference.json (texts, labels, scores)."""
    out_dir = Path(out_dir)
    n = len(ref.continuations)
    width = ref.mask.shape[1] if ref.mask.ndim == 2 else 0
    cont = torch.full((n, width), -1, dtype=torch.int64)
    for i, c in enumerate(ref.continuations):
        cont[i, :len(c)] = torch.tensor(c, dtype=torch.int64)
    save_file({"topk_ids": ref.dist.ids.contiguous(), "topk_logp": ref.dist.logp.contiguous(),
               "tail_logp": ref.dist.tail.contiguous(), "mask": ref.mask.to(torch.uint8).contiguous(),
               "token_logp": ref.token_logp.contiguous(), "continuations": cont.contiguous()},
              str(out_dir / REFERENCE_TENSORS))
    payload = {"responses": ref.responses, "refused": ref.refused, "ref_nll": ref.ref_nll,
               "mc_scores": ref.mc_scores, "exact": ref.exact, "vocab": ref.vocab,
               "continuation_lengths": [len(c) for c in ref.continuations]}
    (out_dir / REFERENCE_JSON).write_text(json.dumps(payload, allow_nan=True), encoding="utf-8")


def load_reference(art_dir: Path) -> Reference:
    art_dir = Path(art_dir)
    for name in (REFERENCE_TENSORS, REFERENCE_JSON):
        if not (art_dir / name).is_file():
            raise FileNotFoundError(f"reference artifact {art_dir} lacks {name}; rerun evaluate with force=true")
    t = load_file(str(art_dir / REFERENCE_TENSORS))
    meta = json.loads((art_dir / REFERENCE_JSON).read_text(encoding="utf-8"))
    cont = [row[:n].tolist() for row, n in zip(t["continuations"], meta["continuation_lengths"])]
    return Reference(
        responses=meta["responses"], refused={k: [bool(x) for x in v] for k, v in meta["refused"].items()},
        continuations=cont, dist=CompressedDist(t["topk_ids"], t["topk_logp"], t["tail_logp"]),
        mask=t["mask"].bool(), token_logp=t["token_logp"], ref_nll=meta["ref_nll"],
        mc_scores=meta["mc_scores"], exact=meta["exact"], vocab=int(meta["vocab"]),
    )


def nll_arrays(ref_nll: list[list[float]]) -> list[np.ndarray]:
    return [np.asarray(x, dtype=np.float64) for x in ref_nll]
