"""Stage shells: each module reads upstream artifacts, calls the library, writes its artifact.

Each module defines `SPEC`, and pyproject.toml names it in the `saber.stages` entry points; the
library's registry (`saber.pipeline.STAGES`, re-exported here) loads them on first use. The
modules import the library lazily inside their build functions, so listing the stages is cheap.
"""

from __future__ import annotations

from saber.pipeline import STAGES

__all__ = ["STAGES"]
