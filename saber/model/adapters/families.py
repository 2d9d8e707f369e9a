"""Concrete adapters, one per model family, checked against transformers' modeling code.

Norm offsets: Gemma 2/3 RMSNorm multiplies by (1 + weight); Gemma 3n and Gemma 4 RMSNorm by
weight alone; Llama, Qwen and gpt-oss have no norm between a writer and the residual.
"""

from __future__ import annotations

from typing import Any

import torch

from saber.model.adapters.base import ArchitectureAdapter, WriterTemplate
from saber.model.adapters.registry import register_adapter

_ATTN = WriterTemplate("attn_out", "self_attn.o_proj")
_LINEAR_ATTN = WriterTemplate("linear_attn_out", "linear_attn.out_proj")
_MLP = WriterTemplate("mlp_down", "mlp.down_proj")
_EXPERT = WriterTemplate("expert_down", "mlp.experts.{e}.down_proj")


@register_adapter
class LlamaAdapter(ArchitectureAdapter):
    """Pre-norm decoders: residual += o_proj(...); residual += down_proj(...)."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    writer_templates = (_ATTN, _MLP)


@register_adapter
class Qwen3MoeAdapter(ArchitectureAdapter):
    """Qwen3-MoE: dense layers (mlp_only_layers) or a sparse block.

    transformers 5 fuses the experts at load time into `mlp.experts.down_proj` of shape
    [experts, hidden, inter] (per-expert nn.Linear orientation, so the hidden axis is 1);
    checkpoints store `mlp.experts.{e}.down_proj.weight` [hidden, inter].
    """

    model_types = ("qwen3_moe",)
    writer_templates = (
        _ATTN,
        _MLP,
        _EXPERT,
        WriterTemplate("fused_expert_down", "mlp.experts", weight="down_proj", bias="down_proj_bias", residual_axis=1),
    )


@register_adapter
class Qwen35Adapter(ArchitectureAdapter):
    """Qwen3.5 hybrid: linear-attention layers write through `linear_attn.out_proj`."""

    model_types = ("qwen3_5", "qwen3_5_text")
    writer_templates = (_ATTN, _LINEAR_ATTN, _MLP)


@register_adapter
class GptOssAdapter(ArchitectureAdapter):
    """gpt-oss: fused experts computed as `x @ down_proj[e] + down_proj_bias[e]`.

    `down_proj` is [experts, inter, hidden] (hidden last, axis 2), the bias [experts, hidden]
    (axis 1); the checkpoint stores the same fused names (bf16 release; MXFP4 blocks are not
    editable).
    """

    model_types = ("gpt_oss",)
    writer_templates = (
        _ATTN,
        WriterTemplate("fused_expert_down", "mlp.experts", weight="down_proj", bias="down_proj_bias", residual_axis=2),
    )


@register_adapter
class GemmaAdapter(ArchitectureAdapter):
    """Gemma 2 / 3: sandwich norms with gain (1 + weight) after attention and MLP."""

    model_types = ("gemma2", "gemma3", "gemma3_text")
    norm_offset = 1.0
    writer_templates = (
        WriterTemplate("attn_out", "self_attn.o_proj", post_norm="post_attention_layernorm"),
        WriterTemplate("mlp_down", "mlp.down_proj", post_norm="post_feedforward_layernorm"),
    )


@register_adapter
class Gemma3nAdapter(ArchitectureAdapter):
    """Gemma 3n: AltUp keeps [num_altup_inputs, B, S, d] streams; stream `altup_active_idx`
    (0) is the one attention, MLP and LAuReL read and write.

    The per-layer-input projection writes into the other streams (`corrected[1:] += ...`).
    Norms multiply by weight alone (offset 0).
    """

    model_types = ("gemma3n", "gemma3n_text")
    norm_offset = 0.0
    writer_templates = (
        WriterTemplate("attn_out", "self_attn.o_proj", post_norm="post_attention_layernorm"),
        WriterTemplate("laurel_out", "laurel.linear_right", post_norm="laurel.post_laurel_norm"),
        WriterTemplate("mlp_down", "mlp.down_proj", post_norm="post_feedforward_layernorm"),
        WriterTemplate("per_layer_embed_out", "per_layer_projection", post_norm="post_per_layer_input_norm"),
    )
    active_index: int = 0

    def layer_output_hidden(self, output: Any) -> torch.Tensor:
        hidden = super().layer_output_hidden(output)
        return hidden[self.active_index] if hidden.dim() == 4 else hidden

    def set_layer_output_hidden(self, output: Any, hidden: torch.Tensor) -> Any:
        stacked = super().layer_output_hidden(output)
        if stacked.dim() == 4:
            stacked = stacked.clone()
            stacked[self.active_index] = hidden
            hidden = stacked
        return super().set_layer_output_hidden(output, hidden)


@register_adapter
class Gemma4Adapter(ArchitectureAdapter):
    """Gemma 4: sandwich norms (gain = weight), optional per-layer-input projection, optional
    MoE block, and a `layer_scalar` buffer multiplying the whole layer output.

    With the MoE block the dense MLP output passes `post_feedforward_layernorm_1`, the experts'
    output `post_feedforward_layernorm_2`, and their sum `post_feedforward_layernorm`.
    """

    model_types = ("gemma4", "gemma4_text")
    norm_offset = 0.0
    layer_scalars = ("layer_scalar",)
    writer_templates = (
        WriterTemplate("attn_out", "self_attn.o_proj", post_norm="post_attention_layernorm"),
        # dense MLP of a MoE layer: its own norm first, then the shared post-FFN norm
        WriterTemplate(
            "mlp_down",
            "mlp.down_proj",
            post_norm="post_feedforward_layernorm_1",
            outer_norms=("post_feedforward_layernorm",),
        ),
        WriterTemplate(
            "fused_expert_down",
            "experts",
            weight="down_proj",
            bias=None,
            residual_axis=1,
            post_norm="post_feedforward_layernorm_2",
            outer_norms=("post_feedforward_layernorm",),
        ),
        WriterTemplate("per_layer_embed_out", "per_layer_projection", post_norm="post_per_layer_input_norm"),
    )

    def layer_writers(self, index: int, prefix: str, layer: torch.nn.Module) -> list:
        writers = super().layer_writers(index, prefix, layer)
        if getattr(layer, "enable_moe_block", False):
            return writers
        # Dense layer: the MLP output passes only post_feedforward_layernorm.
        fixed = []
        for w in writers:
            if w.role == "mlp_down":
                norm = self._norm(prefix, layer, "post_feedforward_layernorm")
                w = type(w)(w.layer, w.role, w.param, w.bias, w.residual_axis, norm, w.scale_params, ())
            fixed.append(w)
        return fixed
