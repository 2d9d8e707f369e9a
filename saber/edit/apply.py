"""In-memory application of an edit plan, exactly reversible (for evaluation and sweeps)."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import nn

from saber.edit.config import as_edit_config
from saber.edit.math import compute_dtype, project_weight, subtract_low_rank
from saber.edit.plan import EditPlan
from saber.edit.targets import EditTarget, norm_gain, plan_targets, target_directions
from saber.model.adapters import get_adapter


class TiedEmbeddingError(ValueError):
    """Editing a tied embedding would silently change the output head."""


def _tensor_table(model: nn.Module) -> dict[str, torch.Tensor]:
    table: dict[str, torch.Tensor] = dict(model.named_buffers(remove_duplicate=False))
    table.update(dict(model.named_parameters(remove_duplicate=False)))
    return table


def tied_embedding_message(mode: str) -> str:
    return (
        "the token embedding is tied to the output head, so editing it would also change the "
        f"output head. Set edit.tied_embeddings=untie to give the head its own copy, or edit.embedding=false "
        f"(current edit.tied_embeddings={mode})."
    )


def _set_tie_flag(model: nn.Module, value: bool) -> list[tuple[object, bool]]:
    changed = []
    config = model.config
    for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
        if hasattr(cfg, "tie_word_embeddings"):
            changed.append((cfg, cfg.tie_word_embeddings))
            cfg.tie_word_embeddings = value
    return changed


class EditHandle:
    """Originals of every touched tensor; `revert()` restores them bit for bit."""

    def __init__(self, model: nn.Module, revertible: bool = True) -> None:
        self.model = model
        self.revertible = revertible
        self.originals: dict[str, torch.Tensor] = {}
        self.targets: list[EditTarget] = []
        self._untied: tuple[nn.Module, nn.Parameter, list[tuple[object, bool]]] | None = None
        self._reverted = False

    @property
    def edited_params(self) -> list[str]:
        return list(dict.fromkeys(t.param for t in self.targets))

    def revert(self) -> None:
        """Restore the model to its state before `apply_plan` (idempotent)."""
        if self._reverted:
            return
        if not self.revertible:
            raise RuntimeError("this edit was applied with keep_originals=False and cannot be reverted; "
                               "reload the model instead")
        table = _tensor_table(self.model)
        with torch.no_grad():
            for name, original in self.originals.items():
                table[name].copy_(original)
        if self._untied is not None:
            head, shared, flags = self._untied
            head.weight = shared
            for cfg, value in flags:
                cfg.tie_word_embeddings = value  # type: ignore[attr-defined]
        self._reverted = True

    def __enter__(self) -> "EditHandle":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.revert()


def _untie(model: nn.Module, handle: EditHandle) -> None:
    head = model.get_output_embeddings()
    shared = head.weight
    head.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
    handle._untied = (head, shared, _set_tie_flag(model, False))


def apply_plan(model: nn.Module, plan: EditPlan, cfg: Any, *, keep_originals: bool = True) -> EditHandle:
    """Orthogonalise `model`'s residual writers in place according to `plan` and `cfg`.

    `cfg` is an EditConfig or anything with its fields (the Hydra `edit` node). Returns a
    handle that reverts the edit (also usable as a context manager). Only touched tensors are
    copied; with keep_originals=False none is (a load-edit-save that never reverts needs no
    second copy of the edited weights), and the handle cannot revert. A tied embedding is untied or refused according to cfg.tied_embeddings. Plans of
    successive iterations are applied by successive calls (revert them in reverse order).
    """
    cfg = as_edit_config(cfg)
    adapter = get_adapter(model)
    dtype = compute_dtype(cfg.dtype_compute)
    handle = EditHandle(model, revertible=keep_originals)
    targets = plan_targets(adapter, model, plan, cfg)
    if any(t.role == "embedding" for t in targets) and adapter.embedding(model).tied:
        if cfg.tied_embeddings != "untie":
            raise TiedEmbeddingError(tied_embedding_message(cfg.tied_embeddings))
        _untie(model, handle)
    table = _tensor_table(model)
    handle.targets = targets
    try:
        with torch.no_grad():
            for target in targets:
                tensor = table[target.param]
                if plan.deltas:
                    left, right = plan.deltas[target.param]
                    edited = subtract_low_rank(tensor.detach(), left, right, target.residual_axis, dtype)
                else:
                    gain = norm_gain(target.norms, lambda name: table[name].detach(), dtype)
                    edited = project_weight(tensor.detach(), target_directions(target, plan, gain, dtype),
                                            target.residual_axis, stacked=target.stacked,
                                            norm_preserving=cfg.norm_preserving, dtype=dtype)
                if keep_originals:
                    handle.originals[target.param] = tensor.detach().clone()
                tensor.copy_(edited)
    except BaseException:
        if keep_originals:
            handle.revert()
        raise
    return handle
