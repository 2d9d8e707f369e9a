"""Stage shells: each module reads upstream artifacts, calls the library, writes its artifact.

`STAGES` maps a stage name to its `StageSpec`; the modules import the library lazily inside
their build functions, so listing the stages is cheap.
"""

from __future__ import annotations

import importlib

from saber.pipeline import StageSpec
from saber.stage_names import AUXILIARY, STAGE_ORDER


class _Registry(dict):
    """Loads `stages.<name>.SPEC` on first access so a missing stage fails only when used."""

    def __missing__(self, name: str) -> StageSpec:
        if name not in STAGE_ORDER + AUXILIARY:
            raise KeyError(f"unknown stage '{name}'; stages are: {', '.join(STAGE_ORDER + AUXILIARY)}")
        spec = importlib.import_module(f"stages.{name}").SPEC
        self[name] = spec
        return spec

    def __iter__(self):  # type: ignore[override]
        return iter(STAGE_ORDER)

    def __contains__(self, name: object) -> bool:
        return name in STAGE_ORDER + AUXILIARY


STAGES: dict[str, StageSpec] = _Registry()
