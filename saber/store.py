"""Content-addressed artifact store shared by every stage.

An artifact directory is ``root/<stage>/<fingerprint[:16]>``. It is built in a temporary sibling
directory, ``manifest.json`` is written last, and the directory is published with one atomic
``os.rename``. A directory without a manifest does not exist as far as the pipeline is concerned;
published artifacts are never modified.

Concurrency: builders of the same fingerprint serialise on ``fcntl.flock`` of
``root/<stage>/.locks/<fingerprint>.lock`` and re-check for a published artifact after acquiring
it, so sweep jobs sharing one cache compute each artifact once. The cache file system must
therefore support ``flock`` across hosts (local disks, NFSv4 and Lustre mounted with flock do;
NFSv3 and some FUSE mounts do not). The lock is released by the kernel when a writer dies, and a
killed writer leaves only a ``.tmp-*`` directory that the next build of that fingerprint removes.

``force`` replaces a published artifact: the old directory is renamed to a ``.trash-*`` sibling,
the new one renamed into place, then the trash is deleted. Between those two renames (a few
microseconds) a reader sees no artifact and, through ``get_or_build``, waits on the lock and then
finds the new one; a reader holding paths inside the old directory may see them disappear.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import resource
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Iterator

log = logging.getLogger("saber.store")

MANIFEST = "manifest.json"
FINGERPRINT_FORMAT = "saber-fingerprint-1"
VERIFY_ENV = "SABER_STORE_VERIFY"
VERIFY_MODES = ("full", "size")
_CHUNK = 1 << 20
_VERSIONED_LIBS = ("torch", "transformers", "safetensors", "pandas", "numpy", "pyarrow")


class ArtifactError(RuntimeError):
    """A published artifact is corrupt, tampered with, or of another schema version."""


# ----------------------------------------------------------------------------- fingerprints


def canonical(value: Any, where: str = "config") -> Any:
    """Convert ``value`` to plain JSON data with a single spelling per value.

    Finite floats are written by ``json`` as their shortest round-trip ``repr`` (stable across
    platforms; 1 and 1.0 stay distinct), NaN/inf become ``{"__float__": "nan"}`` because JSON
    has no spelling for them; tuples become lists; dataclasses,
    enums, paths and OmegaConf containers are unwrapped. Anything else is a TypeError naming
    ``where`` so that an unhashable config value is found at start-up.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return {"__float__": repr(value)}
        return float(value)
    if isinstance(value, enum.Enum):
        return canonical(value.value, where)
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return canonical({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where)
    container = _omegaconf_container(value)
    if container is not None:
        return canonical(container, where)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        return canonical(item(), where)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} has type {type(k).__name__}; use str keys")
            name = str(k)
            if name in out:
                raise TypeError(f"{where}: keys {k!r} and {name!r} collide once stringified")
            out[name] = canonical(v, f"{where}.{name}")
        return out
    if isinstance(value, (list, tuple)):
        return [canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{where}: value {value!r} of type {type(value).__name__} cannot enter a fingerprint; "
        "use str, int, float, bool, None, lists or mappings"
    )


def _omegaconf_container(value: Any) -> Any:
    """Resolve an OmegaConf container to plain Python, without importing OmegaConf eagerly."""
    if "omegaconf" not in sys.modules:
        return None
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return None


