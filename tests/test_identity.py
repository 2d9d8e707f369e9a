"""Model identity notices replaced weights, and survives a plain copy of the directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from saber.model import identity
from saber.model.identity import model_identity


def make_model(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_same_size_rewrite_changes_identity_and_a_copy_keeps_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = {"a": torch.randn(64, 64), "b": torch.randn(128)}
    src = make_model(tmp_path / "src", weights)
    before = model_identity(str(src))
    copy = tmp_path / "copy" / "src"
    shutil.copytree(src, copy)  # new inode and mtime, same bytes
    assert model_identity(str(copy)) == before
    edited = {"a": weights["a"] * 0.5, "b": weights["b"]}
    save_file(edited, str(src / "model.safetensors"))  # same names, shapes and size
    assert (src / "model.safetensors").stat().st_size == (copy / "model.safetensors").stat().st_size
    assert model_identity(str(src)) != before


def test_large_files_are_sampled_and_an_edited_region_is_seen(tmp_path: Path, monkeypatch) -> None:
    # Shrink the sample plan so a 1 MiB file counts as large: 16 samples of 4 KiB.
    monkeypatch.setattr(identity, "SAMPLES_PER_FILE", 16)
    monkeypatch.setattr(identity, "SAMPLE_BYTES", 4096)
    src = make_model(tmp_path / "m", {"w": torch.zeros(512, 512)})  # 1 MiB of float32
    before = model_identity(str(src))
    data = bytearray((src / "model.safetensors").read_bytes())
    # An edit that rewrites a whole tensor region (here the last 10% of the file) is always seen.
    data[-len(data) // 10:] = bytes([1]) * (len(data) // 10)
    (src / "model.safetensors").write_bytes(bytes(data))
    assert model_identity(str(src)) != before
