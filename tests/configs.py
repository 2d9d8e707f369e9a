"""Compose configs in tests exactly as the command line does."""

from __future__ import annotations

from saber.config import SaberConfig
from saber.config.paths import CONF_DIR


def compose_config(*overrides: str) -> SaberConfig:
    """The validated config that `python -m saber.run <overrides>` would see."""
    from hydra import compose, initialize_config_dir

    from saber.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(compose("config", overrides=list(overrides)))