def _canonical_json(payload: Any) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def fingerprint(stage: str, schema_version: int, config: Mapping[str, Any],
                upstream: Mapping[str, str], model_identity: str | None) -> str:
    """Sha256 hex of the canonical JSON of everything that determines an artifact's content."""
    if not stage or "/" in stage or stage.startswith("."):
        raise ValueError(f"stage name {stage!r} must be a non-empty plain directory name")
    if isinstance(schema_version, bool) or not isinstance(schema_version, int):
        raise TypeError(f"schema_version must be an int, got {schema_version!r}")
    payload = {
        "format": FINGERPRINT_FORMAT,
        "stage": stage,
        "schema_version": schema_version,
        "config": canonical(config, "config"),
        "upstream": canonical(dict(upstream), "upstream"),
        "model_identity": model_identity,
    }
    return hashlib.sha256(_canonical_json(payload).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class Artifact:
    """A published, verified artifact directory and its manifest."""

    stage: str
    fingerprint: str
    path: Path
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        """Path of a file the manifest lists; refuses names the build did not write."""
        files = self.manifest.get("files", {})
        key = PurePath(name).as_posix()
        if key not in files:
            listed = ", ".join(sorted(files)) or "(none)"
            raise ArtifactError(
                f"artifact {self.stage}/{self.fingerprint[:12]} at {self.path} has no file "
                f"{name!r}; it lists: {listed}"
            )
        return self.path / key


def sha256_file(path: Path) -> str:
    """Sha256 of a file read in 1 MiB chunks, so multi-GB tensors never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that shape artifact contents, read without importing them."""
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED_LIBS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["saber"] = _saber_version()
    return versions


def _saber_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("saber-abliteration")
    except metadata.PackageNotFoundError:
        pass
    pkg = sys.modules.get("saber")
    return getattr(pkg, "__version__", None)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _list_files(directory: Path) -> dict[str, Path]:
    """Every regular file below ``directory`` by posix relative path, manifest excluded."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            full = Path(dirpath) / name
            rel = full.relative_to(directory).as_posix()
            if rel == MANIFEST:
                continue
            if full.is_symlink() or not full.is_file():
                raise ArtifactError(
                    f"{full} is a symlink or special file; artifacts hold regular files only"
                )
            found[rel] = full
    return found


# ----------------------------------------------------------------------------- store


class ArtifactStore:
    """Finds, verifies and atomically publishes artifacts under one root directory.

    ``verify`` (or the environment variable ``SABER_STORE_VERIFY``) chooses how loads check
    files: ``full`` (default) re-hashes every file, ``size`` only compares sizes, for caches of
    multi-GB tensors where hashing on every load costs minutes.
    """

    def __init__(self, root: str | Path, verify: str | None = None) -> None:
        self.root = Path(root)
        mode = verify if verify is not None else os.environ.get(VERIFY_ENV, "full")
        if mode not in VERIFY_MODES:
            origin = "verify argument" if verify is not None else f"environment variable {VERIFY_ENV}"
            raise ValueError(f"{origin} is {mode!r}; use one of {', '.join(VERIFY_MODES)}")
        self.verify_mode = mode

    def path_for(self, stage: str, fp: str) -> Path:
        """Published location of an artifact: ``root/<stage>/<fp[:16]>``."""
        if len(fp) < 16:
            raise ValueError(f"fingerprint {fp!r} is too short; expected 64 hex digits")
        return self.root / stage / fp[:16]

    # -- loading -------------------------------------------------------------------------

    def published(self, stage: str) -> list[str]:
        """Full fingerprints of the published artifacts of ``stage``, oldest first (unverified).

        Lets a stage run alone pick an upstream artifact by fingerprint prefix or recency.
        """
        found: list[tuple[str, str]] = []
        stage_dir = self.root / stage
        if not stage_dir.is_dir():
            return []
        for child in stage_dir.iterdir():
            if child.name.startswith(".") or not (child / MANIFEST).is_file():
                continue
            try:
                manifest = json.loads((child / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            fp = manifest.get("fingerprint") if isinstance(manifest, dict) else None
            if isinstance(fp, str) and fp.startswith(child.name):
                found.append((str(manifest.get("created", "")), fp))
        return [fp for _, fp in sorted(found)]

    def load(self, stage: str, fp: str, *, verify: bool = True, schema_version: int | None = None,
             command: str | None = None) -> Artifact | None:
        """Return the published artifact, None if there is none, ArtifactError if it is bad.

        ``verify`` checks every listed file (sha256, or only sizes in ``size`` mode);
        ``schema_version`` when given must equal the manifest's. ``command`` overrides the
        regenerate command quoted in errors (default: the one recorded in the manifest).
        """
        path = self.path_for(stage, fp)
        if not path.is_dir():
            return None
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            log.warning("%s has no %s; treating it as not published", path, MANIFEST)
            return None
        label = f"artifact {stage}/{fp[:12]}"

        def bad(what: str, manifest: Mapping[str, Any] | None = None) -> ArtifactError:
            cmd = command or (manifest or {}).get("command") or f"python -m stages.{stage}"
            return ArtifactError(f"{label} at {path} is corrupt: {what}; "
                                 f"regenerate with: {cmd} force=true")

        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"{MANIFEST} does not parse ({exc})") from exc
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise bad(f"{MANIFEST} lacks a 'files' table")
        if manifest.get("fingerprint") != fp or manifest.get("stage") != stage:
            raise bad(f"{MANIFEST} is for {manifest.get('stage')}/"
                      f"{str(manifest.get('fingerprint'))[:12]}, not this fingerprint", manifest)
        if schema_version is not None and manifest.get("schema_version") != schema_version:
            raise ArtifactError(
                f"{label} at {path} has schema version {manifest.get('schema_version')!r} but "
                f"this code expects {schema_version}; regenerate with: "
                f"{command or manifest.get('command') or f'python -m stages.{stage}'} force=true"
            )
        if verify:
            self._verify_files(path, manifest, bad)
        return Artifact(stage=stage, fingerprint=fp, path=path, manifest=manifest)

    def _verify_files(self, path: Path, manifest: Mapping[str, Any],
                      bad: Callable[[str, Mapping[str, Any] | None], ArtifactError]) -> None:
        sizes = manifest.get("sizes", {})
        for rel, expected in sorted(manifest["files"].items()):
            full = path / rel
            if not full.is_file():
                raise bad(f"file {rel} is listed in the manifest but missing", manifest)
            if self.verify_mode == "size" and rel in sizes:
                actual_size = full.stat().st_size
                if actual_size != sizes[rel]:
                    raise bad(f"file {rel} has {actual_size} bytes but manifest says "
                              f"{sizes[rel]}", manifest)
                continue
            actual = sha256_file(full)
            if actual != expected:
                raise bad(f"file {rel} has sha256 {actual[:12]}… but manifest says "
                          f"{str(expected)[:12]}…", manifest)
        try:
            extra = sorted(set(_list_files(path)) - set(manifest["files"]))
        except ArtifactError as exc:
            raise bad(str(exc), manifest) from exc
        if extra:
            log.warning("%s holds files its manifest does not list (ignored): %s",
                        path, ", ".join(extra[:5]))

    # -- building ------------------------------------------------------------------------

    def get_or_build(self, stage: str, schema_version: int, config: Mapping[str, Any],
                     upstream: Mapping[str, str], model_identity: str | None,
                     build: Callable[[Path], Mapping[str, Any] | None], *, force: bool = False,
                     command: str = "") -> Artifact:
        """Return the artifact for these inputs, building and publishing it if needed.

        ``build(tmp_dir)`` writes the artifact's files into ``tmp_dir`` and may return extra
        metadata for the manifest's ``meta`` field. A corrupt published artifact raises
        ArtifactError unless ``force`` is set.
        """
        fp = fingerprint(stage, schema_version, config, upstream, model_identity)
        if not force:
            found = self.load(stage, fp, schema_version=schema_version, command=command or None)
            if found is not None:
                log.info("cache hit %s %s", stage, fp[:12])
                return found
        with self._lock(stage, fp):
            if not force:
                found = self.load(stage, fp, schema_version=schema_version,
                                  command=command or None)
                if found is not None:
                    log.info("cache hit %s %s (published by another process)", stage, fp[:12])
                    return found
            self._clean_stale(stage, fp)
            return self._build_and_publish(stage, schema_version, fp, config, upstream,
                                           model_identity, build, command)

    @contextmanager
    def _lock(self, stage: str, fp: str) -> Iterator[None]:
        lock_dir = self.root / stage / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_dir / f"{fp}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process building %s %s", stage, fp[:12])
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _clean_stale(self, stage: str, fp: str) -> None:
        """Remove leftovers of killed writers of this fingerprint (we hold its lock)."""
        stage_dir = self.root / stage
        for prefix in (".tmp-", ".trash-"):
            for leftover in stage_dir.glob(f"{prefix}{fp[:16]}-*"):
                log.info("removing stale %s", leftover)
                shutil.rmtree(leftover, ignore_errors=True)

    def _build_and_publish(self, stage: str, schema_version: int, fp: str,
                           config: Mapping[str, Any], upstream: Mapping[str, str],
                           model_identity: str | None,
                           build: Callable[[Path], Mapping[str, Any] | None],
                           command: str) -> Artifact:
        stage_dir = self.root / stage
        tmp = stage_dir / f".tmp-{fp[:16]}-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        try:
            started = time.perf_counter()
            meta = build(tmp)
            wall = time.perf_counter() - started
            if meta is not None and not isinstance(meta, Mapping):
                raise TypeError(f"build for stage {stage!r} returned {type(meta).__name__}; "
                                "return a mapping of metadata or None")
            if (tmp / MANIFEST).exists():
                raise ArtifactError(f"build for stage {stage!r} wrote {MANIFEST} itself; that "
                                    "name is reserved for the store")
            manifest = self._manifest(stage, schema_version, fp, config, upstream,
                                      model_identity, tmp, wall, command, meta)
            _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True,
                                                      allow_nan=False) + "\n")
            _fsync_path(tmp, directory=True)
            final = self.path_for(stage, fp)
            self._publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("published %s %s in %.1f s", stage, fp[:12], wall)
        return Artifact(stage=stage, fingerprint=fp, path=final, manifest=manifest)

    def _manifest(self, stage: str, schema_version: int, fp: str, config: Mapping[str, Any],
                  upstream: Mapping[str, str], model_identity: str | None, tmp: Path,
                  wall: float, command: str, meta: Mapping[str, Any] | None) -> dict[str, Any]:
        files = _list_files(tmp)
        hashes: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for rel, full in files.items():
            _fsync_path(full)
            hashes[rel] = sha256_file(full)
            sizes[rel] = full.stat().st_size
        return {
            "stage": stage,
            "schema_version": schema_version,
            "fingerprint": fp,
            "config": canonical(config, "config"),
            "upstream": canonical(dict(upstream), "upstream"),
            "model_identity": model_identity,
            "files": hashes,
            "sizes": sizes,
            "library_versions": library_versions(),
            "wall_time_s": round(wall, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "meta": canonical(dict(meta or {}), "meta"),
        }

    @staticmethod
    def _publish(tmp: Path, final: Path) -> None:
        """Atomically move ``tmp`` to ``final``, setting any previous artifact aside first."""
        trash: Path | None = None
        if final.exists():
            trash = final.with_name(f".trash-{final.name}-{secrets.token_hex(4)}")
            os.rename(final, trash)
        os.rename(tmp, final)
        _fsync_path(final.parent, directory=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
