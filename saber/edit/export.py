"""Streaming export: rewrite a safetensors checkpoint shard by shard with the plan applied.

Only one shard's tensors are in memory at a time (plus the few norm vectors the sandwich
correction needs). The output is assembled in a temporary sibling directory and renamed into
place at the end, so a failure leaves nothing half-written; the source is only ever read.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from saber.edit.apply import TiedEmbeddingError, tied_embedding_message
from saber.edit.config import EditConfig, as_edit_config
from saber.edit.math import compute_dtype, project_out, project_weight, subtract_low_rank
from saber.edit.plan import EditPlan
from saber.edit.targets import EditTarget, norm_gain, plan_targets, target_directions
from saber.model.adapters import ArchitectureAdapter, CheckpointTensor, get_adapter
from saber.tensorfile import canonicalise_header, read_header

INDEX_NAME = "model.safetensors.index.json"
CARD_NAME = "README.md"


@dataclass(frozen=True)
class _DiskEdit:
    plan: EditPlan
    target: EditTarget
    slot: CheckpointTensor


class ExportPathError(ValueError):
    """The requested output directory would touch the source or an existing directory."""


class DiskSpaceError(OSError):
    """Not enough free space where an export goes; nothing partial is left behind."""


SPACE_MARGIN = 1.02  # free space required before an export, times the source's size


def tree_bytes(path: Path) -> int:
    """Bytes of every file under `path` (the space a copy of it needs)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def raise_if_disk_full(exc: BaseException, key: str, where: Path) -> None:
    """Re-raise a full disk (ENOSPC) while writing under `where` as a DiskSpaceError naming `key`."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        raise DiskSpaceError(errno.ENOSPC, f"{key}: the disk under {where} filled up while writing; the "
                             f"partial output was removed. Free space or point {key} elsewhere") from exc


def require_space(directory: Path, needed: int, key: str) -> None:
    """Refuse to start writing `needed` bytes under `directory` when the disk lacks them."""
    probe = Path(directory)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed * SPACE_MARGIN:
        raise DiskSpaceError(errno.ENOSPC, f"{key}: {directory} needs {needed / 2**30:.2f} GiB for the export "
                             f"but its disk has {free / 2**30:.2f} GiB free; free space or point {key} elsewhere")


def _check_paths(src: Path, out: Path, overwrite: bool) -> None:
    if out == src or out.is_relative_to(src):
        raise ExportPathError(f"refusing to export into the source model directory or inside it: {out}")
    if src.is_relative_to(out):
        raise ExportPathError(f"refusing to export to {out}: it contains the source model directory")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")


def _shard_keys(src: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index when there is one."""
    index = src / INDEX_NAME
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no safetensors weights in {src} (other weight formats are not read)")
    keys: dict[str, str] = {}
    for shard in shards:
        with safe_open(str(src / shard), framework="pt") as f:
            keys.update({k: shard for k in f.keys()})
    return keys


def _meta_model(src: Path) -> torch.nn.Module:
    """The model's module tree without weights (names and shapes only), built the way the
    loader builds it (causal LM, or image-text-to-text for vision-language configs)."""
    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModelForImageTextToText.from_config(config)


def _disk_edits(
    adapter: ArchitectureAdapter,
    model: torch.nn.Module,
    plan: EditPlan,
    targets: list[EditTarget],
    keys: dict[str, str],
    edits: dict[str, list[_DiskEdit]],
) -> None:
    """Append, per on-disk tensor name, the edits `plan` makes to it."""
    table = dict(model.named_parameters(remove_duplicate=False))
    table.update(dict(model.named_buffers(remove_duplicate=False)))
    for target in targets:
        shape = table[target.param].shape
        num_experts = int(shape[0]) if target.stacked else None
        for slot in adapter.checkpoint_name(
            target.param, keys, residual_axis=target.residual_axis, num_experts=num_experts
        ):
            edits.setdefault(slot.key, []).append(_DiskEdit(plan, target, slot))


class _NormReader:
    """Reads (and caches) single norm vectors from whichever shard holds them."""

    def __init__(self, src: Path, adapter: ArchitectureAdapter, keys: dict[str, str]) -> None:
        self.src, self.adapter, self.keys = src, adapter, keys
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, param: str) -> torch.Tensor:
        if param not in self.cache:
            (slot,) = self.adapter.checkpoint_name(param, self.keys)
            with safe_open(str(self.src / self.keys[slot.key]), framework="pt") as f:
                self.cache[param] = f.get_tensor(slot.key)
        return self.cache[param]


