"""Artifact store: fingerprints, atomic publish under SIGKILL, racing writers, verification."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from saber.store import Artifact, ArtifactError, ArtifactStore, fingerprint

Build = Callable[[Path], "Mapping[str, Any] | None"]

REPO = Path(__file__).resolve().parents[1]
BASE = dict(stage="collect", schema_version=1, config={"a": 1, "b": [0.5, "x"]},
            upstream={"model": "abc"}, model_identity="org/model@rev")


def _fp(**over: object) -> str:
    args = {**BASE, **over}
    return fingerprint(args["stage"], args["schema_version"], args["config"],  # type: ignore[arg-type]
                       args["upstream"], args["model_identity"])  # type: ignore[arg-type]


def _writer(payload: str = "hello") -> Build:
    def build(tmp: Path) -> dict[str, int]:
        (tmp / "data.txt").write_text(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "more.bin").write_bytes(b"\x00\x01" * 1000)
        return {"rows": 3}
    return build


def _get(store: ArtifactStore, build: Callable[[Path], Any], **kw: Any) -> Artifact:
    return store.get_or_build(BASE["stage"], BASE["schema_version"], BASE["config"],
                              BASE["upstream"], BASE["model_identity"], build,
                              command="python -m stages.collect model=toy", **kw)


def _child(code: str, root: Path, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a separate Python process that runs ``code`` with ROOT set to the store root."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "ROOT": str(root), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.02)


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_hex() -> None:
    fp = _fp()
    assert fp == _fp()
    assert len(fp) == 64 and int(fp, 16) >= 0


@pytest.mark.parametrize("change", [
    {"stage": "extract"},
    {"schema_version": 2},
    {"config": {"a": 2, "b": [0.5, "x"]}},
    {"config": {"a": 1, "b": [0.5000001, "x"]}},
    {"config": {"a": 1.0, "b": [0.5, "x"]}},
    {"upstream": {"model": "abd"}},
    {"model_identity": "org/model@other"},
    {"model_identity": None},
])
def test_fingerprint_changes_with_every_input(change: dict) -> None:
    assert _fp(**change) != _fp()


def test_fingerprint_ignores_key_order_and_tuple_vs_list() -> None:
    a = fingerprint("s", 1, {"x": {"p": 1, "q": 2}, "y": (1, 2)}, {"u": "1", "v": "2"}, None)
    b = fingerprint("s", 1, {"y": [1, 2], "x": {"q": 2, "p": 1}}, {"v": "2", "u": "1"}, None)
    assert a == b


def test_fingerprint_accepts_omegaconf_and_rejects_objects() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"a": 1, "b": [0.5, "x"]})
    assert fingerprint("collect", 1, cfg, BASE["upstream"], BASE["model_identity"]) == _fp()
    with pytest.raises(TypeError, match=r"config\.bad"):
        fingerprint("s", 1, {"bad": object()}, {}, None)


# ----------------------------------------------------------------------------- build and load


def test_build_then_cache_hit_does_not_call_build(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    store = ArtifactStore(tmp_path)
    art = _get(store, _writer())
    assert art.path == store.path_for("collect", art.fingerprint)
    assert art.path.name == art.fingerprint[:16]
    m = art.manifest
    assert m["files"].keys() == {"data.txt", "sub/more.bin"}
    assert m["meta"] == {"rows": 3} and m["config"] == {"a": 1, "b": [0.5, "x"]}
    assert m["library_versions"]["python"] and "torch" in m["library_versions"]
    assert m["peak_rss_bytes"] > 0 and m["wall_time_s"] >= 0 and m["created"].endswith("+00:00")
    assert art.file("sub/more.bin").read_bytes() == b"\x00\x01" * 1000
    with pytest.raises(ArtifactError, match="no file 'nope.txt'"):
        art.file("nope.txt")

    def must_not_run(tmp: Path) -> None:
        raise AssertionError("build called on a cache hit")

    with caplog.at_level(logging.INFO, logger="saber.store"):
        again = _get(store, must_not_run)
    assert again.path == art.path and again.manifest == m
    assert f"cache hit collect {art.fingerprint[:12]}" in caplog.text
    assert not list((tmp_path / "collect").glob(".tmp-*"))


def test_load_returns_none_when_absent_or_without_manifest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    fp = _fp()
    assert store.load("collect", fp) is None
    store.path_for("collect", fp).mkdir(parents=True)
    (store.path_for("collect", fp) / "half.txt").write_text("x")
    assert store.load("collect", fp) is None
    art = _get(store, _writer())  # replaces the manifest-less directory
    assert store.load("collect", fp) is not None and not (art.path / "half.txt").exists()


def test_tampered_file_names_file_and_command(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    art = _get(store, _writer())
    (art.path / "data.txt").write_text("HELLO")
    with pytest.raises(ArtifactError) as err:
        store.load("collect", art.fingerprint)
    msg = str(err.value)
    assert "data.txt" in msg and "sha256" in msg
    assert "regenerate with: python -m stages.collect model=toy force=true" in msg
    with pytest.raises(ArtifactError, match="data.txt"):
        _get(store, _writer())  # no silent rebuild of a corrupt artifact
    assert store.load("collect", art.fingerprint, verify=False) is not None


def test_size_mode_catches_truncation_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = _get(ArtifactStore(tmp_path), _writer())
    (art.path / "data.txt").write_text("HELLO")  # same size, different bytes
    monkeypatch.setenv("SABER_STORE_VERIFY", "size")
    sized = ArtifactStore(tmp_path)
    assert sized.load("collect", art.fingerprint) is not None
    (art.path / "data.txt").write_text("HELLO!")
    with pytest.raises(ArtifactError, match="data.txt has 6 bytes but manifest says 5"):
        sized.load("collect", art.fingerprint)
    with pytest.raises(ValueError, match="SABER_STORE_VERIFY"):
        monkeypatch.setenv("SABER_STORE_VERIFY", "fast")
        ArtifactStore(tmp_path)


def test_deleted_file_names_file_and_command(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    art = _get(store, _writer())
    (art.path / "sub" / "more.bin").unlink()
    with pytest.raises(ArtifactError, match=r"sub/more\.bin is listed in the manifest but "
                                            r"missing.*regenerate with: python -m stages\.collect"):
        store.load("collect", art.fingerprint)


def test_wrong_schema_version_and_bad_manifest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    art = _get(store, _writer())
    with pytest.raises(ArtifactError, match=r"schema version 1 but this code expects 2.*"
                                            r"stages\.collect model=toy force=true"):
        store.load("collect", art.fingerprint, schema_version=2)
    (art.path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest\.json does not parse.*regenerate with: "
                                            r"python -m stages\.collect force=true"):
        store.load("collect", art.fingerprint)


def test_force_rebuilds_and_result_is_valid(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    first = _get(store, _writer("one"))
    (first.path / "data.txt").write_text("corrupt")
    second = _get(store, _writer("two"), force=True)
    assert second.path == first.path
    assert (second.path / "data.txt").read_text() == "two"
    loaded = store.load("collect", second.fingerprint, schema_version=1)
    assert loaded is not None and loaded.manifest == second.manifest
    assert sorted(p.name for p in (tmp_path / "collect").iterdir()) == [".locks", first.path.name]


def test_failed_build_publishes_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)

    def broken(tmp: Path) -> None:
        (tmp / "partial.txt").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _get(store, broken)
    assert store.load("collect", _fp()) is None
    assert not list((tmp_path / "collect").glob(".tmp-*"))
    with pytest.raises(TypeError, match="returned list"):
        _get(store, lambda tmp: [1])


def test_build_writing_symlink_is_rejected(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    secret = tmp_path / "outside.txt"
    secret.write_text("not part of the artifact")

    def linker(tmp: Path) -> None:
        (tmp / "link.txt").symlink_to(secret)

    with pytest.raises(ArtifactError, match="link.txt is a symlink"):
        _get(store, linker)
    assert store.load("collect", _fp()) is None and secret.exists()


def test_published_lists_full_fingerprints(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert store.published("collect") == []
    art = _get(store, _writer())
    other = store.get_or_build("collect", 1, {"a": 2}, {}, None, _writer())
    (store.root / "collect" / "deadbeefdeadbeef").mkdir()  # no manifest: not published
    assert sorted(store.published("collect")) == sorted([art.fingerprint, other.fingerprint])


# ----------------------------------------------------------------------------- real processes

CHILD_PRELUDE = """
    import json, os, sys, time
    from pathlib import Path
    from saber.store import ArtifactStore
    ROOT = Path(os.environ["ROOT"])
    def run(build):
        art = ArtifactStore(ROOT).get_or_build(
            "collect", 1, {"a": 1, "b": [0.5, "x"]}, {"model": "abc"}, "org/model@rev", build,
            command="python -m stages.collect model=toy")
        print(json.dumps({"path": str(art.path), "manifest": art.manifest}))
