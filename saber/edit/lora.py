"""The edit as an exact PEFT LoRA adapter: a few MB instead of a copy of the model.

Every linear SABER edit is low rank. For one plan, a writer W [d_out = residual, d_in] becomes
W' = W - Q^T diag(alpha) Q W with orthonormal, sandwich-corrected rows Q [k, d]. Several plans
(iterations) compose to W' = M W with M = P_T ... P_1, P_t = I - Q_t^T diag(alpha_t) Q_t, and
M - I lives on the span of every q: with U an orthonormal basis of that span [R, d],

    M - I = U^T C U,   C = U (M - I) U^T   [R, R]

so W' - W = B A with B = U^T C [d_out, R] and A = U W [R, d_in]. That is a LoRA update with
rank R and scaling lora_alpha / r = 1. Modules with fewer directions are padded with zero rows,
so one rank serves every target module; the adapter reproduces the full export up to float
rounding (the full export rounds to the checkpoint dtype after each plan, the adapter keeps
float32 factors).

LoRA cannot express a norm-preserving edit (it rescales every column), an edit of a writer's
bias, of a fused 3-D expert tensor or of the embedding; those raise LoraUnsupportedError with the
alternative.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig

from saber.edit.config import EditConfig, as_edit_config
from saber.edit.math import compute_dtype, gram_schmidt
from saber.edit.plan import EditPlan
from saber.edit.targets import EditTarget, norm_gain, plan_targets, target_directions
from saber.model.adapters import get_adapter
from saber.tensorfile import save_tensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's prefix before the base model's module names


class LoraUnsupportedError(ValueError):
    """The edit is not an exact low-rank update of nn.Linear weights; export the full model instead."""


def _refuse(reason: str) -> LoraUnsupportedError:
    return LoraUnsupportedError(f"edit.export_format=lora cannot express this edit: {reason}. "
                                "Use edit.export_format=full (a full edited copy of the model)")


def _check_target(target: EditTarget, shape: torch.Size) -> None:
    if target.role == "embedding":
        raise _refuse("it edits the token embedding (edit.embedding=true); set edit.embedding=false for an adapter")
    if target.stacked:
        raise _refuse(f"{target.param} is a fused 3-D expert tensor, which PEFT LoRA does not wrap")
    if len(shape) == 1:
        raise _refuse(f"it changes the bias {target.param}, and a LoRA update has no bias term")
    if target.residual_axis != 0:
        raise _refuse(f"{target.param} stores its residual side on axis {target.residual_axis} (not an "
                      "nn.Linear [out, in] weight)")


def lora_factors(weight: torch.Tensor, plans_directions: Sequence[Sequence[tuple[torch.Tensor, float]]],
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [d_out, R], A [R, d_in]) with B @ A = (P_T ... P_1 - I) W exactly (in `dtype` arithmetic)."""
    every = [q.to(dtype) for directions in plans_directions for q, _ in directions]
    basis = [q for q in gram_schmidt(every) if q is not None]
    w = weight.to(dtype)
    if not basis:
        return torch.zeros(w.shape[0], 0, dtype=dtype), torch.zeros(0, w.shape[1], dtype=dtype)
    u = torch.stack(basis)  # [R, d]
    y = u.T.clone()  # columns U^T, pushed through every projection in order: M U^T
    for directions in plans_directions:
        if not directions:
            continue
        q = torch.stack([d.to(dtype) for d, _ in directions])
        a = torch.tensor([alpha for _, alpha in directions], dtype=dtype)
        y = y - q.T @ (a[:, None] * (q @ y))
    c = u @ y - torch.eye(u.shape[0], dtype=dtype)
    return u.T @ c, u @ w


