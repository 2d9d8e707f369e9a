"""Edit stage: apply every iteration's plan to the base weights and export a new model directory.

The export streams the source checkpoint shard by shard (never the whole model in memory) into
`<artifact>/model/`; with `edit.out_dir` set it is also copied there. With `edit.export=false`
the artifact only records the plans, and evaluation applies them in memory.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from saber.pipeline import StageContext, StageSpec
from stages.cli import stage_main


def _source_dir(ctx: StageContext) -> Path:
    """The base checkpoint as a local directory (a hub id is resolved to its local snapshot)."""
    path = ctx.model_dir()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path)))


def _copy_out(model_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"edit.out_dir {out_dir} exists; choose another directory or set edit.overwrite=true")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def build(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    from saber.edit import export_edited, load_plan

    plans = [load_plan(p.path) for p in ctx.plans]
    meta: dict[str, Any] = {"iterations": len(plans), "plan_rows": [len(p.rows) for p in plans]}
    (out_dir / "plans.txt").write_text("\n".join(p.fingerprint for p in ctx.plans) + "\n")
    if not ctx.cfg.edit.export:
        return meta
    source = _source_dir(ctx)
    export_edited(source, out_dir / "model", plans, ctx.cfg.edit, overwrite=False)
    if ctx.cfg.edit.out_dir:
        _copy_out(out_dir / "model", Path(ctx.cfg.edit.out_dir), ctx.cfg.edit.overwrite)
        meta["copied_to"] = str(ctx.cfg.edit.out_dir)
    return meta


SPEC = StageSpec(name="edit", schema_version=1, config_keys=("edit",), upstream=(), build=build,
                 reads_plans=True)
main = stage_main("edit")

if __name__ == "__main__":
    main()
