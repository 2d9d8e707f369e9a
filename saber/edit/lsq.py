"""Closed-form least-squares edit with protected inputs (`edit.method: lsq`); derivation in docs/EDIT.md.

The projection edit W' = W - A W (A = sum_i a_i q_i q_i^T over the plan's directions) removes
the directions from a writer's output on every input. The least-squares edit W' = W - A W G
removes them where the writer's inputs look like the harmful prompts' and keeps the outputs on
the protected prompts (harmless and capability, each with the model's own answer):

    min_dW  E_h ||dW x + A W x||^2  +  (n_k / n_h) E_k ||dW x||^2  +  mu E_p ||dW x||^2  +  lambda ||dW||^2
    =>  G = K_h N (N^T (K_h + K_k + mu K_p) N + lambda I)^-1 N^T

E_k, the kept inputs, are the harmful prompts an earlier iteration's plan freed from refusal
(none in the first iteration): each of their tokens weighs as much as a harmful target token,
whatever mu (K_k is their second moment times their token count over the harmful one), so that
this plan does not undo the earlier one (measured: at the low end of mu, the second plan of an
`organism_hard` Gemma-style seed brought back every refusal the first had removed).

K_h, K_p are the second moments of the writer's inputs on harmful and protected tokens (with
edit.lsq.focus, each harmful token weighted by ||Q^T W x||^2, what the writer writes along the
plan's directions there), lambda = ridge x trace(K_h) / m. N spans the protected inputs' null space (eigenvalues of K_p
<= null_eps x the largest); with null_eps = 1 (the default) N = I and mu alone protects, and
with null_eps small and mu = 0 the update lies in that null space exactly, as in null-space
constrained knowledge editing: protected outputs are then unchanged. mu is calibrated per run on
held-out probes unless set. The update A W G has rank <= the number of directions: it is stored
as two factors per writer (`lsq.safetensors` beside the plan), applied and reverted exactly in
memory, streamed shard-wise and exported as LoRA.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from saber.edit.plan import EditPlan
from saber.edit.targets import EditTarget, norm_gain, plan_targets, target_directions

log = logging.getLogger("saber.edit.lsq")
# mu searched by the calibration when edit.lsq.protect_weight is null (log-spaced bisection)
PROTECT_RANGE = (1e-3, 1e3)


def null_basis(k_protected: torch.Tensor, null_eps: float) -> torch.Tensor:
    """Orthonormal basis [m, r] of the directions along which the protected inputs have a second
    moment <= null_eps x the largest (all of them when the protected inputs are zero)."""
    k_p = k_protected.to(torch.float64)
    evals, evecs = torch.linalg.eigh(0.5 * (k_p + k_p.T))
    top = float(evals.max())
    return evecs[:, evals <= null_eps * top] if top > 0 else torch.eye(k_p.shape[0], dtype=torch.float64)


def input_map(k_target: torch.Tensor, k_protected: torch.Tensor, null_eps: float, ridge: float,
              protect_weight: float = 0.0, k_kept: torch.Tensor | None = None) -> torch.Tensor:
    """G = K_h N (N^T (K_h + K_k + mu K_p) N + lambda I)^-1 N^T (float64 [m, m]); zero when nothing is left to edit.

    k_target, k_protected: second moments [m, m] of the writer's inputs on the harmful and the
    protected prompts (mean over tokens). N spans the protected inputs' null space (null_eps);
    mu = protect_weight also penalises the change on protected inputs inside it. k_kept (None:
    zero): inputs whose outputs are kept with weight 1, whatever mu.
    """
    k_h, k_p = k_target.to(torch.float64), k_protected.to(torch.float64)
    k_k = torch.zeros_like(k_h) if k_kept is None else k_kept.to(torch.float64)
    m = k_h.shape[0]
    # null_eps = 1 keeps every direction: N = I, and no eigendecomposition is needed
    null = torch.eye(m, dtype=torch.float64) if null_eps >= 1.0 else null_basis(k_p, null_eps)
    scale = float(torch.trace(k_h)) / m
    if null.shape[1] == 0 or scale <= 0:
        return torch.zeros(m, m, dtype=torch.float64)
    s = null.T @ (k_h + k_k + protect_weight * k_p) @ null
    s = 0.5 * (s + s.T) + ridge * scale * torch.eye(null.shape[1], dtype=torch.float64)
    # G = (K_h N) S^-1 N^T; S is symmetric positive definite, so solve instead of inverting
    return torch.linalg.solve(s, (k_h @ null).T).T @ null.T


def low_rank_delta(weight_times_map: torch.Tensor,
                   directions: Sequence[tuple[torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(left [d, k], right [k, m]) with A W G = left @ right, A = sum_i a_i q_i q_i^T (orthonormal q_i).

    `weight_times_map` is W G in the residual-first layout [d, m] (float64).
    """
    active = [(q, a) for q, a in directions if a != 0.0]
    dtype = weight_times_map.dtype
    if not active:
        d, m = weight_times_map.shape
        return torch.zeros(d, 0, dtype=dtype), torch.zeros(0, m, dtype=dtype)
    q = torch.stack([q.to(dtype) for q, _ in active])
    alphas = torch.tensor([a for _, a in active], dtype=dtype)
    return q.T * alphas, q @ weight_times_map