"""


def test_sigkill_during_build_leaves_nothing_and_rerun_succeeds(tmp_path: Path) -> None:
    root = tmp_path / "store"
    marker = tmp_path / "half-written"
    proc = _child(CHILD_PRELUDE + f"""
    def build(tmp):
        (tmp / "data.txt").write_text("hello")
        Path({str(marker)!r}).touch()
        time.sleep(60)
    run(build)
    """, root)
    _wait_for(marker, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    store = ArtifactStore(root)
    assert store.load("collect", _fp()) is None
    assert len(list((root / "collect").glob(".tmp-*"))) == 1  # the killed writer's leftover
    art = _get(store, _writer())
    assert store.load("collect", art.fingerprint) is not None
    assert not list((root / "collect").glob(".tmp-*"))  # cleaned by the rerun


def test_sigkill_after_manifest_before_rename_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    marker = tmp_path / "about-to-rename"
    proc = _child(CHILD_PRELUDE + f"""
    real_rename = os.rename
    def slow_rename(src, dst):
        if Path(src).name.startswith(".tmp-"):
            assert (Path(src) / "manifest.json").is_file()
            Path({str(marker)!r}).touch()
            time.sleep(60)
        real_rename(src, dst)
    os.rename = slow_rename
    def build(tmp):
        (tmp / "data.txt").write_text("hello")
    run(build)
    """, root)
    _wait_for(marker, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    store = ArtifactStore(root)
    assert store.load("collect", _fp()) is None
    art = _get(store, _writer())
    assert store.load("collect", art.fingerprint) is not None


def test_two_processes_racing_build_once(tmp_path: Path) -> None:
    root = tmp_path / "store"
    counter = tmp_path / "builds.log"
    go = tmp_path / "go"
    code = CHILD_PRELUDE + f"""
    while not Path({str(go)!r}).exists():
        time.sleep(0.005)
    def build(tmp):
        with open({str(counter)!r}, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")
        (tmp / "data.txt").write_text("hello")
        time.sleep(1.0)
    run(build)
    """
    procs = [_child(code, root) for _ in range(2)]
    time.sleep(0.3)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len(counter.read_text().splitlines()) == 1
    assert results[0]["path"] == results[1]["path"]
    assert results[0]["manifest"] == results[1]["manifest"]
    loaded = ArtifactStore(root).load("collect", _fp(), schema_version=1)
    assert loaded is not None and str(loaded.path) == results[0]["path"]
