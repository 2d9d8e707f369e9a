"""KL divergence between the base and the edited model's next-token distributions.

All log-probabilities are float32 log-softmax over raw logits, whatever the model dtype.

Conventions (see docs/EVALUATION.md):
- A position whose logits hold NaN or +inf, or no finite value at all, is not a distribution:
  it is masked out of every aggregate (and counted).
- Tokens with p_base = 0 (suppressed, logit -inf) contribute exactly 0 (0 log 0 = 0).
- Tokens with p_base > 0 but p_edit = 0 would make KL infinite; the edited log-prob is floored
  at LOGP_FLOOR = log(2^-149), the smallest positive float32, i.e. "the edited model gave this
  token the least probability float32 can express". Such positions are counted as `floored`.
- The base distribution is stored in the reference as its top-k tokens plus one tail bucket
  (the remaining mass). KL of that coarse-grained pair is a lower bound on the full KL (log-sum
  inequality) and equals it when k covers the vocabulary or the base tail mass is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOGP_FLOOR = math.log(2.0 ** -149)  # about -103.28: log of the smallest positive float32


def safe_log_softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 log-softmax over the last axis and a mask of positions that are distributions.

    Invalid positions (NaN or +inf anywhere, or every logit -inf) get log-probs of -inf
    everywhere instead of NaN, so downstream sums never produce NaN by accident.
    """
    x = logits.float()
    valid = ~(torch.isnan(x).any(-1) | torch.isposinf(x).any(-1)) & torch.isfinite(x).any(-1)
    x = torch.where(valid.unsqueeze(-1), x, torch.zeros_like(x))
    logp = torch.log_softmax(x, dim=-1)
    logp = torch.where(valid.unsqueeze(-1), logp, torch.full_like(logp, float("-inf")))
    return logp, valid


@dataclass
class CompressedDist:
    """A base next-token distribution kept as its top-k tokens plus one tail bucket.

    ids: int64 [..., k]; logp: float32 [..., k] (log p of those tokens, -inf allowed);
    tail: float32 [...] (log of the remaining mass, -inf when the top-k hold it all).
    """

    ids: torch.Tensor
    logp: torch.Tensor
    tail: torch.Tensor


def _logsumexp_or_neginf(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis that returns -inf (not NaN) when every entry is -inf."""
    m = x.max(-1).values
    finite = torch.isfinite(m)
    m0 = torch.where(finite, m, torch.zeros_like(m))
    s = torch.exp(x - m0.unsqueeze(-1)).sum(-1)
    out = m0 + torch.log(s)
    return torch.where(finite, out, torch.full_like(out, float("-inf")))


def _tail_logp(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass of `logp` outside the token ids `ids`."""
    rest = logp.scatter(-1, ids.long(), float("-inf"))
    return _logsumexp_or_neginf(rest)


def compress(logp: torch.Tensor, k: int) -> CompressedDist:
    """Keep the k most likely tokens of each distribution (k <= 0 or k >= vocab: all of them)."""
    vocab = logp.shape[-1]
    k = vocab if k <= 0 or k >= vocab else k
    top = torch.topk(logp, k, dim=-1)
    ids = top.indices
    if k == vocab:
        tail = torch.full(logp.shape[:-1], float("-inf"), dtype=torch.float32, device=logp.device)
    else:
        tail = _tail_logp(logp, ids)
    return CompressedDist(ids=ids, logp=top.values.float(), tail=tail.float())


def kl_terms(logp_p: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Elementwise p (log p - log q) with 0 log 0 = 0 and log q floored at LOGP_FLOOR (float64)."""
    lp = logp_p.double()
    lq = logq.double().clamp(min=LOGP_FLOOR)
    p = torch.exp(lp)
    term = p * (lp - lq)
    return torch.where(torch.isfinite(lp) & (p > 0), term, torch.zeros_like(term))


def kl_compressed(base: CompressedDist, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(P_base || P_edit) per position from a compressed base and full edited log-probs.

    Returns (kl float64 [...], floored bool [...]): `floored` marks positions where the edited
    model gave probability 0 to a token (or the tail) that the base model did not.
    """
    ids = base.ids.long()
    q_top = torch.gather(logq, -1, ids)
    q_tail = _tail_logp(logq, ids) if base.ids.shape[-1] < logq.shape[-1] else \
        torch.full(logq.shape[:-1], float("-inf"), dtype=logq.dtype, device=logq.device)
    kl = kl_terms(base.logp, q_top).sum(-1) + kl_terms(base.tail, q_tail)
    p_pos_top = torch.isfinite(base.logp) & ~torch.isfinite(q_top)
    p_pos_tail = torch.isfinite(base.tail) & ~torch.isfinite(q_tail)
    floored = p_pos_top.any(-1) | p_pos_tail
    # KL >= 0 exactly; tiny negatives are float rounding of nearly equal distributions.
    return kl.clamp(min=0.0), floored


def kl_full(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Exact KL(P || Q) over the full vocabulary, per position (float64), same conventions."""
    return kl_terms(logp, logq).sum(-1).clamp(min=0.0)
