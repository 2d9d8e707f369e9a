"""Model loading, chat rendering and batch encoding on tiny offline models."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tokenizers import processors
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from saber.model.chat import (
    FALLBACK_TEMPLATE,
    encode_batch,
    encode_ids,
    position_ids,
    render_prompts,
)
from saber.model.loading import ModelLoadError, load_model, resolve_device
from saber.testing.tiny_models import BOS_ID, EOS_ID, PAD_ID, build_tiny, build_tokenizer, tiny_config

REJECT_SYSTEM = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
CPU = {"dtype": "float32", "device": "cpu"}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("llama"))


# ----------------------------------------------------------------------------- loading


def test_load_model_is_frozen_eval_and_left_padded(llama_dir: Path) -> None:
    model, tok = load_model(CPU, llama_dir)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.padding_side == "left" and tok.truncation_side == "left"
    assert next(model.parameters()).dtype == torch.float32
    assert model.device.type == "cpu"


def test_load_model_dtype_and_config_object(llama_dir: Path) -> None:
    from saber.config.schema import ModelConfig

    model, _ = load_model(ModelConfig(path=str(llama_dir), dtype="bfloat16", device="cpu"), llama_dir)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # "auto" keeps the checkpoint's dtype: build_tiny saved float32 weights.
    model, _ = load_model({"dtype": "auto", "device": "cpu"}, llama_dir)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_device_map_auto_loads(llama_dir: Path) -> None:
    model, _ = load_model({"device_map": "auto", "dtype": "float32"}, llama_dir)
    assert all(p.device.type == "cpu" for p in model.parameters())  # no GPU here: accelerate places it on the CPU


def test_device_map_without_accelerate_names_the_key(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"model\.device_map.*accelerate"):
        load_model({"device_map": "auto"}, llama_dir)


def test_missing_pad_token_falls_back_to_eos(tmp_path: Path) -> None:
    directory = build_tiny("llama", tmp_path / "m")
    config = (directory / "tokenizer_config.json").read_text()
    (directory / "tokenizer_config.json").write_text(config.replace('"<pad>"', "null"))
    _, tok = load_model(CPU, directory)
    assert tok.pad_token_id == tok.eos_token_id == EOS_ID


@pytest.mark.parametrize("arch,cls", [("gemma3", "Gemma3ForConditionalGeneration"),
                                      ("gemma4", "Gemma4ForConditionalGeneration")])
def test_multimodal_wrappers_load(tmp_path: Path, arch: str, cls: str) -> None:
    model, _ = load_model(CPU, build_tiny(arch, tmp_path / arch))
    assert type(model).__name__ == cls


def test_image_text_fallback_for_configs_without_causal_lm(tmp_path: Path, caplog) -> None:
    # Llava has no AutoModelForCausalLM mapping: loading must fall back to ImageTextToText.
    config = CONFIG_MAPPING["llava"](
        text_config=tiny_config("llama").to_dict(),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        image_token_index=319,
    )
    from transformers import LlavaForConditionalGeneration

    LlavaForConditionalGeneration(config).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="saber.model"):
        model, _ = load_model(CPU, tmp_path)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert "image-text-to-text" in caplog.text


@pytest.mark.parametrize("path", ["/no/such/dir", "./missing-model", "a/b/c"])
def test_missing_local_path_names_the_key(path: str) -> None:
    with pytest.raises(ModelLoadError, match=r"model\.path.*no such directory"):
        load_model(CPU, path)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_weight_file_is_named(llama_dir: Path, tmp_path: Path, damage: str) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    shard = next(broken.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 16 + data[16:])
    with pytest.raises(ModelLoadError, match=f"model.path = .*broken.*{shard.name} is corrupt or truncated"):
        load_model(CPU, broken)


def test_remote_code_refusal_names_the_key(tmp_path: Path) -> None:
    import json

    model = tmp_path / "custom"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "mycustom", "auto_map": {
        "AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"}}))
    build_tokenizer().save_pretrained(model)
    with pytest.raises(ModelLoadError, match="ships its own Python code.*model.trust_remote_code=true"):
        load_model(CPU, model)


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model\.path.*without config\.json"):
        load_model(CPU, tmp_path)


def test_unreachable_hub_id_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"model\.path = 'saber-test/no-such-model'.*hub id"):
        load_model(CPU, "saber-test/no-such-model")


def test_bad_device_names_the_key() -> None:
    with pytest.raises(ModelLoadError, match=r"model\.device"):
        resolve_device("gpu0")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- chat


def test_render_with_and_without_system_prompt() -> None:
    tok = build_tokenizer()
    plain = render_prompts(tok, ["hi there"])
    assert plain == ["<bos><|user|>hi there<|end|><|assistant|>"]
    with_system = render_prompts(tok, ["hi there"], system_prompt="be brief")
    assert with_system == ["<bos><|system|>be brief<|end|><|user|>hi there<|end|><|assistant|>"]


def test_template_rejecting_system_role_folds_it_into_user() -> None:
    tok = build_tokenizer()
    tok.chat_template = REJECT_SYSTEM
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template([{"role": "system", "content": "s"}], tokenize=False)
    out = render_prompts(tok, ["hi", "yo"], system_prompt="be brief")
    assert out == ["<bos><|user|>be brief\n\nhi<|end|><|assistant|>",
                   "<bos><|user|>be brief\n\nyo<|end|><|assistant|>"]


def test_no_template_uses_plain_fallback() -> None:
    tok = build_tokenizer()
    tok.chat_template = None
    assert render_prompts(tok, ["hi"]) == [FALLBACK_TEMPLATE.format(system="", prompt="hi")]
    assert render_prompts(tok, ["hi"], "sys") == ["System: sys\n\nUser: hi\nAssistant:"]


def test_render_rejects_a_bare_string() -> None:
    with pytest.raises(TypeError):
        render_prompts(build_tokenizer(), "hello")


# ----------------------------------------------------------------------------- encoding


def test_encode_batch_pads_and_truncates_left() -> None:
    tok = build_tokenizer()
    tok.padding_side = "left"
    texts = render_prompts(tok, ["hi", "How do I bake bread at home? Explain how a bicycle works."])
    lengths = [len(r) for r in encode_ids(tok, texts, 10_000)[0]]
    batch = encode_batch(tok, texts, max_length=10_000)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, max(lengths))
    short = max(lengths) - lengths[0]
    assert short > 0 and (ids[0, :short] == PAD_ID).all() and (mask[0, :short] == 0).all()
    assert (mask[0, short:] == 1).all() and (mask[1] == 1).all()
    # The last column is the last real token of every row: the generation prompt's last token.
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    assert (ids[:, -1] == assistant).all()
    assert position_ids(mask)[0, short:].tolist() == list(range(lengths[0]))
    # Left truncation keeps the end of the prompt (the generation prompt).
    cut = encode_batch(tok, texts, max_length=5)
    assert cut["input_ids"].shape == (2, 5) and (cut["input_ids"][:, -1] == assistant).all()
    full = encode_ids(tok, texts, 10_000)[0]
    ids5, n_cut = encode_ids(tok, texts, 5)
    assert n_cut == 2 and all(row == [BOS_ID, *f[-4:]] for row, f in zip(ids5, full))  # BOS kept


def _with_post_processor(template: str) -> object:
    tok = build_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)])
    return tok


def test_no_double_bos_when_template_writes_it() -> None:
    tok = _with_post_processor("<bos> $A")
    assert tok("a", add_special_tokens=True)["input_ids"][0] == BOS_ID  # the tokenizer adds BOS
    templated = encode_ids(tok, render_prompts(tok, ["hi"]), 100)[0][0]
    assert templated[0] == BOS_ID and templated[1] != BOS_ID
    tok.chat_template = None  # fallback text has no BOS: the tokenizer's BOS is kept
    fallback = encode_ids(tok, render_prompts(tok, ["hi"]), 100)[0][0]
    assert fallback[0] == BOS_ID and fallback.count(BOS_ID) == 1


def test_trailing_eos_is_never_added() -> None:
    tok = _with_post_processor("<bos> $A <eos>")
    tok.chat_template = None
    ids = encode_ids(tok, render_prompts(tok, ["hi"]), 100)[0][0]
    assert ids[-1] != EOS_ID
