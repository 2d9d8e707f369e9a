"""Chat rendering and batch encoding for prompt-only forward passes.

Prompts are rendered with the tokenizer's chat template and the generation prompt, so the last
token of a rendered prompt is where the model starts its answer (the position collect reads).
Batches are padded and truncated on the left: position -1 is then the last real token of every
row, whatever the row's length.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

log = logging.getLogger("saber.model")

#: Used when a tokenizer has no chat template (base models, the fallback of last resort).
FALLBACK_TEMPLATE = "{system}User: {prompt}\nAssistant:"
FALLBACK_SYSTEM = "System: {system}\n\n"


def _has_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render_one(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(f"chat template returned {type(text).__name__}, expected a string")
    return text


def render_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    system_prompt: str | None = None,
) -> list[str]:
    """Each prompt as one user turn (plus an optional system turn), ready for the answer.

    A template that rejects the system role (it raises, as Gemma 2's does) gets the system prompt
    folded into the user message as "system\\n\\nprompt". A tokenizer without a chat template uses
    FALLBACK_TEMPLATE ("System: ...\\n\\nUser: ...\\nAssistant:").
    """
    if isinstance(prompts, str):
        raise TypeError("render_prompts expects a sequence of prompts, got a single string")
    if not _has_template(tokenizer):
        system = FALLBACK_SYSTEM.format(system=system_prompt) if system_prompt else ""
        return [FALLBACK_TEMPLATE.format(system=system, prompt=p) for p in prompts]
    fold = False
    if system_prompt:
        try:
            _render_one(tokenizer, [{"role": "system", "content": system_prompt},
                                    {"role": "user", "content": "x"}])
        except Exception as exc:  # noqa: BLE001 - jinja templates raise whatever they like
            log.info("chat template rejects the system role (%s); folding the system prompt "
                     "into the user message", exc)
            fold = True
    rendered = []
    for prompt in prompts:
        if not system_prompt:
            messages = [{"role": "user", "content": prompt}]
        elif fold:
            messages = [{"role": "user", "content": f"{system_prompt}\n\n{prompt}"}]
        else:
            messages = [{"role": "system", "content": system_prompt},
                        {"role": "user", "content": prompt}]
        rendered.append(_render_one(tokenizer, messages))
    return rendered


def add_special_tokens_for(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    """Whether to let the tokenizer add its special tokens to `text`.

    Only a missing leading BOS is ever added. Text that already starts with BOS (chat templates
    usually write it) would get a second one, and a tokenizer that appends EOS would move the
    last prompt position onto that EOS; both cases encode without special tokens.
    """
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    special = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if special == plain or bos is None:
        return False
    if plain[:1] == [bos]:
        return False
    return special == [bos, *plain]


def encode_ids(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> tuple[list[list[int]], int]:
    """Token ids of each text, truncated on the left to `max_length`; also the number truncated.

    Truncation keeps the end (the generation prompt, whose last token collect reads) and a
    leading BOS.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not texts:
        return [], 0
    special = add_special_tokens_for(tokenizer, texts[0])
    ids = tokenizer(list(texts), add_special_tokens=special)["input_ids"]
    truncated = sum(len(row) > max_length for row in ids)
    return [_truncate_left(list(row), max_length, tokenizer.bos_token_id) for row in ids], truncated


def _truncate_left(row: list[int], max_length: int, bos: int | None) -> list[int]:
    """Keep the last `max_length` tokens; a leading BOS survives (some models break without it)."""
    if len(row) <= max_length:
        return row
    if bos is not None and row[0] == bos and max_length > 1:
        return [bos, *row[len(row) - max_length + 1:]]
    return row[len(row) - max_length:]


def pad_left(ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> BatchEncoding:
    """Left-pad id lists into `input_ids` and `attention_mask` (safe to pass to generate())."""
    if not ids:
        raise ValueError("pad_left needs at least one sequence")
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        if len(row) == 0:
            raise ValueError(f"sequence {i} is empty after tokenisation")
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return BatchEncoding({"input_ids": input_ids.to(device), "attention_mask": mask.to(device)})


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (pads at 0), as generate() computes them.

    Passing these to a plain forward gives a prompt the same positions alone or next to longer
    prompts, which matters for absolute position embeddings.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_batch(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    device: torch.device | str = "cpu",
) -> BatchEncoding:
    """Rendered texts as one left-padded, left-truncated batch on `device`."""
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; load it with saber.model.loading.load_tokenizer")
    ids, _ = encode_ids(tokenizer, texts, max_length)
    return pad_left(ids, tokenizer.pad_token_id, device)
