"""Config schema, validation and the helpers that turn config subtrees into fingerprint inputs."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from saber.config.schema import (
    CollectConfig,
    ConfigError,
    DataConfig,
    EditConfig,
    EntangleConfig,
    EvaluateConfig,
    ExtractConfig,
    IterateConfig,
    KernelConfig,
    ModelConfig,
    OrganismConfig,
    PromptSourceConfig,
    RankConfig,
    SaberConfig,
    SearchConfig,
    register_configs,
)

__all__ = [
    "CollectConfig", "ConfigError", "DataConfig", "EditConfig", "EntangleConfig", "EvaluateConfig",
    "ExtractConfig", "IterateConfig", "KernelConfig", "ModelConfig", "OrganismConfig", 
    "PromptSourceConfig", "RankConfig", "SaberConfig", "SearchConfig", "register_configs", "validate", "as_plain",
]


def validate(cfg: DictConfig | SaberConfig) -> SaberConfig:
    """Merge onto the schema and run every range check; raise ConfigError naming the key."""
    if isinstance(cfg, SaberConfig):
        return cfg
    keys = [k for k in cfg.keys() if k != "hydra"]
    plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)
    assert isinstance(plain, dict)
    merged = OmegaConf.merge(OmegaConf.structured(SaberConfig), plain)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, SaberConfig)
    return obj


def as_plain(node: Any) -> Any:
    """A dataclass or OmegaConf node as plain JSON-able Python (for fingerprints and manifests)."""
    if isinstance(node, (DictConfig,)) or hasattr(node, "__dataclass_fields__"):
        return OmegaConf.to_container(OmegaConf.structured(node) if not isinstance(node, DictConfig) else node,
                                      resolve=True)
    return node