@dataclass
class LsqEditor:
    """The writers' input moments of one model, ready to turn any plan into least-squares deltas.

    W G is computed once per protection weight mu and kept (`_maps`), so the calibration's many
    trial edits cost one small product per writer each. `weights` are the unedited writer
    weights (residual-first, float64), read when the editor was built.
    """

    edit_cfg: Any
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]]  # param -> (K_h, K_p)
    weights: dict[str, torch.Tensor]
    norm_gains: dict[str, Any]  # param -> the gain its output passes (sandwich correction), or None
    targets_of: Any  # plan -> the plan's targets on this model
    protect_weight: float
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # param -> K_k (absent: no kept inputs)
    _maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def with_protection(self, protect_weight: float) -> "LsqEditor":
        """The same editor with another mu (input maps recomputed on first use)."""
        return dataclasses.replace(self, protect_weight=float(protect_weight), _maps={})

    def weight_map(self, param: str) -> torch.Tensor:
        if param not in self._maps:
            k_h, k_p = self.moments[param]
            lsq = self.edit_cfg.lsq
            self._maps[param] = self.weights[param] @ input_map(k_h, k_p, lsq.null_eps, lsq.ridge, self.protect_weight,
                                                                self.kept.get(param))
        return self._maps[param]

    def null_dims(self) -> dict[str, tuple[int, int]]:
        """Per writer: (dimension of the protected inputs' null space, input dimension)."""
        return {p: (int(null_basis(k_p, self.edit_cfg.lsq.null_eps).shape[1]), int(k_p.shape[0]))
                for p, (_, k_p) in self.moments.items()}

    def deltas(self, plan: EditPlan) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per writer weight, the factors (left, right) of the plan's update (float32)."""
        from saber.edit.math import compute_dtype

        dtype = compute_dtype(self.edit_cfg.dtype_compute)
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for target in self.targets_of(plan):
            if target.param not in self.moments:
                continue
            gain = self.norm_gains[target.param]
            directions = target_directions(target, plan, None if gain is None else gain.to(dtype), dtype)
            left, right = low_rank_delta(self.weight_map(target.param), directions)
            if left.shape[1]:
                out[target.param] = (left.float().contiguous(), right.float().contiguous())
        return out

    def with_deltas(self, plan: EditPlan) -> EditPlan:
        """The plan with its least-squares deltas attached (what apply_plan and the export read)."""
        return EditPlan(plan.rows, plan.vectors, deltas=self.deltas(plan))


def editor_bytes(model: nn.Module, edit_cfg: Any, plan: EditPlan, kept: bool = False) -> int:
    """Memory an LsqEditor for `plan` holds: two float64 input moments (m x m), three with kept
    inputs, and a float64 copy (d x m) of each covered writer."""
    from saber.model.adapters import get_adapter

    shapes = {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)}
    covered, _ = lsq_writers(plan_targets(get_adapter(model), model, plan, dataclasses.replace(edit_cfg, embedding=False)))
    total = 0
    for target in covered:
        shape = shapes[target.param]
        d = shape[target.residual_axis]
        m = shape[1 - target.residual_axis]
        total += 8 * ((3 if kept else 2) * m * m + d * m)
    return total


