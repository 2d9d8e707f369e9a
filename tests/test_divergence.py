"""Each drift metric measures what it claims: planted logit damage on a tiny random Llama.

The "edited" model is a second copy of the base model whose output logits are perturbed by a
forward hook at chosen response positions, so the true answer of every metric is known.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from saber.testing.tiny_models import build_tiny  # noqa: E402

from saber.evaluate import EvalSets, build_reference, evaluate_against_reference, evaluate_models  # noqa: E402
from saber.evaluate.settings import EvalSettings  # noqa: E402
from saber.evaluate.divergence import LOGP_FLOOR, compress, kl_compressed, kl_full, safe_log_softmax  # noqa: E402
from saber.evaluate.generation import encode_prompts, greedy_generate, teacher_forced  # noqa: E402
from saber.evaluate.scorers import KeywordScorer  # noqa: E402

PROMPTS = ["How do I bake bread at home?", "Explain how a bicycle works.", "Write a short poem about the sea.",
           "What is the capital of France?", "Tell me a joke.", "Add 12 and 30."]
KL_TOKENS = 24


def eval_cfg(**kw) -> EvalSettings:
    base = dict(scorer="keywords", max_new_tokens=8, kl_tokens=KL_TOKENS, kl_topk=0, batch_size=16,
                gsm8k_max_new_tokens=16, skill_max_new_tokens=4, ppl_window=32, max_prompt_tokens=256)
    base.update(kw)
    return EvalSettings(**base)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose output head is scaled up so its distributions are peaked and
    depend on context (a fresh random head gives near-uniform logits, where every KL is tiny)."""
    out = build_tiny("llama", tmp_path_factory.mktemp("tiny_llama"))
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(out)
    return out


