"""Command-line failures: one line naming the key or file, a distinct exit code, nothing lost."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saber.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parent.parent


def tree_sums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def saber(tmp_path: Path, *overrides: str, module: str = "saber.run",
          env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", module, f"store_root={tmp_path / 'store'}",
                           f"hydra.run.dir={tmp_path / 'run'}", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture()
def sandbox(tmp_path: Path, tiny_dirs: dict[str, Path]) -> dict[str, Path]:
    """A copy of a tiny model beside a sentinel file, with checksums of everything taken up front."""
    import shutil

    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_dirs["llama"], model)
    (tmp_path / "models" / "sentinel.txt").write_text("not SABER's")
    return {"root": tmp_path, "model": model}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["out_is_model", "out_holds_store", "out_is_foreign", "missing_model",
                                  "bad_value", "unknown_key", "count_k", "count_m"])
def test_bad_input_is_one_line_with_its_exit_code_and_touches_nothing(sandbox: dict[str, Path], case: str) -> None:
    root, model = sandbox["root"], sandbox["model"]
    before = tree_sums(root / "models")
    (root / "store").mkdir()
    (root / "store" / "keep.txt").write_text("store file")
    foreign = root / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    base = [f"model.path={model}", "data=default"]
    overrides, key, kind = {
        "out_is_model": ([*base, f"edit.out_dir={model}", "edit.overwrite=true"], "edit.out_dir", "output"),
        "out_holds_store": ([*base, f"edit.out_dir={root}", "edit.overwrite=true"], "edit.out_dir", "output"),
        "out_is_foreign": ([*base, f"edit.out_dir={foreign}", "edit.overwrite=true"], "not made by a SABER export",
                           "output"),
        "missing_model": (["model.path=/nonexistent/model", "data=default"], "model.path", "model"),
        "bad_value": ([*base, "model.organism_source=download"], "model.organism_source", "config"),
        "unknown_key": ([*base, "rank.topk=3"], "did you mean rank.top_k", "config"),
        "count_k": ([*base, "extract.k=5000"], "'extract.k' = 5000", "config"),
        "count_m": ([*base, "entangle.m=5000"], "'entangle.m' = 5000", "config"),
    }[case]
    result = saber(root, *overrides)
    assert result.returncode == EXIT_CODES[kind], result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and key in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert tree_sums(root / "models") == before  # the source model and the sentinel are untouched
    assert (root / "store" / "keep.txt").read_text() == "store file"
    assert not list((root / "store").glob("*/*/manifest.json"))  # failed before any stage published
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1


@pytest.mark.slow
def test_debug_shows_the_traceback(sandbox: dict[str, Path]) -> None:
    result = saber(sandbox["root"], "model.path=/nonexistent/model", "data=default", "debug=true")
    assert result.returncode == 1 and "Traceback" in result.stderr and "ModelLoadError" in result.stderr
