"""Helpers shared by the tests and the benchmarks: configs composed as the command line does,
and tiny random Hugging Face models built offline (`saber.testing.tiny_models`)."""

from __future__ import annotations

from saber.config import SaberConfig


def compose_config(*overrides: str) -> SaberConfig:
    """The validated config that `python -m saber.run <overrides>` would see."""
    from hydra import compose, initialize_config_dir

    from saber.config import register_configs, validate
    from saber.config.paths import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(compose("config", overrides=list(overrides)))
