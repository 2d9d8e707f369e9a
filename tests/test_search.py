"""Search mode: a 16-trial multi-objective study that survives being killed halfway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from test_sweeps import SMALL
from saber.testing.tiny_models import build_tiny

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def complete_trials(journal: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    if not journal.exists():
        return []
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    try:
        trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return []
    return [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]


def test_search_resumes_after_kill(tmp_path: Path) -> None:
    model = build_tiny("llama", tmp_path / "tiny-llama")
    journal = tmp_path / "study.journal"
    cmd = [sys.executable, "-m", "saber.search", f"model.path={model}", "model.name=tiny", "data=default",
           "evaluate=default", f"store_root={tmp_path / 'store'}", "search.n_trials=16",
           f"search.storage={journal}", "search.study=resume", *SMALL]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    first = subprocess.Popen([*cmd, f"hydra.run.dir={tmp_path / 'run1'}"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and len(complete_trials(journal, "resume")) < 8:
        assert first.poll() is None, "search ended before it could be interrupted"
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = {t.number: t.params for t in complete_trials(journal, "resume")}
    assert 8 <= len(before) < 16

    second = subprocess.run([*cmd, f"hydra.run.dir={tmp_path / 'run2'}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    after = complete_trials(journal, "resume")
    assert len(after) == 16
    # finished trials were kept, not repeated: same numbers, same parameters
    assert {t.number: t.params for t in after if t.number in before} == before
    assert all(len(t.values) == 2 for t in after)  # held-out probe refusal rate and teacher-forced KL
    pareto = json.loads((tmp_path / "run2" / "pareto.json").read_text())
    # chosen on the held-out probe metrics; the evaluation sets' numbers ride along as reported
    assert pareto and all("probe_refusal_rate" in p and "refusal_rate" in p["reported"] for p in pareto)


def _study_with(values: list[list[float]]) -> optuna.Study:
    study = optuna.create_study(directions=["minimize", "minimize"])
    dist = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for i, v in enumerate(values):
        study.add_trial(optuna.trial.create_trial(params={"x": i / 10}, distributions=dist, values=v))
    return study


def test_a_study_whose_trials_all_agree_is_flagged() -> None:
    from saber.search import objectives_shared_by_every_trial

    assert objectives_shared_by_every_trial(_study_with([[0.6, 0.02]] * 3)) == [0.6, 0.02]
    assert objectives_shared_by_every_trial(_study_with([[0.6, 0.02]] * 2 + [[0.6, 0.021]])) is None
    assert objectives_shared_by_every_trial(_study_with([[0.6, 0.02]] * 2)) is None  # too few to tell


def test_the_kernel_search_knobs_change_the_edit(tmp_path: Path) -> None:
    """Every trial of the kernel method's search is a different edit: its knobs are the strengths
    (with the calibration on, 50 trials on organism_hard all gave the same objectives)."""
    model = build_tiny("llama", tmp_path / "tiny-llama")
    journal = tmp_path / "kernel.journal"
    cmd = [sys.executable, "-m", "saber.search", f"model.path={model}", "model.name=tiny", "data=default",
           "evaluate=default", f"store_root={tmp_path / 'store'}", "method=kernel", "search=kernel",
           "search.n_trials=3", f"search.storage={journal}", f"hydra.run.dir={tmp_path / 'run'}", *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    trials = complete_trials(journal, "kernel")
    assert len(trials) == 3
    # teacher-forced KL on the probes differs with the per-layer strengths
    assert len({t.values[1] for t in trials}) == 3, [t.values for t in trials]
    assert "gave the same objectives" not in proc.stderr