def _projection_factors(src: Path, keys: dict[str, str], adapter: Any, plans: Sequence[EditPlan],
                        per_plan: list[dict[str, EditTarget]], norms: Any,
                        dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA factors of projection plans, per weight, read from the source checkpoint."""
    per_param: dict[str, list[list[tuple[torch.Tensor, float]]]] = {}
    for name in sorted(set().union(*per_plan)):
        per_param[name] = [
            target_directions(t, p, norm_gain(t.norms, norms, dtype), dtype) if (t := targets.get(name)) else []
            for p, targets in zip(plans, per_plan)]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, directions in per_param.items():
        (slot,) = adapter.checkpoint_name(name, keys)
        with safe_open(str(src / keys[slot.key]), framework="pt") as f:
            weight = f.get_tensor(slot.key)
        factors[name] = lora_factors(weight, directions, dtype)
    return factors


def lsq_lora_factors(plans: Sequence[EditPlan], dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(B, A) per weight for least-squares plans: their deltas add up, W' = W - sum_i left_i right_i."""
    names = sorted(set().union(*(p.deltas for p in plans)))
    return {name: (torch.cat([-p.deltas[name][0].to(dtype) for p in plans if name in p.deltas], 1),
                   torch.cat([p.deltas[name][1].to(dtype) for p in plans if name in p.deltas], 0))
            for name in names}


def export_lora(src_dir: Path, out_dir: Path, plan: EditPlan | Sequence[EditPlan], cfg: Any, *,
                card_extra: str = "") -> Path:
    """Write a PEFT LoRA adapter equal to the edit into the new directory `out_dir`; returns it."""
    from saber.edit.export import _meta_model, _NormReader, _shard_keys, publish_directory

    cfg = as_edit_config(cfg)
    if cfg.norm_preserving:
        raise _refuse("edit.norm_preserving=true rescales every column of the edited weights, which is not a "
                      "low-rank update")
    plans = [plan] if isinstance(plan, EditPlan) else list(plan)
    src, out = Path(src_dir).resolve(), Path(out_dir).resolve()
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new adapter directory")
    keys = _shard_keys(src)
    adapter = get_adapter(AutoConfig.from_pretrained(src))
    model = _meta_model(src)
    shapes = {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)}
    norms = _NormReader(src, adapter, keys)
    dtype = compute_dtype(cfg.dtype_compute)
    per_plan: list[dict[str, EditTarget]] = []
    for p in plans:
        targets = {t.param: t for t in plan_targets(adapter, model, p, cfg)}
        for name, target in targets.items():
            _check_target(target, shapes[name])
        per_plan.append(targets)
    if any(p.deltas for p in plans):
        if not all(p.deltas for p in plans):
            raise _refuse("it mixes least-squares and projection plans; export the full model instead")
        factors = lsq_lora_factors(plans, dtype)
    else:
        factors = _projection_factors(src, keys, adapter, plans, per_plan, norms, dtype)
    rank = max((a.shape[0] for _, a in factors.values()), default=0)
    if rank == 0:
        raise _refuse("the plans remove no direction from any writer (every alpha is 0 or no writer is targeted)")
    tensors: dict[str, torch.Tensor] = {}
    for name, (b, a) in factors.items():
        module = name.removesuffix(".weight")
        pad = rank - a.shape[0]
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).float().contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1).float().contiguous()
    modules = sorted(name.removesuffix(".weight") for name in factors)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(src),
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": modules, "modules_to_save": None, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_tensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(adapter_card(src, plans, cfg, rank, modules, card_extra))
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def adapter_card(src: Path, plans: Sequence[EditPlan], cfg: EditConfig, rank: int, modules: list[str],
                 card_extra: str = "") -> str:
    """Model card of the adapter: what it is, how to load it, which modules it wraps."""
    lines = [
        "---", "library_name: peft", "tags:", "- saber", "- abliteration", "- lora", "---", "",
        f"# SABER edit of {src.name} as a LoRA adapter", "",
        "An exact LoRA form of a SABER refusal edit: W' - W = B A with rank "
        f"{rank} and scaling 1 on {len(modules)} residual writers (B A = (P - I) W, P the product of "
        "the plans' projections, sandwich-norm correction included). Merged, it equals the full "
        "edited checkpoint up to float rounding.", "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f"base = AutoModelForCausalLM.from_pretrained({str(src)!r})",
        "model = PeftModel.from_pretrained(base, '<this directory>')   # or .merge_and_unload()",
        "```", "",
        f"- iterations (plans): {len(plans)}; scope `{cfg.scope}`; roles {', '.join(cfg.roles)}",
        f"- sandwich correction: {cfg.sandwich_correction}; compute dtype: {cfg.dtype_compute}",
    ]
    if card_extra:
        lines += ["", card_extra.strip()]
    return "\n".join(lines) + "\n"
