"""Batched greedy generation and teacher-forced scoring with left-padded prompts.

Layout of every batch: [left pad][prompt][continuation][right pad]. Prompts are left-padded so
that every row's response starts at the same column; continuations are right-padded. Position
ids are computed from the attention mask, so a row's numbers do not depend on how much padding
its batch needed.
"""

from __future__ import annotations

import copy
import inspect
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from saber.evaluate.divergence import safe_log_softmax
from saber.model.chat import encode_ids, position_ids, render_prompts

log = logging.getLogger(__name__)
T = TypeVar("T")

# The generation batch size that last fitted in GPU memory, per model: later calls start there
# instead of running out of memory again.
_FITTED_BATCH: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def encode_prompts(tokenizer: Any, prompts: Sequence[str], system_prompt: str | None = None,
                   max_length: int = 1024) -> list[list[int]]:
    """Token ids of chat-rendered prompts, rendered and encoded exactly as collect does."""
    if not prompts:
        return []
    ids, _ = encode_ids(tokenizer, render_prompts(tokenizer, prompts, system_prompt), max_length)
    return ids


def encode_text(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of plain continuations (answer choices), no special tokens."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def pad_id_of(tokenizer: Any) -> int:
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if cand is not None:
            return int(cand)
    return 0


def eos_ids_of(model: Any, tokenizer: Any) -> set[int]:
    """Every token id that ends a response: generation config EOS ids and the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for value in (eos, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return ids


def model_device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


def _layout(prompts: Sequence[Sequence[int]], conts: Sequence[Sequence[int]] | None,
            pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """input ids and attention mask for [left pad][prompt][cont][right pad]; returns prompt width P."""
    width = max(len(p) for p in prompts)
    cont_width = max((len(c) for c in conts), default=0) if conts is not None else 0
    ids = torch.full((len(prompts), width + cont_width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} of the batch encodes to zero tokens; remove empty prompts")
        ids[i, width - len(p):width] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):width] = 1
        if conts is not None and conts[i]:
            c = conts[i]
            ids[i, width:width + len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, width:width + len(c)] = 1
    return ids.to(device), mask.to(device), width


def halving_batches(n: int, size: int, run: Callable[[int, int], T], *, what: str, knob: str, single: str,
                    fitted: Callable[[int], None] | None = None) -> Iterator[tuple[int, int, T]]:
    """`run(start, stop)` over the items 0..n-1 in batches of `size`, yielded in order with their
    bounds. A GPU out-of-memory error retries the batch at half the size (told to `fitted`);
    at size 1 it raises RuntimeError(`single`)."""
    start = 0
    while start < n:
        stop = min(start + size, n)
        try:
            result = run(start, stop)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise RuntimeError(single) from None
            torch.cuda.empty_cache()
            size = max(1, size // 2)
            if fitted is not None:
                fitted(size)
            log.warning("out of GPU memory %s; retrying with batch size %d (set %s to start there)", what, size, knob)
            continue
        yield start, stop, result
        start = stop


@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                    batch_size: int, *, exact: bool = False) -> list[list[int]]:
    """Greedy continuations, each cut after its first EOS token (the EOS is kept).

    `exact` gives every continuation exactly max_new_tokens tokens: EOS is suppressed until then,
    so an answer that would end early goes on with the model's best non-EOS tokens. On a GPU
    out-of-memory error the batch is retried at half the size, down to one prompt, and later
    calls on the same model start at the size that fitted.
    """
    device = model_device(model)
    pad_id = pad_id_of(tokenizer)
    eos = eos_ids_of(model, tokenizer)
    gen_cfg = copy.deepcopy(model.generation_config)
    gen_cfg.do_sample = False
    gen_cfg.num_beams = 1
    for name in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if hasattr(gen_cfg, name):
            setattr(gen_cfg, name, None)
    gen_cfg.max_new_tokens = max_new_tokens
    gen_cfg.min_new_tokens = max_new_tokens if exact else None
    gen_cfg.max_length = None
    gen_cfg.pad_token_id = pad_id
    gen_cfg.eos_token_id = sorted(eos) or None
    # longest first, so a batch holds prompts of similar length and little padding
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]), reverse=True)
    out: list[list[int]] = [[] for _ in prompt_ids]

    def generate(start: int, stop: int) -> list[list[int]]:
        ids, mask, width = _layout([prompt_ids[i] for i in order[start:stop]], None, pad_id, device)
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)[:, width:].tolist()

    size = min(batch_size, _FITTED_BATCH.get(model, batch_size))
    for start, stop, rows in halving_batches(
            len(order), size, generate, what="in generation", knob="evaluate.generate_batch_size",
            single=f"out of GPU memory generating one answer of {max_new_tokens} tokens; lower "
                   "evaluate.max_prompt_tokens or the answer length",
            fitted=lambda fits: _FITTED_BATCH.__setitem__(model, fits)):
        for i, row in zip(order[start:stop], rows):
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            out[i] = row[:cut]
    return out


def decode(tokenizer: Any, token_ids: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]


@dataclass
class ScoredBatch:
    """Teacher-forced log-probs of one batch: rows `index` of the input, response positions only.

    logp: float32 [B, N, V] next-token log-probs at the positions that predict cont[:, 0..N-1];
    mask: bool [B, N], True on real continuation tokens whose logits form a distribution;
    target: int64 [B, N] the continuation tokens (pad where masked);
    real: bool [B, N], True on real continuation tokens (mask plus positions with unusable logits).
    """

    index: list[int]
    logp: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    real: torch.Tensor


def keeps_logits(model: Any) -> bool:
    """Whether the model's forward takes `logits_to_keep` (every current transformers causal LM
    does), so scoring can project only the answer positions onto the vocabulary."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _score_batch(model: Any, index: list[int], prompts: Sequence[Sequence[int]], conts: Sequence[Sequence[int]],
                 pad_id: int, device: torch.device, keep: bool) -> ScoredBatch:
    n = max((len(c) for c in conts), default=0)
    if n == 0:
        b = len(prompts)
        return ScoredBatch(index, torch.zeros(b, 0, 0), torch.zeros(b, 0, dtype=torch.bool),
                           torch.zeros(b, 0, dtype=torch.long), torch.zeros(b, 0, dtype=torch.bool))
    ids, mask, width = _layout(prompts, conts, pad_id, device)
    extra = {"logits_to_keep": ids.shape[1] - width + 1} if keep else {}  # from the last prompt token on
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), **extra).logits
    first = logits.shape[1] - (ids.shape[1] - width + 1)  # column of the last prompt token in `logits`
    logp, valid = safe_log_softmax(logits[:, first:first + n])
    real = mask[:, width:width + n].bool()
    return ScoredBatch(index, logp, valid & real, ids[:, width:width + n], real)


@torch.no_grad()
def teacher_forced(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]],
                   cont_ids: Sequence[Sequence[int]], batch_size: int) -> Iterator[ScoredBatch]:
    """Score each [prompt; continuation] once; yield log-probs of the continuation positions.

    Batches come in input order. Only the answer positions reach the vocabulary projection
    where the model allows it (`keeps_logits`), and a GPU out-of-memory error retries the batch
    at half the size.
    """
    if len(prompt_ids) != len(cont_ids):
        raise ValueError(f"teacher_forced: {len(prompt_ids)} prompts but {len(cont_ids)} continuations")
    device = model_device(model)
    pad_id = pad_id_of(tokenizer)
    keep = keeps_logits(model)
    score = lambda start, stop: _score_batch(  # noqa: E731
        model, list(range(start, stop)), prompt_ids[start:stop], cont_ids[start:stop], pad_id, device, keep)
    for _, _, batch in halving_batches(len(prompt_ids), batch_size, score, what="in teacher-forced scoring",
                                       knob="evaluate.batch_size",
                                       single="out of GPU memory scoring one prompt and answer; lower "
                                              "evaluate.max_prompt_tokens or evaluate.kl_tokens"):
        yield batch
