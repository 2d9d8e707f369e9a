"""Forward hooks that keep only the trailing positions of each decoder layer's residual stream.

Each decoder layer gets a hook that slices its output to the last P positions (with left padding
these are the last P real tokens of every row), casts to float32 and copies to the CPU at once,
so a forward pass never holds full-sequence hidden states for all layers. The residual stream is
read through the architecture adapter (Gemma 3n: AltUp stream `altup_active_idx`, the one that
`output_hidden_states` reports as index 0 of its stacked tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from saber.model.adapters import get_adapter


class StopForward(Exception):
    """Raised after the last decoder layer when the rest of the forward (norm, head) is not needed."""


class ActivationCapture:
    """Trailing-position activations per layer, gathered over one or more forward passes."""

    def __init__(self, n_layers: int, positions: int) -> None:
        self.n_layers = n_layers
        self.positions = positions
        self._chunks: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.expected_length: int | None = None

    def record(self, layer: int, hidden: torch.Tensor) -> None:
        if hidden.dim() != 3:
            raise RuntimeError(f"layer {layer}: expected a residual stream [B, S, d], got shape "
                               f"{tuple(hidden.shape)}")
        length = hidden.shape[1]
        if self.expected_length is not None and length != self.expected_length:
            raise RuntimeError(
                f"layer {layer} saw {length} positions but the input has {self.expected_length}: "
                "the model skipped positions (Gemma 4 KV-shared layers do this with logits_to_keep "
                "or inside generate() prefill); capture with a plain full forward, use_cache=False")
        if length < self.positions:
            raise RuntimeError(f"layer {layer}: sequence of {length} tokens is shorter than the "
                               f"{self.positions} positions to capture (collect.positions)")
        tail = hidden[:, -self.positions:, :].detach()
        # copy=True: never keep a view that pins the full-sequence tensor alive.
        self._chunks[layer].append(tail.to(device="cpu", dtype=torch.float32, copy=True))

    def take(self) -> list[torch.Tensor]:
        """Per layer [B, P, d] float32 on the CPU (batches since the last take, concatenated)."""
        counts = {len(chunks) for chunks in self._chunks}
        if counts == {0}:
            raise RuntimeError("no activations captured: run a forward pass inside the capture")
        if len(counts) != 1:
            raise RuntimeError("layers captured different numbers of forward passes; a forward "
                               "was interrupted before its last layer")
        out = [torch.cat(chunks, dim=0) if len(chunks) > 1 else chunks[0] for chunks in self._chunks]
        self.clear()
        return out

    def clear(self) -> None:
        """Drop what was captured (e.g. after an out-of-memory retry)."""
        self._chunks = [[] for _ in range(self.n_layers)]


def _input_length(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if ids is None:
        embeds = kwargs.get("inputs_embeds")
        return None if embeds is None else int(embeds.shape[1])
    return int(ids.shape[-1])


@contextmanager
def capture_last_positions(
    model: nn.Module, positions: int = 1, *, stop_after_last: bool = False
) -> Iterator[ActivationCapture]:
    """Hook every decoder layer of `model` to capture its last `positions` residual positions.

    With `stop_after_last`, the last layer's hook raises StopForward so the final norm and the
    vocabulary projection (often the largest single matmul) are skipped; the caller catches it.
    Hooks are removed on exit, also on error.
    """
    if positions < 1:
        raise ValueError(f"positions must be >= 1, got {positions}")
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    capture = ActivationCapture(len(layers), positions)
    last = len(layers) - 1

    def pre_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        capture.expected_length = _input_length(args, kwargs)

    def make_hook(index: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            capture.record(index, adapter.layer_output_hidden(output))
            if stop_after_last and index == last:
                raise StopForward

        return hook

    handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    try:
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(make_hook(index)))
        yield capture
    finally:
        for handle in handles:
            handle.remove()
