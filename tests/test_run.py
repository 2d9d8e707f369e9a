"""The runner on the default organism: caching, partial reruns, stage subsets, resume, iterations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saber.stage_names import STAGE_ORDER
from saber.testing import compose_config
from saber.run import format_summary, run_pipeline

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
STAGES = STAGE_ORDER


def published(store: Path) -> dict[str, set[str]]:
    """Published artifact directories per stage: those with a manifest, under their final name.

    A build writes its manifest inside a hidden ``.tmp-*`` directory before the atomic rename,
    so a manifest there is not yet published and must not count.
    """
    return {stage: {p.parent.name for p in (store / stage).glob("*/manifest.json")
                    if not p.parent.name.startswith(".")} for stage in STAGES}


def test_full_run_rerun_and_edit_knob(organism_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_config(f"store_root={organism_store}")
    first = run_pipeline(cfg)
    assert set(first.artifacts) == set(STAGES)
    headline = first.summary["headline"]
    for key in ("refusal_rate", "kl_tf_mean", "kl_first_token", "skill_accuracy", "refusal_fragment_rate",
                "probe_refusal_rate", "probe_kl_tf_mean"):  # held-out probe metrics: what sweeps choose on
        assert key in headline
    assert "report:" in format_summary(first)
    before = published(organism_store)
    assert all(len(v) == 1 for v in before.values())

    # A finished configuration: no stage publishes anything new and no model work is done.
    import saber.model.loading

    def no_model_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished configuration loaded the model")

    with monkeypatch.context() as patch:
        patch.setattr(saber.model.loading, "load_model", no_model_work)
        again = run_pipeline(compose_config(f"store_root={organism_store}"))
    assert published(organism_store) == before
    assert again.artifacts == first.artifacts

    # An edit knob that no analysis stage reads (the export format) reruns edit and evaluate only;
    # an export directory gets the evaluation card. (edit.norm_preserving would rerun entangle:
    # with edit.method=auto it decides between the least-squares edit and the projection.)
    out = organism_store.parent / "edited-model"
    changed = run_pipeline(compose_config(f"store_root={organism_store}", "edit.export_format=both",
                                          f"edit.out_dir={out}"))
    after = published(organism_store)
    for stage in ("collect", "extract", "rank", "entangle"):
        assert after[stage] == before[stage]
        assert changed.artifacts[stage] == first.artifacts[stage]
    for stage in ("edit", "evaluate"):
        assert len(after[stage]) == 2
    card = (out / "README.md").read_text()
    assert "### Evaluation" in card and (changed.artifacts["evaluate"] / "model_card.md").read_text() in card
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))


def test_stage_subset(organism_store: Path) -> None:
    result = run_pipeline(compose_config(f"store_root={organism_store}", "stages=[collect,extract]"))
    assert set(result.artifacts) == {"collect", "extract"}
    counts = {stage: len(names) for stage, names in published(organism_store).items()}
    assert counts == {"collect": 1, "extract": 1, "rank": 0, "entangle": 0, "edit": 0, "evaluate": 0}


def test_unknown_stage_is_named(organism_store: Path) -> None:
    with pytest.raises(ValueError, match="collekt"):
        run_pipeline(compose_config(f"store_root={organism_store}", "stages=[collekt]"))


def test_interrupted_run_resumes(organism_store: Path, tmp_path: Path) -> None:
    """Kill the runner once collect is published; the rerun reuses collect and finishes."""
    cmd = [sys.executable, "-m", "saber.run", f"store_root={organism_store}",
           f"hydra.run.dir={tmp_path / 'run1'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    err_path = tmp_path / "run1.err"  # a file, not a pipe: a full pipe would block the run itself
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err_path.open("w"))
    # Synchronise on the artifact, not on time: wait (however loaded the machine) until collect is
    # published under its final name, or the run ends by itself.
    while not published(organism_store)["collect"] and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = published(organism_store)
    assert done["collect"], f"the run exited before collect was published: {err_path.read_text()[-3000:]}"
    assert len(done["collect"]) == 1 and not done["evaluate"]

    rerun = subprocess.run([*cmd[:-1], f"hydra.run.dir={tmp_path / 'run2'}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=1800)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "cache hit collect" in rerun.stdout + rerun.stderr  # Hydra logs to stdout
    assert published(organism_store)["collect"] == done["collect"]
    summary = json.loads((tmp_path / "run2" / "run_summary.json").read_text())
    assert set(summary["artifacts"]) == set(STAGES)
    assert "refusal_rate" in summary["headline"]


def test_iterations_record_and_stop(organism_store: Path) -> None:
    cfg = compose_config(f"store_root={organism_store}", "iterate.max_iterations=3", "iterate.target_refusal=0.0",
                         "edit.export=false")
    result = run_pipeline(cfg)
    log = result.iterations
    assert log is not None and log.records
    assert 0 <= log.last_iteration <= 2
    assert log.stop_reason
    refusals = [r["heldout_refusal"] for r in log.records]
    # every iteration kept improved held-out refusal over the previous one
    kept = refusals[: log.last_iteration + 1]
    assert all(b < a for a, b in zip(kept, kept[1:]))
    # the edit and evaluation use the plans of every kept iteration
    plans_used = (result.artifacts["edit"] / "plans.txt").read_text().split()
    assert len(plans_used) == log.last_iteration + 1

