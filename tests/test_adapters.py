"""Architecture adapters against the real module trees of tiny random models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from saber.edit import EditConfig, EditPlan, PlanRow, apply_plan
from saber.edit.config import KNOWN_ROLES
from saber.model.adapters import (
    ArchitectureAdapter,
    WriterTemplate,
    decoder_layers,
    get_adapter,
    layer_output_hidden,
    register_adapter,
)
from saber.model.adapters.base import REGISTRY
from saber.testing.tiny_models import HIDDEN, TINY_ARCHS, load_tiny

# AltUp models mix the (per-channel scaled) normalised input into the stream through LAuReL,
# so only an axis-aligned direction is exactly preserved by the input norm; see test below.
AXIS_ALIGNED = {"gemma3n_text"}




def _inputs(model: torch.nn.Module, seq: int = 7, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # ids below 300 avoid gemma3's image tokens at the top of the vocabulary
    ids = torch.randint(3, 300, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _disk_keys(path: Path) -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {}
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            keys.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return keys


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_writers_exist_with_residual_axis(arch: str, tiny_dirs: dict[str, Path]) -> None:
    model = load_tiny(tiny_dirs[arch])
    adapter = get_adapter(model)
    state = model.state_dict()
    writers = adapter.writers(model)
    layers = decoder_layers(model)
    assert {w.layer for w in writers} == set(range(len(layers)))
    for w in writers:
        assert w.param in state, w
        assert state[w.param].shape[w.residual_axis] == HIDDEN, w
        module_path = w.param.rsplit(".", 1)[0]
        model.get_submodule(module_path)  # raises if the adapter names a module that is not there
        if w.bias is not None:
            assert state[w.bias].shape[-1] == HIDDEN
        for norm in w.norms:
            assert state[norm.param].shape == (HIDDEN,)
        for scalar in w.scale_params:
            assert scalar in state
    roles = {w.role for w in writers}
    expected = {
        "qwen3_moe": {"attn_out", "mlp_down", "fused_expert_down"},
        "qwen3_5_text": {"attn_out", "linear_attn_out", "mlp_down"},
        "gpt_oss": {"attn_out", "fused_expert_down"},
        "gemma3n_text": {"attn_out", "laurel_out", "mlp_down", "per_layer_embed_out"},
        "gemma4_text": {"attn_out", "mlp_down", "per_layer_embed_out"},
        "gemma4": {"attn_out", "mlp_down", "per_layer_embed_out"},
        "gemma4_moe": {"attn_out", "mlp_down", "fused_expert_down"},
    }.get(arch, {"attn_out", "mlp_down"})
    assert roles == expected
    assert roles <= set(KNOWN_ROLES)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_norm_offsets_match_modeling_code(arch: str, tiny_dirs: dict[str, Path]) -> None:
    """The declared gain (offset + weight) equals what the norm module multiplies by."""
    model = load_tiny(tiny_dirs[arch])
    x = torch.randn(3, HIDDEN)
    for w in get_adapter(model).writers(model):
        for norm in w.norms:
            module = model.get_submodule(norm.param.rsplit(".", 1)[0])
            gain = norm.offset + module.weight.detach().float()
            rms = x.pow(2).mean(-1, keepdim=True).add(module.eps).rsqrt()
            # float32 RMSNorm of a 3x64 input: reference and module agree to rounding
            torch.testing.assert_close(module(x), x * rms * gain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_writers_map_to_checkpoint_tensors(arch: str, tiny_dirs: dict[str, Path]) -> None:
    model = load_tiny(tiny_dirs[arch])
    adapter = get_adapter(model)
    state = model.state_dict()
    disk = _disk_keys(tiny_dirs[arch])
    files = list(tiny_dirs[arch].glob("*.safetensors"))
    names = [(w.param, w.residual_axis) for w in adapter.writers(model)]
    names += [(w.bias, 0) for w in adapter.writers(model) if w.bias is not None]
    names += [(n.param, 0) for w in adapter.writers(model) for n in w.norms]
    emb = adapter.embedding(model)
    names.append((emb.param, emb.residual_axis))
    for param, axis in names:
        loaded = state[param]
        stacked = loaded.dim() == 3
        slots = adapter.checkpoint_name(param, disk, residual_axis=axis, num_experts=loaded.shape[0] if stacked else None)
        for slot in slots:
            assert slot.key in disk
            expected = loaded if slot.expert is None else loaded[slot.expert]
            assert disk[slot.key] == tuple(expected.shape)
            (f,) = [p for p in files if slot.key in safe_open(str(p), framework="pt").keys()]
            with safe_open(str(f), framework="pt") as handle:
                assert torch.equal(handle.get_tensor(slot.key), expected)
            if slot.expert is not None:
                assert disk[slot.key][slot.residual_axis] == HIDDEN
    with pytest.raises(KeyError):
        adapter.checkpoint_name("model.layers.0.not_a_tensor.weight", disk)


def _layer_io(model: torch.nn.Module, layer_idx: int, pre: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and raw output of one decoder layer during a forward pass (optionally rewriting the input)."""
    layer = decoder_layers(model)[layer_idx]
    seen: dict[str, torch.Tensor] = {}

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            hidden = args[0] if pre is None else pre(args[0])
            args = (hidden, *args[1:])
        else:
            hidden = kwargs["hidden_states"] if pre is None else pre(kwargs["hidden_states"])
            kwargs = {**kwargs, "hidden_states": hidden}
        seen["in"] = hidden.detach().clone()
        return args, kwargs

    def post_hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        seen["out"] = out.detach().clone()

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True), layer.register_forward_hook(post_hook)]
    try:
        with torch.no_grad():
            model(**_inputs(model))
    finally:
        for h in handles:
            h.remove()
    return seen["in"], seen["out"]


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a not in AXIS_ALIGNED])
def test_writer_set_complete_by_zeroing(arch: str, tiny_dirs: dict[str, Path]) -> None:
    """Zero every listed writer (weight and bias) of a layer: its residual delta must vanish.

    A writer the adapter forgot (a linear-attention out_proj, an expert stack, a per-layer
    embedding projection) would leave a non-zero delta. Gemma 4 multiplies the whole layer
    output by `layer_scalar`, so there the check is out == layer_scalar * in.
    """
    model = load_tiny(tiny_dirs[arch])
    adapter = get_adapter(model)
    state = dict(model.named_parameters())
    for layer_idx in range(len(decoder_layers(model))):
        before_in, before_out = _layer_io(model, layer_idx)
        assert (before_out - before_in).abs().max() > 1e-3  # the layer does write something
        with torch.no_grad():
            for w in adapter.writers(model):
                if w.layer == layer_idx:
                    state[w.param].zero_()
                    if w.bias is not None:
                        state[w.bias].zero_()
        x_in, x_out = _layer_io(model, layer_idx)
        scalar = torch.ones(())
        for name in {s for w in adapter.writers(model) if w.layer == layer_idx for s in w.scale_params}:
            scalar = scalar * model.state_dict()[name]
        # float32 forward; an unexplained writer would contribute O(1) entries
        torch.testing.assert_close(x_out, x_in * scalar, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_writer_set_complete_by_direction(arch: str, tiny_dirs: dict[str, Path]) -> None:
    """Remove v from a layer's input (every AltUp stream) and from all its listed writers
    (sandwich-corrected, alpha = 1): nothing along v may appear in its output.

    This exercises the norm gains too: without the correction the post-norm gain would
    re-introduce v. For Gemma 3n, v is an axis vector, which per-channel input norms and
    AltUp's per-stream scalar mixing keep at exactly zero.
    """
    model = load_tiny(tiny_dirs[arch])
    g = torch.Generator().manual_seed(7)
    if arch in AXIS_ALIGNED:
        v = torch.zeros(HIDDEN)
        v[5] = 1.0
    else:
        v = torch.randn(HIDDEN, generator=g)
        v = v / v.norm()
    n_layers = len(decoder_layers(model))
    for layer_idx in range(n_layers):
        plan = EditPlan([PlanRow(layer_idx, 0, 0, 1.0, "v")], {"v": v})
        cfg = EditConfig(scope="same", roles=list(KNOWN_ROLES))

        def strip(h: torch.Tensor) -> torch.Tensor:
            return h - (h @ v).unsqueeze(-1) * v

        _, out_plain = _layer_io(model, layer_idx, pre=strip)
        with apply_plan(model, plan, cfg):
            _, out = _layer_io(model, layer_idx, pre=strip)
        scale = out.norm(dim=-1).max()
        along = (out @ v).abs().max()
        # float32: removal is exact up to rounding, ~1e-7 relative; 1e-5 leaves headroom
        assert along <= 1e-5 * scale, (layer_idx, along)
        # without the edit the layer writes along v, far above that tolerance
        assert (out_plain @ v).abs().max() > 1e-3 * scale


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_layer_output_hidden(arch: str, tiny_dirs: dict[str, Path]) -> None:
    model = load_tiny(tiny_dirs[arch])
    captured: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: captured.append(layer_output_hidden(model, out)))
        for layer in decoder_layers(model)
    ]
    with torch.no_grad():
        result = model(**_inputs(model, seq=5, batch=3), output_hidden_states=True)
    for h in handles:
        h.remove()
    assert [tuple(c.shape) for c in captured] == [(3, 5, HIDDEN)] * len(decoder_layers(model))
    hidden_states = result.hidden_states
    if arch not in AXIS_ALIGNED:
        # hidden_states[l + 1] is layer l's output (the last one is after the final norm)
        for layer_idx, c in enumerate(captured[:-1]):
            torch.testing.assert_close(c, hidden_states[layer_idx + 1], rtol=0, atol=0)


def test_unknown_architecture_says_how_to_add_one() -> None:
    with pytest.raises(ValueError) as info:
        get_adapter("bert")
    message = str(info.value)
    assert "'bert'" in message and "llama" in message and "gemma4" in message
    assert "register_adapter" in message and "ArchitectureAdapter" in message


def test_register_custom_adapter() -> None:
    @register_adapter
    class ToyAdapter(ArchitectureAdapter):
        model_types = ("toy_arch_for_test",)
        writer_templates = (WriterTemplate("attn_out", "attn.out"),)

    try:
        assert isinstance(get_adapter("toy_arch_for_test"), ToyAdapter)
    finally:
        REGISTRY.by_type.pop("toy_arch_for_test")


def test_square_o_proj_projected_on_output_side(tiny_dirs: dict[str, Path]) -> None:
    """o_proj is square in the tiny llama: the residual axis must still be the output axis."""
    model = load_tiny(tiny_dirs["llama"])
    (w,) = [w for w in get_adapter(model).writers(model) if w.role == "attn_out" and w.layer == 0]
    assert model.state_dict()[w.param].shape == (HIDDEN, HIDDEN)
    assert w.residual_axis == 0
