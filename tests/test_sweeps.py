"""Hydra multiruns end to end: the gemma4 preset on a tiny Gemma 4, joblib and submitit launchers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from saber.testing.tiny_models import build_tiny

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
# Small evaluation and probe sets keep a tiny-model job to seconds; the grid is shrunk by
# command-line sweep values, which take precedence over the preset's `hydra.sweeper.params`.
SMALL = ["data.harmful.limit=24", "data.harmless.limit=24", "data.capability.limit=24",
         "evaluate.n_harmful=8", "evaluate.n_harmless=8", "evaluate.n_xstest=4", "evaluate.n_capability=4",
         "evaluate.n_gsm8k=2", "evaluate.gsm8k_max_new_tokens=16", "evaluate.max_new_tokens=8",
         "evaluate.kl_tokens=8"]


def run_saber(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "saber.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def job_logs(sweep_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sweep_dir.glob("*/*.log"))


def check_report(sweep_dir: Path, n_jobs: int) -> pd.DataFrame:
    frame = pd.read_parquet(sweep_dir / "sweep.parquet")
    assert len(frame) == n_jobs
    front = pd.read_parquet(sweep_dir / "pareto.parquet")
    assert 1 <= len(front) <= n_jobs
    assert (sweep_dir / "pareto.png").stat().st_size > 0
    assert "Pareto front" in (sweep_dir / "leaderboard.md").read_text()
    return frame


def test_gemma4_sweep_preset_on_tiny_gemma4(tmp_path: Path) -> None:
    model = build_tiny("gemma4", tmp_path / "tiny-gemma4")
    store, sweep = tmp_path / "store", tmp_path / "sweep"
    run_saber(["+sweep=gemma4", f"model.path={model}", "model.device_map=null", "model.dtype=float32",
               f"store_root={store}", f"hydra.sweep.dir={sweep}",
               "entangle.alpha_base=0.825", "rank.top_k=4", "entangle.tau=0.55",
               "entangle.alpha_entangled=0.03,0.1", "extract.k=2", *SMALL])
    frame = check_report(sweep, 2)
    assert frame.overrides.str.contains("entangle.alpha_entangled=0.1").any()
    # both jobs share the probe activations: collect ran once
    assert len(list((store / "collect").glob("*/manifest.json"))) == 1


def test_organism_joblib_2x2_shares_collect(organism_store: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_saber(["+sweep=organism", "hydra/launcher=parallel", f"store_root={organism_store}",
               f"hydra.sweep.dir={sweep}"], timeout=1500)
    frame = check_report(sweep, 4)
    assert frame.refusal_rate.notna().all() and frame.kl_tf_mean.notna().all()
    assert len(list((organism_store / "collect").glob("*/manifest.json"))) == 1
    assert "cache hit collect" in job_logs(sweep)


def test_submitit_local_launcher(tmp_path: Path) -> None:
    model = build_tiny("llama", tmp_path / "tiny-llama")
    store, sweep = tmp_path / "store", tmp_path / "sweep"
    run_saber(["-m", "hydra/launcher=submitit_local", f"model.path={model}", "model.name=tiny",
               "data=default", "evaluate=default", f"store_root={store}", f"hydra.sweep.dir={sweep}",
               "+hydra.callbacks.sweep_report._target_=saber.sweep.SweepReportCallback",
               "rank.top_k=2,4", "extract.k=2", "edit.export=false", *SMALL])
    check_report(sweep, 2)
