"""Shared test setup: offline, deterministic, few threads."""

from __future__ import annotations

import os
import shutil
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


@pytest.fixture(scope="session")
def organism_session_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the default organism, trained once per test session (about 3 minutes)."""
    from saber.organism.testing import default_organism

    root = tmp_path_factory.mktemp("organism-store")
    torch.set_num_threads(2)
    default_organism(root)
    return root


@pytest.fixture()
def organism_store(organism_session_store: Path, tmp_path: Path) -> Path:
    """A fresh store for one test that already holds the trained default organism."""
    root = tmp_path / "store"
    shutil.copytree(organism_session_store / "organism", root / "organism")
    return root


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny random model per supported architecture, built once per test session.

    Tests only read these directories (edits are exported elsewhere), so sharing them is safe.
    """
    from tiny_models import TINY_ARCHS, build_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny(arch, root / arch) for arch in TINY_ARCHS}