def _edit_tensor(tensor: torch.Tensor, edit: _DiskEdit, cfg: EditConfig, norms: _NormReader) -> torch.Tensor:
    dtype = compute_dtype(cfg.dtype_compute)
    if edit.plan.deltas:
        left, right = edit.plan.deltas[edit.target.param]
        return subtract_low_rank(tensor, left, right, edit.slot.residual_axis, dtype)
    gain = norm_gain(edit.target.norms, norms, dtype)
    directions = target_directions(edit.target, edit.plan, gain, dtype)
    if edit.slot.expert is not None:
        # one expert of a stack that is fused in memory: same per-expert arithmetic as in memory
        return project_out(tensor, directions, edit.slot.residual_axis, norm_preserving=cfg.norm_preserving, dtype=dtype)
    return project_weight(
        tensor,
        directions,
        edit.slot.residual_axis,
        stacked=edit.target.stacked,
        norm_preserving=cfg.norm_preserving,
        dtype=dtype,
    )


def _apply_edits(tensor: torch.Tensor, edits: list[_DiskEdit], cfg: EditConfig, norms: _NormReader) -> torch.Tensor:
    """Every plan's edit of one on-disk tensor, in plan order (cast back after each, like apply_plan)."""
    for edit in edits:
        tensor = _edit_tensor(tensor, edit, cfg, norms)
    return tensor


_COPY_CHUNK = 64 << 20  # bytes per read/write when the kernel cannot copy a range itself


