"""Shared test setup: offline, deterministic, few threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture()
def organism_store(tmp_path: Path) -> Path:
    """A fresh, empty store for one test; the default organism comes from the shipped weights."""
    return tmp_path / "store"


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny random model per supported architecture, built once per test session.

    Tests only read these directories (edits are exported elsewhere), so sharing them is safe.
    """
    from saber.testing.tiny_models import TINY_ARCHS, build_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny(arch, root / arch) for arch in TINY_ARCHS}
