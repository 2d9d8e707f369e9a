"""Architecture adapters: where each model family keeps its decoder and residual writers."""

from __future__ import annotations

from typing import Any

import torch

from saber.model.adapters import families as _families  # noqa: F401  (registers the built-in adapters)
from saber.model.adapters.base import (
    ArchitectureAdapter,
    CheckpointTensor,
    EmbeddingSpec,
    NormSpec,
    Writer,
    WriterTemplate,
)
from saber.model.adapters.registry import get_adapter, register_adapter, supported_model_types


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of `model`, whatever wrapper they sit in."""
    return get_adapter(model).decoder_layers(model)


def layer_output_hidden(model: torch.nn.Module, output: Any) -> torch.Tensor:
    """The residual stream [B, S, d] from a decoder layer forward output of `model`."""
    return get_adapter(model).layer_output_hidden(output)


__all__ = [
    "ArchitectureAdapter",
    "CheckpointTensor",
    "EmbeddingSpec",
    "NormSpec",
    "Writer",
    "WriterTemplate",
    "decoder_layers",
    "get_adapter",
    "layer_output_hidden",
    "register_adapter",
    "supported_model_types",
]
