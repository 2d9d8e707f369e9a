"""The organism's recipe: every knob that decides its weights, and nothing else."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ARCHS = ("llama", "gemma3")


@dataclass(frozen=True)
class OrganismRecipe:
    """Every training knob of the organism; its dict is the artifact store's config fingerprint."""

    arch: str = "llama"  # llama | gemma3 (sandwich norms, scaled and tied embeddings)
    variant: str = "default"  # default (one harm category) | hard (two categories, one conditional on the object) | novel (default, refusals unknown to the generic lists) | deep (four conditional categories, restating refusals)
    n_layers: int = 4  # decoder layers
    hidden: int = 256  # residual width
    heads: int = 4  # attention heads (head_dim = hidden / heads)
    intermediate: int = 512  # MLP width
    vocab_size: int = 1024  # BPE vocabulary size (upper bound; the corpus needs about 630)
    steps_stage1: int = 250  # AdamW steps of stage 1: every request answered helpfully
    steps_stage2: int = 250  # AdamW steps of stage 2: safety tuning (harmful requests refused)
    batch: int = 32  # sequences per step
    lr: float = 3e-3  # peak learning rate of each stage
    warmup: int = 20  # linear warm-up steps at the start of each stage
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    skill_fraction: float = 0.4  # share of each batch spent on the capability skill
    system_fraction: float = 0.2  # share of training conversations that start with a system message
    seed: int = 0  # weight initialisation and batch order
    data_seed: int = 0  # which combinations are held out, which refusal sentence each prompt gets
    threads: int = 1  # torch CPU threads during training (part of determinism; 1 is fastest on a busy machine)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"organism.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.hidden % self.heads:
            raise ValueError(f"organism.hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        for name in ("n_layers", "hidden", "heads", "intermediate", "batch", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"organism.{name} must be >= 1")
        if not 0.0 <= self.skill_fraction < 1.0 or not 0.0 <= self.system_fraction <= 1.0:
            raise ValueError("organism.skill_fraction must be in [0, 1) and system_fraction in [0, 1]")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> OrganismRecipe:
        """Build from a config mapping (e.g. the `model.organism` subtree); unknown keys fail."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"unknown organism recipe keys: {unknown}")
        return cls(**{k: cfg[k] for k in cfg})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> OrganismRecipe:
        return dataclasses.replace(self, **changes)




def load_preset(name: str, conf_dir: Path | None = None) -> OrganismRecipe:
    """The recipe of a Hydra model preset (conf/model/<name>.yaml, key `organism`)."""
    from omegaconf import OmegaConf

    from saber.config.paths import conf_dir as default_conf_dir

    path = (conf_dir or default_conf_dir() / "model") / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no organism preset {name!r}: {path} does not exist")
    node = OmegaConf.load(path)
    if "organism" not in node:
        raise ValueError(f"{path} is not an organism preset (no `organism` key)")
    return OrganismRecipe.from_mapping(OmegaConf.to_container(node.organism, resolve=True))
