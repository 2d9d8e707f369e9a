"""Check command-line override keys against the schema before Hydra composes the config.

Hydra reports an unknown key as "Could not override ... To append to your config use +key",
advice that then fails against the structured schema. This check names the key and the closest
valid ones instead ("did you mean rank.top_k?").
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from typing import Any

from saber.config.schema import ConfigError, SaberConfig

GROUP_ONLY = ("experiment", "sweep")  # config groups selected with +group=option, not schema keys


def _fields(cls: Any) -> dict[str, Any]:
    """Field name -> dataclass type (or None for leaves and free-form mappings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None)
            for f in dataclasses.fields(cls)}


def unknown_key_message(key: str) -> str | None:
    """None when `key` (a dotted path) exists in the schema, else a message with suggestions."""
    node: Any = SaberConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = _fields(node)
        if part not in fields:
            prefix = ".".join(parts[:depth])
            options = [f"{prefix}.{name}" if prefix else name for name in fields]
            close = difflib.get_close_matches(key if depth == len(parts) - 1 else ".".join(parts[:depth + 1]),
                                              options, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; valid keys here: {', '.join(sorted(options))}"
            return f"config key '{key}' does not exist{hint}"
        node = fields[part]
        if node is None:  # a leaf, or a mapping whose keys are free
            return None
    return None


def check_override_keys(argv: Sequence[str]) -> None:
    """Raise ConfigError for the first `key=value` override whose key is not in the schema."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "+", "~")):
            continue
        key = arg.split("=", 1)[0]
        if key.startswith("hydra") or "/" in key or "." not in key and key in _fields(SaberConfig):
            continue  # Hydra's own keys, group selections (model=..., hydra/launcher=...) and top-level keys
        if key in GROUP_ONLY:
            continue
        message = unknown_key_message(key)
        if message:
            raise ConfigError(message)
