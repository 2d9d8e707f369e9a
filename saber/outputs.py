"""Guards for directories SABER writes outside its store: a user's files are never replaced.

`edit.out_dir` is checked at start-up, before any model work: it may not be, contain or lie
inside the source model or the artifact store, and may not be or contain the Hydra run
directory or the working directory. An existing directory is replaced (with `edit.overwrite`)
only when an earlier SABER export marked it as its own with MARKER.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

MARKER = ".saber-export.json"  # written into every export directory SABER creates


class OutputGuardError(ValueError):
    """A requested output directory would overwrite or delete files SABER did not make."""


def _related(out: Path, other: Path) -> Optional[str]:
    if out == other:
        return "is"
    if other.is_relative_to(out):
        return "contains"
    if out.is_relative_to(other):
        return "lies inside"
    return None


def check_out_dir(out_dir: Path | str, *, overwrite: bool, key: str = "edit.out_dir",
                  model_path: Optional[Path | str] = None, store_root: Optional[Path | str] = None,
                  run_dir: Optional[Path | str] = None, cwd: Optional[Path | str] = None,
                  request: Optional[dict[str, Any]] = None) -> Path:
    """The resolved output directory, or OutputGuardError saying which rule it breaks.

    ``request`` describes the export about to be made; an existing export whose marker records
    the same request is this configuration's own output (a rerun), and is accepted as it is.
    """
    out = Path(out_dir).expanduser().resolve()
    protected = [("model.path", model_path, True), ("store_root", store_root, True),
                 ("the Hydra run directory", run_dir, False), ("the working directory", cwd, False)]
    for name, path, inside_too in protected:
        if path is None:
            continue
        other = Path(path).expanduser().resolve()
        relation = _related(out, other)
        if relation is None or (relation == "lies inside" and not inside_too):
            continue
        raise OutputGuardError(f"{key}={out} {relation} {name} ({other}); SABER never writes there. "
                               f"Choose a new directory for {key}")
    if out.exists():
        if not out.is_dir():
            raise OutputGuardError(f"{key}={out} is an existing file; choose a new directory for {key}")
        if any(out.iterdir()):
            if not (out / MARKER).is_file():
                raise OutputGuardError(
                    f"{key}={out} exists and was not made by a SABER export (no {MARKER}); SABER replaces "
                    f"only its own exports. Choose a new directory for {key}")
            if not overwrite and read_marker(out).get("request") != _plain(request):
                raise OutputGuardError(
                    f"{key}={out} holds an earlier SABER export; choose a new directory, or set "
                    "edit.overwrite=true to replace that export")
    return out


def write_marker(out_dir: Path, request: Optional[dict[str, Any]] = None) -> None:
    """Mark a directory as a SABER export, so a later overwrite may replace it."""
    (Path(out_dir) / MARKER).write_text(json.dumps({"made_by": "saber", "request": _plain(request)},
                                                   indent=1, sort_keys=True) + "\n", encoding="utf-8")


def read_marker(out_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(out_dir) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _plain(request: Optional[dict[str, Any]]) -> Any:
    """The request as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(request, sort_keys=True, default=str)) if request is not None else None


def export_request(cfg: Any) -> dict[str, Any]:
    """What identifies an export of a run: the model, the store and every edit knob."""
    from saber.config import as_plain

    return {"model": cfg.model.path, "store_root": str(cfg.store_root), "edit": as_plain(cfg.edit)}


def guard_run_outputs(cfg: Any, run_dir: Optional[Path | str] = None) -> Optional[Path]:
    """Start-up check of a run's export directory (before any model work); None when there is none."""
    import os

    if not (cfg.edit.export and cfg.edit.out_dir and "edit" in cfg.stages):
        return None
    return check_out_dir(cfg.edit.out_dir, overwrite=cfg.edit.overwrite, model_path=cfg.model.path,
                         store_root=cfg.store_root, run_dir=run_dir, cwd=os.getcwd(),
                         request=export_request(cfg))
