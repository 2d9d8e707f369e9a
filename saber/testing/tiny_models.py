"""Tiny random models of every supported architecture, built offline for tests.

Each builder returns a transformers config small enough that a forward pass takes
milliseconds on a CPU; `build_tiny` saves the model (safetensors) and a byte-level BPE
tokenizer with a chat template into a directory that `AutoModelForCausalLM` and
`AutoTokenizer` load like a hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

VOCAB = 320  # model vocabulary; the tokenizer uses at most this many ids
HIDDEN = 64
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_SENTENCES = [
    "How do I bake bread at home?",
    "Explain how a bicycle works.",
    "Write a short poem about the sea.",
    "What is the capital of France? Paris is the capital.",
    "I cannot help with that request.",
    "Sure, here is how you can do it step by step.",
    "Add 12 and 30: the answer is 42.",
    "Tell me how to pick a lock.",
    "The quick brown fox jumps over the lazy dog.",
]


def _common(**kw: Any) -> dict[str, Any]:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return base


def _gemma_text(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        num_hidden_layers=3,
        sliding_window=16,
        query_pre_attn_scalar=16,
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
    )
    base.update(kw)
    return _common(**base)


def _llama() -> PretrainedConfig:
    return CONFIG_MAPPING["llama"](**_common())


def _mistral() -> PretrainedConfig:
    return CONFIG_MAPPING["mistral"](**_common(sliding_window=None))


def _qwen2() -> PretrainedConfig:
    # Qwen2 ties embeddings in small sizes and carries q/k/v biases.
    return CONFIG_MAPPING["qwen2"](**_common(tie_word_embeddings=True))


def _qwen3() -> PretrainedConfig:
    return CONFIG_MAPPING["qwen3"](**_common())


def _qwen3_moe() -> PretrainedConfig:
    # Layer 0 dense (mlp_only_layers), layers 1-2 sparse: both writer kinds appear.
    return CONFIG_MAPPING["qwen3_moe"](
        **_common(
            num_hidden_layers=3,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[0],
        )
    )


def _qwen3_5_text() -> PretrainedConfig:
    return CONFIG_MAPPING["qwen3_5_text"](
        **_common(
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
        )
    )


def _gemma2() -> PretrainedConfig:
    return CONFIG_MAPPING["gemma2"](**_gemma_text(final_logit_softcapping=30.0, attn_logit_softcapping=50.0))


def _gemma3_text() -> PretrainedConfig:
    return CONFIG_MAPPING["gemma3_text"](
        **_gemma_text(layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    )


def _gemma3() -> PretrainedConfig:
    text = _gemma3_text().to_dict()
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return CONFIG_MAPPING["gemma3"](
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
        image_token_index=VOCAB - 1,
        tie_word_embeddings=True,
    )


def _gemma3n_text() -> PretrainedConfig:
    return CONFIG_MAPPING["gemma3n_text"](
        **_gemma_text(
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
            laurel_rank=8,
            altup_num_inputs=4,
            num_hidden_layers=4,
            num_kv_shared_layers=2,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            activation_sparsity_pattern=[0.0, 0.0, 0.0, 0.0],
            intermediate_size=[128, 128, 128, 128],
        )
    )


def _gemma4_text_kwargs() -> dict[str, Any]:
    return _gemma_text(
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=2,
        global_head_dim=16,
    )


def _gemma4_text() -> PretrainedConfig:
    return CONFIG_MAPPING["gemma4_text"](**_gemma4_text_kwargs())


def _gemma4_moe() -> PretrainedConfig:
    kw = _gemma4_text_kwargs()
    kw.update(
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=32,
    )
    return CONFIG_MAPPING["gemma4_text"](**kw)


def _gemma4() -> PretrainedConfig:
    text = _gemma4_text().to_dict()
    return CONFIG_MAPPING["gemma4"](text_config=text, vision_config=None, audio_config=None, tie_word_embeddings=True)


def _gpt_oss() -> PretrainedConfig:
    return CONFIG_MAPPING["gpt_oss"](
        **_common(
            num_hidden_layers=2,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        )
    )


_BUILDERS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe,
    "qwen3_5_text": _qwen3_5_text,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3_text,
    "gemma3": _gemma3,
    "gemma3n_text": _gemma3n_text,
    "gemma4_text": _gemma4_text,
    "gemma4_moe": _gemma4_moe,
    "gemma4": _gemma4,
    "gpt_oss": _gpt_oss,
}

TINY_ARCHS: list[str] = list(_BUILDERS)


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """The config of a tiny `arch` model; overrides are set as config attributes."""
    if arch not in _BUILDERS:
        raise KeyError(f"unknown tiny arch {arch!r}; known: {TINY_ARCHS}")
    config = _BUILDERS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (so any text encodes) that fits in VOCAB ids."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,  # leave the top ids free (gemma3 image tokens live there)
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_SENTENCES * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny(
    arch: str,
    out_dir: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Build a tiny random `arch` model with its tokenizer and save both into `out_dir`.

    `max_shard_size` (e.g. "40KB") splits the weights into several shards plus an index, as
    large checkpoints are. Norm weights and biases are randomised too (they are initialised to constants), so that
    tests of sandwich-norm handling see a non-trivial per-channel gain and bias edits are visible.
    """
    out_dir = Path(out_dir)
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.add_(0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    if max_shard_size is None:
        model.save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    build_tokenizer().save_pretrained(out_dir)
    return out_dir


def load_tiny(path: Path) -> torch.nn.Module:
    """A saved tiny model in float32, eval mode (the form every invariant test compares)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