def projection_only(edit_cfg: Any, calibrating: bool) -> str | None:
    """Why `edit.method=auto` must use the projection whatever the model, or None: norm
    preservation asked for, or no calibration to choose mu and none given."""
    if edit_cfg.method == "projection":
        return "edit.method=projection"
    if edit_cfg.method == "auto" and edit_cfg.norm_preserving:
        return "edit.norm_preserving=true keeps column norms, which only the projection does"
    if edit_cfg.method == "auto" and edit_cfg.lsq.protect_weight is None and not calibrating:
        return "entangle.calibrate=false and no edit.lsq.protect_weight: nothing can choose mu"
    return None


def resolve_method(model: nn.Module, edit_cfg: Any, plan: EditPlan, calibrating: bool,
                   kept: bool = False) -> tuple[str, str]:
    """The edit method a run uses, and why: `auto` is lsq unless projection_only says otherwise or
    the editor (with kept inputs or not) would exceed edit.lsq.max_memory_gib."""
    reason = projection_only(edit_cfg, calibrating)
    if reason is not None:
        return "projection", reason
    if edit_cfg.method == "lsq":
        return "lsq", "edit.method=lsq"
    need = editor_bytes(model, edit_cfg, plan, kept) / 2**30
    if need > edit_cfg.lsq.max_memory_gib:
        return "projection", (f"the least-squares editor would need {need:.1f} GiB > edit.lsq.max_memory_gib = "
                              f"{edit_cfg.lsq.max_memory_gib}; restrict edit.roles or edit.scope, or raise the limit")
    return "lsq", f"edit.method=auto: the least-squares editor needs {need:.2f} GiB"


def lsq_writers(targets: Sequence[EditTarget]) -> tuple[list[EditTarget], list[str]]:
    """The targets the least-squares edit covers (dense 2-D writer weights) and the skipped params.

    A bias adds the same vector to every output, so it cannot tell harmful inputs from protected
    ones; stacked experts and the embedding have no single input stream. Those are left unedited.
    """
    covered = [t for t in targets if t.role != "embedding" and not t.stacked and t.param.endswith("weight")]
    names = {t.param for t in covered}
    return covered, sorted({t.param for t in targets} - names)