def _copy_range(fin: int, fout: int, src_off: int, dst_off: int, n: int) -> None:
    """Copy n bytes between file descriptors at explicit offsets (copy_file_range where available)."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < n:
        if use_kernel:
            try:
                step = os.copy_file_range(fin, fout, n - done, src_off + done, dst_off + done)
            except OSError:  # another filesystem or kernel: plain reads and writes
                use_kernel = False
                continue
            if step == 0:
                use_kernel = False
                continue
        else:
            data = os.pread(fin, min(_COPY_CHUNK, n - done), src_off + done)
            if not data:
                raise OSError(errno.EIO, f"unexpected end of file after {src_off + done} bytes")
            step = _pwrite_all(fout, data, dst_off + done)
        done += step


def _pwrite_all(fd: int, data: Any, offset: int) -> int:
    view = memoryview(data).cast("B")
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)
    return written


def _patch_copy(src: Path, dst: Path, edited: dict[str, Any], timings: dict[str, float] | None = None) -> None:
    """Write dst as src byte for byte, except the named tensors, recomputed by edited[name](tensor).

    An edit keeps dtype and shape, so every offset stays; the header is the source's own. Unedited
    bytes never pass through Python (copy_file_range) and are copied on a second thread while the
    edited tensors are recomputed, which brings the export close to a plain copy. The output holds
    exactly the tensors that rewriting the shard with save_file would.
    """
    n, header = read_header(src)
    data_start = 8 + n
    spans = sorted((tuple(v["data_offsets"]), k) for k, v in header.items() if k != "__metadata__")
    size = src.stat().st_size
    clock = timings if timings is not None else {}
    tick = time.perf_counter

    def timed(phase: str, t0: float) -> float:
        now = tick()
        clock[phase] = clock.get(phase, 0.0) + now - t0
        return now

    edited_spans = [(data_start + start, data_start + end, key) for (start, end), key in spans if key in edited]
    gaps, pos = [], 0  # unedited byte ranges (header included), copied while the edits compute
    for lo, hi, _ in edited_spans:
        if lo > pos:
            gaps.append((pos, lo - pos))
        pos = hi
    if size > pos:
        gaps.append((pos, size - pos))
    from concurrent.futures import ThreadPoolExecutor

    with src.open("rb") as fin, dst.open("wb") as fout, safe_open(str(src), framework="pt") as f, \
            ThreadPoolExecutor(max_workers=1) as pool:

        def copy_gaps() -> float:
            t0 = tick()
            for offset, length in gaps:
                _copy_range(fin.fileno(), fout.fileno(), offset, offset, length)
            return tick() - t0

        copying = pool.submit(copy_gaps)  # kernel copies release the GIL: I/O overlaps the arithmetic
        for lo, hi, key in edited_spans:
            t = tick()
            tensor = f.get_tensor(key)
            t = timed("read_edited_s", t)
            tensor = edited[key](tensor).contiguous()
            t = timed("compute_s", t)
            raw = tensor.view(torch.uint8).numpy() if tensor.numel() else b""
            if len(memoryview(raw).cast("B")) != hi - lo:
                raise ValueError(f"edit of {key} in {src.name} changed its size; expected {hi - lo} bytes")
            _pwrite_all(fout.fileno(), raw, lo)
            timed("write_edited_s", t)
        t = tick()
        clock["copy_unedited_s"] = clock.get("copy_unedited_s", 0.0) + copying.result()
        timed("wait_for_copy_s", t)
        fout.truncate(size)


def _untie_config(path: Path) -> None:
    config = json.loads(path.read_text())
    config["tie_word_embeddings"] = False
    for sub in ("text_config",):
        if isinstance(config.get(sub), dict) and "tie_word_embeddings" in config[sub]:
            config[sub]["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def model_card(
    src: Path, plans: Sequence[EditPlan], cfg: EditConfig, n_tensors: int, card_extra: str = ""
) -> str:
    """A Markdown model card: method, edit settings, plan table per iteration, edited tensor count."""
    lines = [
        "---",
        "tags:",
        "- saber",
        "- abliteration",
        "---",
        "",
        f"# {src.name} (SABER edit)",
        "",
        "This model was produced by SABER: residual-stream directions associated with refusal were "
        "removed from the weights that write into the residual stream (W' = W - alpha u u^T W, "
        "one orthonormalised u per direction, u corrected for post-writer norm gains).",
        "",
        "## Edit settings",
        "",
        f"- scope: `{cfg.scope}`",
        f"- roles: `{', '.join(cfg.roles)}`",
        f"- embedding edited: `{cfg.embedding}` (tied embeddings: `{cfg.tied_embeddings}`)",
        f"- norm-preserving: `{cfg.norm_preserving}`",
        f"- sandwich-norm correction: `{cfg.sandwich_correction}`",
        f"- compute dtype: `{cfg.dtype_compute}`",
        f"- tensors edited: {n_tensors}",
        f"- iterations: {len(plans)}",
        "",
        "## Plan",
        "",
        "| iteration | rank | source layer | index | alpha |",
        "|---:|---:|---:|---:|---:|",
    ]
    for i, plan in enumerate(plans):
        lines += [f"| {i} | {r.rank} | {r.layer} | {r.index} | {r.alpha:.4g} |" for r in plan.summary().itertuples()]
    if card_extra:
        lines += ["", card_extra.strip()]
    return "\n".join(lines) + "\n"


def export_edited(
    src_dir: Path,
    out_dir: Path,
    plan: EditPlan | Sequence[EditPlan],
    cfg: Any,
    *,
    overwrite: bool = False,
    card_extra: str = "",
    space_key: str = "edit.out_dir",
    timings: dict[str, float] | None = None,
) -> Path:
    """Write the edited model to `out_dir` (Hugging Face layout) and return its path.

    `plan` may be a list of plans (iterations), applied in order with a cast back to the
    checkpoint dtype after each, exactly like successive `apply_plan` calls. `cfg` is an
    EditConfig or anything with its fields. Shards keep their names; the index, config,
    tokenizer and generation files are copied; a README.md model card is written. Refuses to
    write into or over the source, and over an existing directory unless `overwrite`.
    """
    cfg = as_edit_config(cfg)
    plans = [plan] if isinstance(plan, EditPlan) else list(plan)
    src = Path(src_dir).resolve()
    out = Path(out_dir).resolve()
    _check_paths(src, out, overwrite)
    keys = _shard_keys(src)
    adapter = get_adapter(AutoConfig.from_pretrained(src))
    model = _meta_model(src)
    embed = adapter.embedding(model)
    edits: dict[str, list[_DiskEdit]] = {}
    untie = False
    for p in plans:
        targets = plan_targets(adapter, model, p, cfg)
        untie = untie or (any(t.role == "embedding" for t in targets) and embed.tied)
        _disk_edits(adapter, model, p, targets, keys, edits)
    if untie and cfg.tied_embeddings != "untie":
        raise TiedEmbeddingError(tied_embedding_message(cfg.tied_embeddings))
    norms = _NormReader(src, adapter, keys)
    embed_key = adapter.checkpoint_name(embed.param, keys)[0].key if untie else None
    head_key = embed.lm_head_param if untie else None
    if head_key is not None and head_key in keys:
        raise ValueError(f"{head_key} is on disk although the config ties it to the embedding")

    out.parent.mkdir(parents=True, exist_ok=True)
    require_space(out.parent, tree_bytes(src), space_key)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for shard in sorted(set(keys.values())):
            shard_edits = {k: v for k, v in edits.items() if keys.get(k) == shard}
            if embed_key is None or keys.get(embed_key) != shard:
                # the layout stays: copy the file's bytes, recompute only the edited tensors in place
                _patch_copy(src / shard, tmp / shard,
                            {k: (lambda t, es=es: _apply_edits(t, es, cfg, norms)) for k, es in shard_edits.items()},
                            timings)
                continue
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(str(src / shard), framework="pt") as f:
                metadata = f.metadata() or {"format": "pt"}
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    if key == embed_key:
                        tensors[head_key] = tensor.clone()  # type: ignore[index]
                    tensors[key] = _apply_edits(tensor, edits.get(key, []), cfg, norms).contiguous()
            save_file(tensors, str(tmp / shard), metadata=metadata)
            canonicalise_header(tmp / shard)
            del tensors
        for item in src.iterdir():
            if item.suffix == ".safetensors" or item.name == CARD_NAME or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        if untie:
            _untie_config(tmp / "config.json")
            if (tmp / INDEX_NAME).exists():
                index = json.loads((tmp / INDEX_NAME).read_text())
                index["weight_map"][head_key] = keys[embed_key]  # type: ignore[index]
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / CARD_NAME).write_text(model_card(src, plans, cfg, len(edits), card_extra))
        publish_directory(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(exc, space_key, out.parent)
        raise
    return out


def publish_directory(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, replacing an existing `out` only after the new one is complete."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
