"""Adapter registry: model_type -> adapter, extensible with a decorator."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from saber.model.adapters.base import REGISTRY, ArchitectureAdapter

A = TypeVar("A", bound=type[ArchitectureAdapter])


def register_adapter(cls: A) -> A:
    """Class decorator: make `cls` the adapter for every model type in `cls.model_types`."""
    if not cls.model_types:
        raise ValueError(f"{cls.__name__} declares no model_types")
    for model_type in cls.model_types:
        REGISTRY.by_type[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(REGISTRY.by_type)


def _model_type(model_or_config: Any) -> str:
    if isinstance(model_or_config, str):
        return model_or_config
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ValueError(f"cannot read a model_type from {type(model_or_config).__name__}")
    return str(model_type)


def get_adapter(model_or_config: Any) -> ArchitectureAdapter:
    """The adapter for a model, a config, or a model_type string."""
    model_type = _model_type(model_or_config)
    cls = REGISTRY.by_type.get(model_type)
    if cls is None:
        raise ValueError(
            f"no architecture adapter for model_type {model_type!r}. Supported: {', '.join(supported_model_types())}. "
            "To add one, subclass saber.model.adapters.ArchitectureAdapter (set model_types and "
            "writer_templates; see LlamaAdapter and GemmaAdapter) and decorate it with "
            "@saber.model.adapters.register_adapter."
        )
    return cls()


Factory = Callable[[], ArchitectureAdapter]
