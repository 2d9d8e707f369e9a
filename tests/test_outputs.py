"""Output guards: an export directory never replaces or deletes files SABER did not make."""

from __future__ import annotations

from pathlib import Path

import pytest

from saber.outputs import MARKER, OutputGuardError, check_out_dir, write_marker


@pytest.fixture()
def layout(tmp_path: Path) -> dict[str, Path]:
    dirs = {name: tmp_path / name for name in ("model", "store", "run", "work")}
    for path in dirs.values():
        path.mkdir()
    (dirs["model"] / "model.safetensors").write_bytes(b"weights")
    return dirs


def check(out: Path, layout: dict[str, Path], overwrite: bool = False, request: dict | None = None) -> Path:
    return check_out_dir(out, overwrite=overwrite, model_path=layout["model"], store_root=layout["store"],
                         run_dir=layout["run"], cwd=layout["work"], request=request)


@pytest.mark.parametrize("where, relation", [("model", "is"), ("model/sub", "lies inside"), (".", "contains"),
                                             ("store", "is"), ("store/x", "lies inside"), ("run", "is"),
                                             ("work", "is")])
def test_out_dir_may_not_touch_model_store_run_or_working_directory(layout: dict[str, Path], where: str,
                                                                   relation: str) -> None:
    out = (layout["model"].parent / where).resolve()
    with pytest.raises(OutputGuardError, match=f"edit.out_dir=.* {relation} ") as err:
        check(out, layout, overwrite=True)
    assert "overwrite" not in str(err.value)  # never advise the flag that would destroy data here


def test_inside_the_run_or_working_directory_is_allowed(layout: dict[str, Path]) -> None:
    assert check(layout["work"] / "exported", layout) == (layout["work"] / "exported").resolve()
    assert check(layout["run"] / "exported", layout) == (layout["run"] / "exported").resolve()


def test_existing_directory_is_replaced_only_when_saber_marked_it(layout: dict[str, Path], tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(OutputGuardError, match="not made by a SABER export") as err:
            check(foreign, layout, overwrite=overwrite)
        assert "overwrite" not in str(err.value)
    (tmp_path / "empty").mkdir()
    assert check(tmp_path / "empty", layout) == (tmp_path / "empty").resolve()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputGuardError, match="existing file"):
        check(tmp_path / "file", layout, overwrite=True)


def test_earlier_export_needs_overwrite_unless_it_is_this_request(layout: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"edited")
    write_marker(out, {"edit": {"alpha": 1.0}})
    assert (out / MARKER).is_file()
    with pytest.raises(OutputGuardError, match="edit.overwrite=true to replace that export"):
        check(out, layout, request={"edit": {"alpha": 0.5}})
    assert check(out, layout, overwrite=True, request={"edit": {"alpha": 0.5}}) == out.resolve()
    assert check(out, layout, request={"edit": {"alpha": 1.0}}) == out.resolve()  # a rerun of the same export
