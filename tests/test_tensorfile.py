"""Artifact bytes are deterministic: the same tensors and metadata give the same file in any process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
WRITER = """
import sys, torch
from saber.tensorfile import save_tensors
meta = {f"key{i}": str(i) for i in range(8)}  # eight keys: 8! orders for a hash map to pick from
save_tensors({"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}, sys.argv[1], meta)
"""


def test_same_content_gives_byte_identical_files_across_processes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    digests = set()
    for i in range(4):  # separate processes: the writer's hash-map seed differs between them
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", WRITER, str(path)], check=True, env=env)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    loaded = load_file(str(tmp_path / "0.safetensors"))
    assert torch.equal(loaded["b"], torch.arange(6.0).reshape(2, 3)) and loaded["a"].dtype == torch.float16
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert f.metadata() == {f"key{i}": str(i) for i in range(8)}
