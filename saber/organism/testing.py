"""Helpers for tests elsewhere in the project that need the default organism."""

from __future__ import annotations

from pathlib import Path

from saber.organism.build import build_organism
from saber.organism.recipe import load_preset


def default_organism(tmp_root: Path | str) -> Path:
    """Build (or load from the store under tmp_root) the default organism; returns its directory."""
    return build_organism(load_preset("organism"), tmp_root)
