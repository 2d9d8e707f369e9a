"""Architecture adapter base: where the decoder lives and which weights write into the residual.

An adapter describes a model family declaratively: a list of writer templates (module paths
relative to a decoder layer) and the norms that sit between each writer and the residual add.
The edit code never guesses from shapes; it reads the role and the residual axis from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Collection

import torch
from torch import nn


@dataclass(frozen=True)
class NormSpec:
    """A per-channel RMSNorm between a writer and the residual: gain = offset + weight."""

    param: str
    offset: float


@dataclass(frozen=True)
class Writer:
    """One weight whose output is added to the residual stream of decoder layer `layer`.

    `post_norm` is the norm applied to the writer's output before the add; `outer_norms` are
    further norms applied after it (Gemma 4 MoE: per-branch norm, then the shared post-FFN norm).
    The effective gain on the write is the product of all their gains.
    """

    layer: int
    role: str
    param: str
    bias: str | None
    residual_axis: int
    post_norm: NormSpec | None
    scale_params: tuple[str, ...] = ()
    outer_norms: tuple[NormSpec, ...] = ()

    @property
    def norms(self) -> tuple[NormSpec, ...]:
        """Every norm between the writer and the residual, innermost first."""
        return ((self.post_norm,) if self.post_norm is not None else ()) + self.outer_norms


@dataclass(frozen=True)
class EmbeddingSpec:
    """The token embedding ([vocab, d], residual axis 1) and whether the output head shares it."""

    param: str
    scale: float
    tied: bool
    lm_head_param: str | None
    residual_axis: int = 1


@dataclass(frozen=True)
class CheckpointTensor:
    """Where (part of) a loaded parameter lives in the safetensors checkpoint.

    `expert` is set when the loaded tensor is a fused [experts, ...] stack but the checkpoint
    stores one tensor per expert: the on-disk tensor is slice `expert` of the loaded one, and
    `residual_axis` is then the axis within that slice.
    """

    key: str
    expert: int | None
    residual_axis: int


@dataclass(frozen=True)
class WriterTemplate:
    """A writer described relative to a decoder layer; `{e}` in `module` expands per expert."""

    role: str
    module: str
    weight: str = "weight"
    bias: str | None = "bias"
    residual_axis: int = 0
    post_norm: str | None = None
    outer_norms: tuple[str, ...] = ()


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """`root.get_submodule(path)` returning None when any part is missing."""
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


class ArchitectureAdapter:
    """Base adapter for decoder-only transformers in Hugging Face layout.

    Subclasses set `model_types`, `writer_templates`, `norm_offset` and, where the family needs
    it, override `layer_output_hidden` (AltUp stacking) or `extra_writers`.
    """

    model_types: tuple[str, ...] = ()
    #: attribute paths tried in order to find the decoder's ModuleList
    layer_paths: tuple[str, ...] = (
        "model.layers",
        "model.language_model.layers",
        "language_model.model.layers",
        "model.model.layers",
        "language_model.layers",
    )
    writer_templates: tuple[WriterTemplate, ...] = ()
    #: RMSNorm gain = norm_offset + weight for the norms named in writer templates
    norm_offset: float = 0.0
    #: per-layer scalar buffers multiplying the layer output (informational)
    layer_scalars: tuple[str, ...] = ()
    embed_paths: tuple[str, ...] = ("embed_tokens",)

    # ---- module tree -------------------------------------------------------------------
    def layers_path(self, model: nn.Module) -> str:
        """Dotted path of the decoder ModuleList inside `model`."""
        for path in self.layer_paths:
            module = get_submodule(model, path)
            if isinstance(module, nn.ModuleList):
                return path
        raise ValueError(
            f"{type(self).__name__}: no decoder layer list at any of {self.layer_paths} in {type(model).__name__}"
        )

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order (the text decoder for multimodal wrappers)."""
        return model.get_submodule(self.layers_path(model))  # type: ignore[return-value]

    def layer_output_hidden(self, output: Any) -> torch.Tensor:
        """The residual stream [B, S, d] from a decoder layer's forward output."""
        if isinstance(output, (tuple, list)):
            output = output[0]
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"unexpected decoder layer output type {type(output).__name__}")
        return output

    def set_layer_output_hidden(self, output: Any, hidden: torch.Tensor) -> Any:
        """Return `output` with its residual stream replaced by `hidden` (for forward hooks)."""
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        if isinstance(output, list):
            return [hidden, *output[1:]]
        return hidden

    def hidden_size(self, model: nn.Module) -> int:
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(text.hidden_size)

    # ---- writers -----------------------------------------------------------------------
    def _norm(self, prefix: str, layer: nn.Module, path: str | None) -> NormSpec | None:
        if path is None:
            return None
        module = get_submodule(layer, path)
        if module is None or getattr(module, "weight", None) is None:
            return None
        return NormSpec(param=f"{prefix}.{path}.weight", offset=self.norm_offset)

    def _expand(self, layer: nn.Module, template: WriterTemplate) -> list[str]:
        if "{e}" not in template.module:
            return [template.module]
        head = template.module.split(".{e}")[0]
        experts = get_submodule(layer, head)
        if not isinstance(experts, nn.ModuleList):
            return []
        return [template.module.replace("{e}", str(e)) for e in range(len(experts))]

    def layer_writers(self, index: int, prefix: str, layer: nn.Module) -> list[Writer]:
        """Writers of one decoder layer; `prefix` is its dotted path in the model."""
        writers: list[Writer] = []
        for template in self.writer_templates:
            for module_path in self._expand(layer, template):
                module = get_submodule(layer, module_path)
                if module is None:
                    continue
                weight = getattr(module, template.weight, None)
                if not isinstance(weight, torch.Tensor):
                    continue
                bias = getattr(module, template.bias, None) if template.bias else None
                base = f"{prefix}.{module_path}" if module_path else prefix
                outer = tuple(n for n in (self._norm(prefix, layer, p) for p in template.outer_norms) if n)
                writers.append(
                    Writer(
                        layer=index,
                        role=template.role,
                        param=f"{base}.{template.weight}",
                        bias=f"{base}.{template.bias}" if isinstance(bias, torch.Tensor) else None,
                        residual_axis=template.residual_axis,
                        post_norm=self._norm(prefix, layer, template.post_norm),
                        scale_params=tuple(
                            f"{prefix}.{s}" for s in self.layer_scalars if hasattr(layer, s.split(".")[0])
                        ),
                        outer_norms=outer,
                    )
                )
        return writers

    def writers(self, model: nn.Module) -> list[Writer]:
        """All residual writers of all decoder layers, in layer order."""
        path = self.layers_path(model)
        layers = model.get_submodule(path)
        out: list[Writer] = []
        for i, layer in enumerate(layers):
            out.extend(self.layer_writers(i, f"{path}.{i}", layer))
        return out

    # ---- embedding ---------------------------------------------------------------------
    def embedding(self, model: nn.Module) -> EmbeddingSpec:
        """The input token embedding and whether the output head shares its storage."""
        embed = model.get_input_embeddings()
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        param = next(n for n, p in model.named_parameters() if p is embed.weight)
        head = model.get_output_embeddings()
        head_name = None
        tied = False
        if head is not None and getattr(head, "weight", None) is not None:
            tied = head.weight is embed.weight or (
                not embed.weight.is_meta and head.weight.data_ptr() == embed.weight.data_ptr()
            )
            head_name = self._head_name(model, head.weight, names)
        scale = getattr(embed, "scalar_embed_scale", None)
        if scale is None:
            raw = getattr(embed, "embed_scale", 1.0)
            scale = float(raw.item() if isinstance(raw, torch.Tensor) else raw)
        return EmbeddingSpec(param=param, scale=float(scale), tied=bool(tied), lm_head_param=head_name)

    @staticmethod
    def _head_name(model: nn.Module, weight: torch.Tensor, names: dict[int, str]) -> str | None:
        for name, p in model.named_parameters(remove_duplicate=False):
            if p is weight and not name.endswith("embed_tokens.weight"):
                return name
        for name, module in model.named_modules():
            if module is model.get_output_embeddings():
                return f"{name}.weight"
        return names.get(id(weight))

    # ---- checkpoint names --------------------------------------------------------------
    #: (pattern, replacement) rewrites from loaded names to legacy on-disk names, tried in order
    checkpoint_renames: tuple[tuple[str, str], ...] = (
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.", "model.language_model."),
        (r"^model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
    )
    #: loaded fused-expert parameter suffix -> per-expert on-disk suffix
    per_expert_names: dict[str, str] = {
        "experts.down_proj": "experts.{e}.down_proj.weight",
        "experts.down_proj_bias": "experts.{e}.down_proj.bias",
    }

    def _candidates(self, param: str) -> list[str]:
        out = [param]
        for pattern, repl in self.checkpoint_renames:
            renamed = re.sub(pattern, repl, param)
            if renamed != param and renamed not in out:
                out.append(renamed)
        return out

    def checkpoint_name(
        self,
        param: str,
        available: Collection[str],
        *,
        residual_axis: int | None = None,
        num_experts: int | None = None,
    ) -> list[CheckpointTensor]:
        """On-disk tensor(s) holding loaded parameter `param`.

        A name present on disk (directly or under a legacy prefix) maps to itself. A fused
        expert stack absent from disk maps to one tensor per expert, each a slice along axis 0,
        with the residual axis shifted down by one. Raises KeyError when nothing matches.
        """
        axis = residual_axis if residual_axis is not None else 0
        for name in self._candidates(param):
            if name in available:
                return [CheckpointTensor(key=name, expert=None, residual_axis=axis)]
        for fused, per_expert in self.per_expert_names.items():
            if not param.endswith(fused):
                continue
            stem = param[: -len(fused)]
            for cand in self._candidates(stem + per_expert):
                keys = []
                e = 0
                while cand.format(e=e) in available and (num_experts is None or e < num_experts):
                    keys.append(cand.format(e=e))
                    e += 1
                if keys:
                    if num_experts is not None and len(keys) != num_experts:
                        raise KeyError(f"{param}: found {len(keys)} of {num_experts} per-expert tensors on disk")
                    return [CheckpointTensor(key=k, expert=i, residual_axis=axis - 1) for i, k in enumerate(keys)]
        raise KeyError(f"no checkpoint tensor for loaded parameter {param!r} (tried {self._candidates(param)})")


@dataclass
class _Registry:
    by_type: dict[str, type[ArchitectureAdapter]] = field(default_factory=dict)


REGISTRY = _Registry()
