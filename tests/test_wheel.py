"""The built wheel carries its config and organisms: install it in a fresh venv and run from an empty directory."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, **kwargs: object) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200, **kwargs)


def test_wheel_installs_and_runs_from_an_empty_directory(tmp_path: Path) -> None:
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("saber_abliteration-*.whl")

    # A fresh venv with the wheel alone; its dependencies come from this environment's
    # site-packages through a .pth line (nothing is downloaded, and this checkout is not on the path).
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp_path).stdout.strip())
    (site / "zz_saber_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]

    empty = tmp_path / "empty"
    empty.mkdir()
    where = run([str(python), "-c", "import saber, saber.config.paths as p; print(saber.__file__); print(p.conf_dir())"],
                cwd=empty)
    package, conf = where.stdout.split()
    assert Path(package).is_relative_to(site) and Path(conf) == site / "saber" / "conf"

    job = run([str(env_dir / "bin" / "saber"), "--cfg", "job"], cwd=empty)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "name: organism" in job.stdout and "stages:" in job.stdout

    # The whole pipeline on the shipped organism, from the empty directory, writing only there.
    result = run([str(python), "-m", "saber.run", "+experiment=organism", "edit.export=false"], cwd=empty)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refusal_rate" in result.stdout and (empty / "outputs" / "store" / "evaluate").is_dir()
