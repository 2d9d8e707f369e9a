"""Capability probes: multiple choice by log-likelihood, exact-match answers, perplexity.

Each probe returns per-item results so that base and edited runs can be compared item by item.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Sequence

import numpy as np
import torch

from saber.evaluate.divergence import LOGP_FLOOR
from saber.evaluate.generation import (decode, encode_prompts, encode_text, greedy_generate,
                                       teacher_forced)


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice question (MMLU / ARC format): the answer is an index into choices."""

    question: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class ExactItem:
    """A prompt with one expected answer (GSM8K final number, or the organism's skill word)."""

    prompt: str
    answer: str


# ----------------------------------------------------------------------------- multiple choice


@torch.no_grad()
def mc_choice_scores(model: Any, tokenizer: Any, items: Sequence[MCItem], batch_size: int,
                     norm: str = "mean", system_prompt: str | None = None) -> list[list[float]]:
    """Log-likelihood of each choice as the assistant's answer to the question.

    norm="mean" divides by the choice's token count (choices of different lengths compete fairly);
    norm="sum" is the raw sequence log-likelihood.
    """
    if norm not in ("mean", "sum"):
        raise ValueError(f"evaluate.mc_norm = {norm!r}: expected mean or sum")
    questions = encode_prompts(tokenizer, [it.question for it in items], system_prompt)
    prompts, conts, owner = [], [], []
    for i, it in enumerate(items):
        for choice_ids in encode_text(tokenizer, list(it.choices)):
            if not choice_ids:
                raise ValueError(f"multiple-choice item {i} has a choice that encodes to zero tokens")
            prompts.append(questions[i])
            conts.append(choice_ids)
            owner.append(i)
    flat: list[float] = [0.0] * len(conts)
    for batch in teacher_forced(model, tokenizer, prompts, conts, batch_size):
        tok_logp = torch.gather(batch.logp, -1, batch.target.unsqueeze(-1)).squeeze(-1).double()
        tok_logp = torch.where(batch.mask, tok_logp, torch.zeros_like(tok_logp))
        for row, idx in enumerate(batch.index):
            total = float(tok_logp[row].sum())
            flat[idx] = total / len(conts[idx]) if norm == "mean" else total
    scores: list[list[float]] = [[] for _ in items]
    for i, s in zip(owner, flat):
        scores[i].append(s)
    return scores


def mc_accuracy(scores: Sequence[Sequence[float]], items: Sequence[MCItem]) -> list[bool]:
    """Per-item correctness: the highest-scoring choice is the answer (ties: first index)."""
    return [int(np.argmax(s)) == it.answer for s, it in zip(scores, items)]


# ----------------------------------------------------------------------------- exact match

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def _canon_number(text: str) -> str | None:
    cleaned = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style solution, in canonical form ("1,000.50" -> "1000.5").

    Priority: the number after the last '####', then after the last 'answer is' / 'answer:',
    then the last number in the text. None when the text holds no number.
    """
    text = text or ""
    for marker in ("####", "answer is", "answer:"):
        idx = text.lower().rfind(marker)
        if idx >= 0:
            found = _NUMBER.findall(text[idx + len(marker):])
            if found:
                return _canon_number(found[0])
    found = _NUMBER.findall(text)
    return _canon_number(found[-1]) if found else None


def number_match(response: str, answer: str) -> bool:
    expected = extract_final_number(answer)
    got = extract_final_number(response)
    return expected is not None and got == expected


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s'-]", " ", text.lower()).split())


def text_match(response: str, answer: str) -> bool:
    """First line of the response equals the answer, ignoring case, punctuation and spacing."""
    from saber.evaluate.scorers import strip_thinking

    lines = [ln for ln in strip_thinking(response).strip().splitlines() if ln.strip()]
    return bool(lines) and _words(lines[0]) == _words(answer)


@torch.no_grad()
def exact_match(model: Any, tokenizer: Any, items: Sequence[ExactItem], kind: str, max_new_tokens: int,
                batch_size: int, system_prompt: str | None = None) -> tuple[list[str], list[bool]]:
    """Greedy answers and their correctness; kind is 'number' (GSM8K) or 'text' (skill)."""
    match = {"number": number_match, "text": text_match}.get(kind)
    if match is None:
        raise ValueError(f"exact_match kind {kind!r}: expected number or text")
    ids = encode_prompts(tokenizer, [it.prompt for it in items], system_prompt)
    texts = decode(tokenizer, greedy_generate(model, tokenizer, ids, max_new_tokens, batch_size))
    return texts, [match(t, it.answer) for t, it in zip(texts, items)]


# ----------------------------------------------------------------------------- perplexity


def text_windows(tokenizer: Any, text: str, window: int) -> list[list[int]]:
    """Split a reference text into consecutive token windows of at most `window` tokens (>= 2)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    chunks = [ids[i:i + window - 1] for i in range(0, len(ids), window - 1)]
    # Each window is scored from a BOS (or its own first token) so windows are independent.
    out = [([bos] + c) if bos is not None else c for c in chunks]
    return [w for w in out if len(w) >= 2]


@torch.no_grad()
def sequence_nll(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], conts: Sequence[Sequence[int]],
                 batch_size: int) -> list[np.ndarray]:
    """Per-token negative log-likelihood (float64, nats) of each continuation given its prompt."""
    out: list[np.ndarray] = [np.zeros(0)] * len(conts)
    for batch in teacher_forced(model, tokenizer, prompts, conts, batch_size):
        tok = torch.gather(batch.logp, -1, batch.target.unsqueeze(-1)).squeeze(-1).double()
        for row, idx in enumerate(batch.index):
            keep = batch.mask[row]
            out[idx] = (-tok[row][keep].clamp(min=LOGP_FLOOR)).cpu().numpy()
    return out


def perplexity(nll: Sequence[np.ndarray]) -> float:
    """exp of the mean per-token NLL over all tokens (finite tokens only); NaN when there are none."""
    allv = np.concatenate([np.asarray(x, dtype=np.float64) for x in nll]) if nll else np.zeros(0)
    allv = allv[np.isfinite(allv)]
    return float(math.exp(allv.mean())) if allv.size else float("nan")
