"""Edit stage: apply every iteration's plan to the base weights and export a new model directory.

The export streams the source checkpoint shard by shard (never the whole model in memory) into
`<artifact>/model/` (`edit.export_format=full`), writes the exact LoRA adapter into
`<artifact>/adapter/` (`lora`), or both; with `edit.out_dir` set it is also copied there (for
`both`, the adapter lands in `<out_dir>/adapter/`). With `edit.export=false` the artifact only
records the plans, and evaluation applies them in memory.
"""

from __future__ import annotations

import secrets
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


def _copy_out(ctx: StageContext, parts: dict[str, Path]) -> Path:
    """Copy the export to edit.out_dir atomically; replaces only an earlier SABER export there.

    `parts` maps a path inside out_dir ("" for out_dir itself) to the directory copied there.
    """
    from saber.edit.export import publish_directory, raise_if_disk_full, require_space, tree_bytes
    from saber.outputs import export_request, guard_run_outputs, write_marker

    out_dir = guard_run_outputs(ctx.cfg)
    assert out_dir is not None
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{secrets.token_hex(4)}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    require_space(out_dir.parent, sum(tree_bytes(d) for d in parts.values()), "edit.out_dir")
    try:
        for inside, source in sorted(parts.items()):
            shutil.copytree(source, tmp / inside if inside else tmp, dirs_exist_ok=True)
        write_marker(tmp, export_request(ctx.cfg))
        publish_directory(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(exc, "edit.out_dir", out_dir.parent)
        raise
    return out_dir


def build(ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    from saber.edit import export_edited, load_plan
    from saber.edit.export import tree_bytes
    from saber.edit.lora import export_lora

    plans = [load_plan(p.path) for p in ctx.plans]
    meta: dict[str, Any] = {"iterations": len(plans), "plan_rows": [len(p.rows) for p in plans]}
    (out_dir / "plans.txt").write_text("\n".join(p.fingerprint for p in ctx.plans) + "\n")
    if not ctx.cfg.edit.export:
        return meta
    source = _source_dir(ctx)
    fmt = ctx.cfg.edit.export_format
    parts: dict[str, Path] = {}
    if fmt in ("lora", "both"):  # first: an edit LoRA cannot express fails before the long full export
        adapter = export_lora(source, out_dir / "adapter", plans, ctx.cfg.edit)
        parts["adapter" if fmt == "both" else ""] = adapter
        meta["adapter_bytes"] = tree_bytes(adapter)
    if fmt in ("full", "both"):
        parts[""] = export_edited(source, out_dir / "model", plans, ctx.cfg.edit, overwrite=False,
                                  space_key="store_root")
    if ctx.cfg.edit.out_dir:
        meta["copied_to"] = str(_copy_out(ctx, parts))
    return meta


SPEC = StageSpec(name="edit", schema_version=1, config_keys=("edit",), upstream=(), build=build,
                 reads_plans=True)
main = stage_main("edit")

if __name__ == "__main__":
    main()