@torch.no_grad()
def writer_input_moments(model: nn.Module, params: Sequence[str], sequences: Sequence[Sequence[int]],
                         batch_size: int, pad_id: int,
                         focus: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Mean x x^T (float64 [m, m]) of each writer's input over every real token of `sequences`.

    With `focus[param]` = M ([k, m]), each token is weighted by ||M x||^2 (the weighted mean): with
    M = Q^T W, by how much the writer writes along the directions Q at that token. One forward
    pass per batch, with a pre-hook on each writer module; padding is skipped.
    """
    from saber.evaluate.generation import _layout, model_device
    from saber.model.chat import position_ids

    modules = {p: model.get_submodule(p.removesuffix(".weight")) for p in params}
    sums: dict[str, torch.Tensor] = {}
    count = 0
    state: dict[str, torch.Tensor] = {}

    totals: dict[str, float] = {}

    def hook_for(param: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()[state["mask"]].to(torch.float64)
            if focus is not None:
                w = ((x @ focus[param].to(x.device).T) ** 2).sum(1)
                totals[param] = totals.get(param, 0.0) + float(w.sum())
                x = x * w.sqrt()[:, None]
            sums[param] = sums.get(param, 0) + x.T @ x
        return hook

    handles = [m.register_forward_pre_hook(hook_for(p)) for p, m in modules.items()]
    try:
        device = model_device(model)
        for start in range(0, len(sequences), batch_size):
            batch = [list(s) for s in sequences[start:start + batch_size] if s]
            if not batch:
                continue
            ids, mask, _ = _layout(batch, None, pad_id, device)
            state["mask"] = mask.bool()
            count += int(mask.sum())
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("edit.method=lsq: the prompt sets for the writer inputs are empty")
    if focus is not None:
        return {p: (sums[p] / max(totals[p], 1e-300)).cpu() for p in params}
    return {p: (sums[p] / count).cpu() for p in params}


def focus_maps(targets: Sequence[EditTarget], plan: EditPlan, weights: Mapping[str, torch.Tensor],
               gains: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Per writer, Q^T W ([k, m] float64): what it writes along every direction of `plan` there."""
    out = {}
    for t in targets:
        qs = [q for q, _ in target_directions(t, plan, gains[t.param], torch.float64)]
        out[t.param] = torch.stack(qs) @ weights[t.param] if qs else torch.zeros(1, weights[t.param].shape[1],
                                                                                 dtype=torch.float64)
    return out


def build_editor(model: nn.Module, edit_cfg: Any, plan: EditPlan, harmful: Sequence[Sequence[int]],
                 protected: Sequence[Sequence[int]], batch_size: int, pad_id: int,
                 protect_weight: float | None = None, kept: Sequence[Sequence[int]] = ()) -> LsqEditor:
    """Measure the writers that `plan` touches on harmful, protected and kept token sequences
    (prompt plus the model's own answer; no kept ones: K_k = 0). mu is `protect_weight`, else edit.lsq.protect_weight, else the
    lower end of the calibration's range (PROTECT_RANGE)."""
    from saber.edit.apply import _tensor_table
    from saber.edit.math import _to_residual_first
    from saber.model.adapters import get_adapter

    adapter = get_adapter(model)
    covered, skipped = lsq_writers(plan_targets(adapter, model, plan, edit_cfg))
    if skipped:
        log.info("edit.method=lsq leaves %d tensors unedited (biases, stacked experts, embedding): %s",
                 len(skipped), ", ".join(skipped[:6]) + (" ..." if len(skipped) > 6 else ""))
    params = [t.param for t in covered]
    table = _tensor_table(model)
    weights = {t.param: _to_residual_first(table[t.param].detach().to(torch.float64), t.residual_axis).cpu()
               for t in covered}
    gains = {t.param: (None if (g := norm_gain(t.norms, lambda name: table[name].detach(), torch.float64)) is None
                       else g.cpu()) for t in covered}
    # focus: harmful tokens count by what the writer writes along the plan's directions there
    focus = focus_maps(covered, plan, weights, gains) if edit_cfg.lsq.focus else None
    k_h = writer_input_moments(model, params, harmful, batch_size, pad_id, focus)
    k_p = writer_input_moments(model, params, protected, batch_size, pad_id)
    # per token as heavy as a harmful target: the mean moment times the kept/harmful token ratio
    share = sum(map(len, kept)) / max(sum(map(len, harmful)), 1)
    k_k = {p: share * k for p, k in writer_input_moments(model, params, kept, batch_size, pad_id).items()} if kept else {}
    mu = protect_weight if protect_weight is not None else edit_cfg.lsq.protect_weight
    editor = LsqEditor(edit_cfg, {p: (k_h[p], k_p[p]) for p in params}, weights, gains,
                       lambda p: plan_targets(adapter, model, p, edit_cfg), PROTECT_RANGE[0] if mu is None else mu, k_k)
    if edit_cfg.lsq.null_eps < 1.0:
        log.info("lsq: null space of the protected inputs per writer (of the input dimension): %s",
                 ", ".join(f"{p.removesuffix('.weight')} {n}/{m}" for p, (n, m) in list(editor.null_dims().items())[:8]))
    return editor


def delta_tensors(deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The factors as named tensors for `lsq.safetensors`."""
    out: dict[str, torch.Tensor] = {}
    for param, (left, right) in deltas.items():
        out[f"{param}.left"] = left.float().contiguous()
        out[f"{param}.right"] = right.float().contiguous()
    return out


def deltas_from_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    params = sorted(k.removesuffix(".left") for k in tensors if k.endswith(".left"))
    missing = [p for p in params if f"{p}.right" not in tensors]
    if missing:
        raise ValueError(f"least-squares deltas lack the right factor of {missing}")
    return {p: (tensors[f"{p}.left"].float(), tensors[f"{p}.right"].float()) for p in params}
