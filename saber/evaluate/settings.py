"""The settings every evaluation routine reads: the evaluate config plus the model's system prompt."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from saber.config.schema import EvaluateConfig


@dataclass
class EvalSettings(EvaluateConfig):
    """`evaluate.*` with `model.system_prompt` beside it: the one object the evaluation library reads.

    Its defaults are the schema's, so a caller outside the pipeline states only what differs.
    """

    system_prompt: Optional[str] = None


def run_settings(cfg: Any) -> EvalSettings:
    """The EvalSettings of a validated SaberConfig."""
    values = {f.name: getattr(cfg.evaluate, f.name) for f in dataclasses.fields(cfg.evaluate)}
    return EvalSettings(**values, system_prompt=cfg.model.system_prompt)
