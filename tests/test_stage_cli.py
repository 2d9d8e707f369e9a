"""Stages run alone from the command line: they publish, reuse, and name what is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from saber.testing.tiny_models import build_tiny

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def stage(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_stage_alone_names_missing_upstream_then_runs(tmp_path: Path) -> None:
    model = build_tiny("llama", tmp_path / "tiny")
    common = [f"model.path={model}", "model.name=tiny", "data=default", "evaluate=default",
              f"store_root={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}",
              "data.harmful.limit=24", "data.harmless.limit=24", "data.capability.limit=24"]
    missing = stage("extract", *common)
    assert missing.returncode != 0
    assert "stage 'collect' has no artifact" in missing.stderr and "make collect" in missing.stderr

    assert stage("collect", *common).returncode == 0
    extract = stage("extract", *common)
    assert extract.returncode == 0, extract.stderr[-2000:]
    assert "extract: " in extract.stdout
    again = stage("extract", *common)
    assert "cache hit extract" in again.stdout + again.stderr
