"""The settings every evaluation routine reads: the evaluate config plus the model's system prompt."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any


def run_settings(cfg: Any) -> SimpleNamespace:
    """`cfg.evaluate` with `system_prompt` from `cfg.model` (the library reads both from one object)."""
    fields = dataclasses.asdict(cfg.evaluate)
    fields["auto"] = cfg.evaluate.auto  # keep the nested settings an object, as the library reads them
    return SimpleNamespace(**fields, system_prompt=cfg.model.system_prompt)