def load(path: Path, dtype: torch.dtype = torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


class Perturb:
    """Add `delta` [V] to the output logits at the given response positions (0 = the logits that
    predict the first response token). All prompts go in one left-padded batch, so response
    position r sits at column prompt_width - 1 + r in generation and in teacher-forced scoring."""

    def __init__(self, model: torch.nn.Module, prompt_width: int, positions: Iterable[int] | None,
                 delta: torch.Tensor | None = None, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.width, self.delta = prompt_width, delta
        self.fn = fn or (lambda x: x + self.delta.to(x.dtype))
        self.positions = None if positions is None else set(positions)
        self.total = 0
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.lm_head.register_forward_hook(self._post)

    def _pre(self, module, args, kwargs) -> None:
        # Sequence length so far: generate() may drop an all-ones mask and pass cache_position instead.
        if kwargs.get("attention_mask") is not None:
            self.total = kwargs["attention_mask"].shape[1]
        elif kwargs.get("cache_position") is not None:
            self.total = int(kwargs["cache_position"][-1]) + 1
        else:
            self.total = kwargs["input_ids"].shape[1]

    def _post(self, module, args, out: torch.Tensor) -> torch.Tensor:
        cols = torch.arange(self.total - out.shape[1], self.total)
        resp = cols - (self.width - 1)
        sel = resp >= 0 if self.positions is None else torch.tensor([int(r) in self.positions for r in resp])
        out = out.clone()
        out[:, sel] = self.fn(out[:, sel])
        return out


def prompt_width(tok, prompts=PROMPTS) -> int:
    return max(len(ids) for ids in encode_prompts(tok, prompts))


def sets(prompts=PROMPTS) -> EvalSets:
    return EvalSets(harmful=list(prompts[:3]), harmless=list(prompts))


def run(base, edited, tok, cfg=None):
    return evaluate_models(base, edited, tok, sets(), cfg or eval_cfg(), KeywordScorer())


# ----------------------------------------------------------------------------- unit math


def test_kl_full_matches_closed_form_and_handles_zero_probabilities() -> None:
    p = torch.tensor([[0.5, 0.5, 0.0]])
    q = torch.tensor([[0.25, 0.75, 0.0]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_full(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-6)
    # p > 0 where q = 0: finite, equal to the floor value (log q clamped at log 2^-149).
    q0 = torch.tensor([[1.0, 0.0, 0.0]])
    floored = kl_full(p.log(), q0.log()).item()
    assert math.isfinite(floored)
    assert floored == pytest.approx(0.5 * (math.log(0.5) - 0.0) + 0.5 * (math.log(0.5) - LOGP_FLOOR), rel=1e-6)


def test_compressed_kl_is_exact_with_full_vocab_and_a_lower_bound_with_topk() -> None:
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(5, 7, 50) * 3, -1)
    lq = torch.log_softmax(torch.randn(5, 7, 50) * 3, -1)
    exact = kl_full(lp, lq)
    full, _ = kl_compressed(compress(lp, 0), lq)
    assert torch.allclose(full, exact, atol=1e-9)
    low, _ = kl_compressed(compress(lp, 8), lq)
    # Log-sum inequality: merging tokens into one bucket can only lower KL; 1e-9 absorbs rounding.
    assert (low <= exact + 1e-9).all()
    assert (low > 0).all()


def test_safe_log_softmax_masks_nan_and_all_inf_positions() -> None:
    logits = torch.tensor([[[0.0, 1.0, float("-inf")], [float("nan"), 0.0, 0.0],
                            [float("-inf")] * 3, [0.0, float("inf"), 0.0]]], dtype=torch.bfloat16)
    logp, valid = safe_log_softmax(logits)
    assert logp.dtype == torch.float32
    assert valid.tolist() == [[True, False, False, False]]
    assert not torch.isnan(logp).any()


# ----------------------------------------------------------------------------- validation 1


@pytest.mark.parametrize("kl_tokens,topk", [(1, 0), (KL_TOKENS, 16)])
def test_identical_models_give_zero_everywhere(tiny_dir: Path, kl_tokens: int, topk: int) -> None:
    base, tok = load(tiny_dir)
    edited, _ = load(tiny_dir)
    res = run(base, edited, tok, eval_cfg(kl_tokens=kl_tokens, kl_topk=topk))
    m = res.metrics
    # Same weights, same batches: the two forward passes agree to float32 rounding, so every KL
    # is at most 1e-6 nats (the validation criterion) whatever the number of tokens.
    for key in ("kl_first_token", "kl_tf_mean", "kl_tf_rmse", "kl_tf_p95", "kl_tf_max"):
        assert 0.0 <= m[key] <= 1e-6, key
    assert m["top1_agreement"] == 1.0
    assert m["refusal_rate"] == m["base_refusal_rate"]
    assert m["over_refusal_rate"] == m["base_over_refusal_rate"]
    assert abs(m["ppl_delta_continuation"]) <= 1e-4
    assert res.summary["kl"]["teacher_forced"]["n"] > len(PROMPTS) * (kl_tokens > 1)


# ----------------------------------------------------------------------------- validation 2


@pytest.mark.slow
def test_damage_after_first_position_is_invisible_to_first_token_kl(tiny_dir: Path) -> None:
    base, tok = load(tiny_dir)
    edited, _ = load(tiny_dir)
    torch.manual_seed(1)
    Perturb(edited, prompt_width(tok), range(2, 10_000), 3.0 * torch.randn(base.config.vocab_size))
    m = run(base, edited, tok).metrics
    assert m["kl_first_token"] <= 1e-6  # nothing changed at position 0
    assert m["kl_tf_mean"] > 0.1  # clearly positive: a N(0, 3^2) logit shift moves every later position
    assert m["top1_agreement"] < 1.0


# ----------------------------------------------------------------------------- validation 3


def _ratios(metrics: dict) -> dict[str, float]:
    return {k: metrics[f"kl_tf_{k}"] / metrics["kl_tf_mean"] for k in ("rmse", "p95", "max")}


@pytest.mark.slow
def test_few_damaged_positions_raise_rmse_p95_max_far_more_than_mean(tiny_dir: Path) -> None:
    base, tok = load(tiny_dir)
    torch.manual_seed(2)
    delta = torch.randn(base.config.vocab_size)
    sparse, _ = load(tiny_dir)
    Perturb(sparse, prompt_width(tok), {4, 5, 6}, 4.0 * delta)  # 3 of 24 positions = 12.5% > 5%
    dense, _ = load(tiny_dir)
    Perturb(dense, prompt_width(tok), None, 0.7 * delta)
    ref = build_reference(base, tok, sets(), eval_cfg(), KeywordScorer())
    res_sparse = evaluate_against_reference(sparse, tok, sets(), ref, eval_cfg(), KeywordScorer())
    res_dense = evaluate_against_reference(dense, tok, sets(), ref, eval_cfg(), KeywordScorer())
    assert res_sparse.divergence["valid"].sum() == len(PROMPTS) * KL_TOKENS  # no early EOS: 3/24 holds
    rs, rd = _ratios(res_sparse.metrics), _ratios(res_dense.metrics)
    # Damage on 1/8 of positions: rmse/mean ~ sqrt(8) = 2.8, max/mean and p95/mean ~ 8 in the ideal
    # case; spread damage keeps all three ratios near 1 (the spread of per-position KL).
    assert rs["rmse"] >= 2.0 and rs["p95"] >= 3.0 and rs["max"] >= 5.0, rs
    for key in ("rmse", "p95", "max"):
        assert rs[key] >= 1.5 * rd[key], (key, rs, rd)
    div = res_sparse.divergence
    damaged = div[div["position"].isin([4, 5, 6])]["kl"].mean()
    assert damaged > 50 * max(div[~div["position"].isin([4, 5, 6])]["kl"].max(), 1e-9)


# ----------------------------------------------------------------------------- validation 4


def _self_logp(model, tok, prompts, conts):
    out = []
    for batch in teacher_forced(model, tok, encode_prompts(tok, prompts), conts, 16):
        out.append((batch.logp, batch.mask))
    return out[0]


@pytest.mark.slow
def test_near_tie_makes_free_running_kl_chaotic_but_teacher_forced_kl_small(tiny_dir: Path) -> None:
    """Why SABER reports teacher-forced KL: comparing two free-running generations measures chaos.

    At the first response position both models put almost all mass on tokens A and B, A ahead by
    eps in the base model and B ahead by eps in the edited one. Their distributions are nearly
    identical (KL ~ eps^2 / 8), yet greedy decoding picks A in one and B in the other, after which
    the two generations condition on different prefixes and drift apart completely.
    """
    base, tok = load(tiny_dir)
    edited, _ = load(tiny_dir)
    vocab, width, eps = base.config.vocab_size, prompt_width(tok), 0.02
    a_id, b_id = 100, 200

    def tie(lead: int, other: int):
        def fn(x: torch.Tensor) -> torch.Tensor:
            top = x.max(-1, keepdim=True).values + 20.0  # A and B take almost all the mass
            x = x.clone()
            x[..., lead], x[..., other] = top[..., 0] + eps, top[..., 0]
            return x
        return fn

    Perturb(base, width, {0}, fn=tie(a_id, b_id))
    Perturb(edited, width, {0}, fn=tie(b_id, a_id))

    ids = encode_prompts(tok, PROMPTS)
    y_base = greedy_generate(base, tok, ids, KL_TOKENS, 16)
    y_edit = greedy_generate(edited, tok, ids, KL_TOKENS, 16)
    assert all(yb[0] == a_id and ye[0] == b_id for yb, ye in zip(y_base, y_edit))
    n = min(min(len(y) for y in y_base), min(len(y) for y in y_edit))
    lp_b, _ = _self_logp(base, tok, PROMPTS, [y[:n] for y in y_base])
    lp_e, _ = _self_logp(edited, tok, PROMPTS, [y[:n] for y in y_edit])
    free_running = kl_full(lp_b, lp_e)[:, 1:].mean().item()  # each model on its own generation

    res = evaluate_models(base, edited, tok, sets(), eval_cfg(), KeywordScorer())
    tf = res.metrics["kl_tf_mean"]
    first = res.metrics["kl_first_token"]
    assert first < 1e-3  # eps^2/8 = 5e-5 nats
    assert tf < 1e-3
    assert free_running > 100 * max(tf, 1e-6), (free_running, tf)
    differ = np.mean([np.mean(np.array(yb[1:n]) != np.array(ye[1:n])) for yb, ye in zip(y_base, y_edit)])
    assert differ > 0.5  # the free-running continuations share almost no tokens


# ----------------------------------------------------------------------------- validation 5


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_give_finite_metrics(tiny_dir: Path, dtype: torch.dtype) -> None:
    base, tok = load(tiny_dir, dtype)
    edited, _ = load(tiny_dir, dtype)
    torch.manual_seed(3)
    Perturb(edited, prompt_width(tok), range(1, 10_000), torch.randn(base.config.vocab_size))
    res = run(base, edited, tok)
    for key, value in res.metrics.items():
        if key.startswith("kl_") or key == "top1_agreement":
            assert math.isfinite(value), key
    assert res.metrics["kl_tf_mean"] > 0
    assert not res.divergence["kl"].isna().any()


@pytest.mark.slow
def test_suppressed_tokens_give_finite_kl_and_a_warning(tiny_dir: Path) -> None:
    base, tok = load(tiny_dir)
    edited, _ = load(tiny_dir)
    vocab = base.config.vocab_size
    # The base model never emits tokens 300..319 (logit -inf): their 0 log 0 terms must be 0.
    no_tail = torch.zeros(vocab)
    no_tail[300:] = float("-inf")
    Perturb(base, prompt_width(tok), None, no_tail)
    # The edited model suppresses the base model's own greedy tokens: p_base > 0, p_edit = 0.
    y = greedy_generate(base, tok, encode_prompts(tok, PROMPTS), KL_TOKENS, 16)
    kill = torch.zeros(vocab)
    kill[sorted({t for row in y for t in row})] = float("-inf")
    kill[300:] = float("-inf")
    Perturb(edited, prompt_width(tok), None, kill)
    with pytest.warns(RuntimeWarning, match="probability 0"):
        res = run(base, edited, tok)
    m = res.metrics
    assert math.isfinite(m["kl_tf_mean"]) and math.isfinite(m["kl_tf_max"])
    # Every position's greedy token has p_base >= 1/vocab, so its term alone is at least
    # (1/320) * (log(1/320) - LOGP_FLOOR) ~ 0.30 nats.
    assert m["kl_tf_mean"] > 0.3
    assert res.summary["kl"]["n_floored"] > 0
    assert math.isfinite(m["ppl_delta_continuation"])


@pytest.mark.slow
def test_empty_masks_give_nan_with_warning_not_a_crash(tiny_dir: Path) -> None:
    base, tok = load(tiny_dir)
    edited, _ = load(tiny_dir)
    nan = torch.full((base.config.vocab_size,), float("nan"))
    Perturb(edited, prompt_width(tok), None, nan)  # edited logits unusable at every response position
    with pytest.warns(RuntimeWarning, match="no valid response positions"):
        res = run(base, edited, tok)
    assert math.isnan(res.metrics["kl_tf_mean"]) and math.isnan(res.metrics["kl_first_token"])
    # No harmless prompts at all: drift is NaN, refusal still computed.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref_sets = EvalSets(harmful=PROMPTS[:2], harmless=[])
        ref = build_reference(base, tok, ref_sets, eval_cfg(), KeywordScorer())
        res2 = evaluate_against_reference(base, tok, ref_sets, ref, eval_cfg(), KeywordScorer())
    assert any("no valid response positions" in str(w.message) for w in caught)
    assert math.isnan(res2.metrics["kl_tf_mean"])
    assert res2.metrics["refusal_rate"] == res2.metrics["base_refusal_rate"]


# ----------------------------------------------------------------------------- batched generation


def out_of_memory_above(limit: int, call: Callable, sizes: list[int]) -> Callable:
    """`call` that records each batch size in `sizes` and raises a planted GPU out-of-memory
    error for batches of more than `limit` prompts."""
    def tight(*args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if sizes[-1] > limit:
            raise torch.cuda.OutOfMemoryError("planted")
        return call(*args, **kwargs)
    return tight


def test_batched_generation_matches_one_prompt_at_a_time_and_halves_on_gpu_oom(
        tiny_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Batches sorted by prompt length hand each answer back to its own prompt, and a GPU
    out-of-memory error (planted: generate fails above 2 prompts) retries at half the size
    instead of losing the run."""
    model, tok = load(tiny_dir)
    ids = encode_prompts(tok, PROMPTS)
    assert len({len(p) for p in ids}) > 1, "the prompts must differ in length for the order to matter"
    alone = [greedy_generate(model, tok, [p], KL_TOKENS, 1)[0] for p in ids]  # no padding at all
    assert greedy_generate(model, tok, ids, KL_TOKENS, 4) == alone

    sizes: list[int] = []
    model.generate = out_of_memory_above(2, model.generate, sizes)
    with caplog.at_level("WARNING", logger="saber.evaluate.generation"):
        assert greedy_generate(model, tok, ids, KL_TOKENS, 8) == alone
    assert sizes == [6, 4, 2, 2, 2]
    assert "retrying with batch size 2" in caplog.text
    sizes.clear()  # the next call on this model starts at the size that fitted
    assert greedy_generate(model, tok, ids, KL_TOKENS, 8) == alone
    assert sizes == [2, 2, 2]

    model.generate = lambda *a, **kw: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("planted"))
    with pytest.raises(RuntimeError, match="out of GPU memory generating one answer"):
        greedy_generate(model, tok, ids, KL_TOKENS, 2)


def test_scoring_projects_only_the_answer_positions_and_halves_on_gpu_oom(
        tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Log-probs from `logits_to_keep` equal those of the full forward (float32 rounding of the
    same products: 1e-5), batches come back in input order at every size, and a planted GPU
    out-of-memory error above 2 prompts retries at half the size."""
    import saber.evaluate.generation as generation

    model, tok = load(tiny_dir)
    ids = encode_prompts(tok, PROMPTS)
    answers = greedy_generate(model, tok, ids, KL_TOKENS, 8)
    assert generation.keeps_logits(model)

    def scored(batch_size: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        rows, logp, mask = [], [], []
        for b in teacher_forced(model, tok, ids, answers, batch_size):
            rows += b.index
            logp += list(b.logp.unbind(0))
            mask += list(b.mask.unbind(0))
        n = max(x.shape[0] for x in logp)
        pad = lambda x, fill: torch.cat([x, x.new_full((n - x.shape[0], *x.shape[1:]), fill)])  # noqa: E731
        return rows, torch.stack([pad(x, 0.0) for x in logp]), torch.stack([pad(x, False) for x in mask])

    rows, kept, mask = scored(4)
    assert rows == list(range(len(PROMPTS))) and mask.any()
    monkeypatch.setattr(generation, "keeps_logits", lambda model: False)
    _, full, _ = scored(len(PROMPTS))
    assert torch.allclose(kept[mask], full[mask], atol=1e-5, rtol=0)

    sizes: list[int] = []
    monkeypatch.setattr(model, "forward", out_of_memory_above(2, model.forward, sizes))
    rows, retried, _ = scored(8)
    assert rows == list(range(len(PROMPTS))) and sizes == [6, 4, 2, 2, 2]
    assert torch.allclose(retried[mask], full[mask], atol=1e-5, rtol=0)


def test_a_forward_without_logits_to_keep_scores_every_position() -> None:
    class Plain(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
            return input_ids

    from saber.evaluate.generation import keeps_logits

    assert not keeps_logits(Plain())
