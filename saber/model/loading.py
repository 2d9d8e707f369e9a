"""Load a model and its tokenizer the way every stage needs them: eval mode, frozen, left padding.

`model.path` is a local Hugging Face directory or a hub id. Multimodal checkpoints (Gemma 3,
Gemma 4) load through `AutoModelForCausalLM`, which maps their configs to the
`...ForConditionalGeneration` wrappers; when a config has no causal-LM mapping we fall back to
`AutoModelForImageTextToText`, so a vision-language checkpoint still loads with its text decoder.
"""

from __future__ import annotations

from collections.abc import Mapping

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger("saber.model")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A hub id is `name` or `owner/name` made of word characters, dots and dashes.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded; the message names the config key to fix."""


def _model_settings(model_cfg: Any) -> Any:
    """A ModelConfig from a ModelConfig or a mapping of some of its keys (the schema's defaults
    fill the rest, and its range checks run)."""
    from saber.config.schema import ModelConfig

    if isinstance(model_cfg, ModelConfig):
        return model_cfg
    if isinstance(model_cfg, Mapping):
        return ModelConfig(**dict(model_cfg))
    raise TypeError(f"model settings must be a ModelConfig or a mapping, got {type(model_cfg).__name__}")


def resolve_device(device: str | None) -> torch.device:
    """`auto` means the first CUDA device when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"config key model.device = {device!r} is not a torch device "
                             "(use auto, cpu, cuda or cuda:N)") from exc


def resolve_dtype(dtype: str | None) -> torch.dtype | str:
    """Map the config's dtype name to a torch dtype; `auto` keeps the checkpoint's own dtype."""
    if dtype in (None, "auto"):
        return "auto"
    if dtype not in _DTYPES:
        raise ModelLoadError(f"config key model.dtype = {dtype!r} is invalid: expected one of "
                             f"{', '.join([*_DTYPES, 'auto'])}")
    return _DTYPES[dtype]


def _check_source(path: Path | str) -> tuple[str, bool]:
    """Return (source string, is_local); a path that is neither a directory nor a hub id fails."""
    text = str(path)
    local = Path(text).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"config key model.path = {text!r} is a directory without "
                                 "config.json; point it at a Hugging Face model directory")
        return str(local), True
    if local.exists():
        raise ModelLoadError(f"config key model.path = {text!r} is a file; point it at a "
                             "Hugging Face model directory or a hub id")
    looks_local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local or not _HUB_ID.match(text):
        raise ModelLoadError(f"config key model.path = {text!r}: no such directory; fix the "
                             "path or set model.path=null to use the built-in model organism")
    return text, False


def check_weight_files(directory: Path | str, key: str = "model.path") -> None:
    """Open every safetensors header of a local model; a truncated or corrupt file is named.

    Reads only the headers and compares the sizes they declare with the files' (milliseconds),
    so a damaged checkpoint fails here with its file name instead of deep inside transformers.
    """
    from saber.tensorfile import read_header

    for f in sorted(Path(directory).glob("*.safetensors")):
        try:
            read_header(f)
        except ValueError as exc:
            raise ModelLoadError(f"config key {key} = {str(directory)!r}: weight file {f.name} is corrupt or "
                                 f"truncated ({exc}); restore or re-download it") from exc


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer with left padding (position -1 is then the last real token) and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of {source!r} has neither a pad nor an eos token; "
                                 "add a pad_token to its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_weights(source: str, kwargs: dict[str, Any]) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        log.info("%s has no causal-LM class; loading it as an image-text-to-text model", source)
        return AutoModelForImageTextToText.from_pretrained(source, **kwargs)


def load_model(model_cfg: Any, path: Path | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model (eval mode, no gradients) and its left-padding tokenizer.

    `model_cfg` carries dtype, device, device_map and trust_remote_code (saber.config.ModelConfig
    or a mapping with those keys); `path` is the resolved model directory or hub id.
    """
    source, is_local = _check_source(path)
    model_cfg = _model_settings(model_cfg)
    trust = bool(model_cfg.trust_remote_code)
    device_map = model_cfg.device_map
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(model_cfg.dtype), "trust_remote_code": trust}
    if device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise ModelLoadError(f"config key model.device_map = {device_map!r} needs the accelerate "
                                 "package; install it, or set model.device_map=null to load onto "
                                 "model.device")
        kwargs["device_map"] = device_map
    if is_local:
        check_weight_files(source)
    try:
        tokenizer = load_tokenizer(source, trust_remote_code=trust)
        model = _load_weights(source, kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc) and not trust:
            raise ModelLoadError(f"config key model.path = {str(path)!r}: the model ships its own Python code, "
                                 "which SABER does not run by default; read that code, then set "
                                 "model.trust_remote_code=true to allow it") from exc
        where = "directory" if is_local else "hub id (needs network access or a local cache)"
        raise ModelLoadError(f"config key model.path = {str(path)!r}: cannot load it as a model "
                             f"{where}: {exc}") from exc
    if device_map is None:
        model.to(resolve_device(model_cfg.device))
    model.eval()
    model.requires_grad_(False)
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_with_adapter(model_cfg: Any, base_dir: Path, adapter: Path) -> tuple[Any, Any]:
    """The base model with a PEFT LoRA adapter merged in (a fresh load, never the shared session)."""
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(f"config key evaluate.adapter = {str(adapter)!r} is not a PEFT adapter directory "
                             "(no adapter_config.json)")
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ModelLoadError("evaluating a LoRA adapter needs the peft package: pip install "
                             "'saber-abliteration[lora]'") from exc
    model, tokenizer = load_model(model_cfg, base_dir)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval(), tokenizer


def input_device(model: torch.nn.Module) -> torch.device:
    """Device that input ids must live on (the embedding's, also under a device_map)."""
    return model.get_input_embeddings().weight.device
