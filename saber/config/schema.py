"""Structured-config schema: every key the pipeline reads, its type and its valid range.

Hydra merges the YAML tree in conf/ onto these dataclasses, so an unknown key or a value of the
wrong type fails at start-up with the key's name. Range checks live in `__post_init__` and run in
`validate()`, which converts the merged config into these objects.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from saber.checks import ConfigError  # noqa: F401 (re-exported)
from saber.checks import check as _check
from saber.checks import fraction as _fraction
from saber.checks import one_of as _one_of
from saber.checks import positive as _positive
from saber.edit.config import EditConfig
from saber.organism.recipe import OrganismRecipe
from saber.stage_names import STAGE_ORDER


def _mutable_mirror(frozen: type, name: str) -> type:
    """A mutable dataclass with the same fields, types and defaults (OmegaConf needs mutability).

    The organism's recipe stays the single source of truth for its knobs; the recipe's own
    __post_init__ checks ranges when the runner builds it.
    """
    hints = typing.get_type_hints(frozen)
    return dataclasses.make_dataclass(
        name, [(f.name, hints[f.name], field(default=f.default)) for f in dataclasses.fields(frozen)])


OrganismConfig = _mutable_mirror(OrganismRecipe, "OrganismConfig")


@dataclass
class ModelConfig:
    name: str = "organism"
    path: Optional[str] = None
    dtype: str = "float32"
    device: str = "auto"
    device_map: Optional[str] = None
    trust_remote_code: bool = False
    system_prompt: Optional[str] = None
    organism: OrganismConfig = field(default_factory=OrganismConfig)  # type: ignore[valid-type]
    organism_source: str = "auto"
    allow_unhealthy: bool = False

    def __post_init__(self) -> None:
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"))
        _one_of("model.organism_source", self.organism_source, ("auto", "shipped", "train"))


@dataclass
class PromptSourceConfig:
    path: Optional[str] = None
    hf: Optional[str] = None
    split: str = "train"
    column: Optional[str] = None
    limit: Optional[int] = None


@dataclass
class DataConfig:
    harmful: PromptSourceConfig = field(default_factory=PromptSourceConfig)
    harmless: PromptSourceConfig = field(default_factory=PromptSourceConfig)
    capability: PromptSourceConfig = field(default_factory=PromptSourceConfig)
    harmful_eval: PromptSourceConfig = field(default_factory=PromptSourceConfig)
    harmless_eval: PromptSourceConfig = field(default_factory=PromptSourceConfig)
    harmful_heldout: Optional[PromptSourceConfig] = None
    harmless_heldout: Optional[PromptSourceConfig] = None
    capability_heldout: Optional[PromptSourceConfig] = None
    xstest: Optional[PromptSourceConfig] = None
    heldout_fraction: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        _check(0.0 < self.heldout_fraction < 1.0, "data.heldout_fraction", self.heldout_fraction,
               "a fraction strictly between 0 and 1")


@dataclass
class CollectConfig:
    positions: int = 1
    response_positions: int = 0
    batch_size: int = 0
    max_batch_size: int = 64
    max_length: int = 256

    def __post_init__(self) -> None:
        _check(self.positions >= 1, "collect.positions", self.positions, "an integer >= 1")
        _check(self.response_positions >= 0, "collect.response_positions", self.response_positions,
               "0 (prompt positions only) or a positive integer")
        _check(self.batch_size >= 0, "collect.batch_size", self.batch_size, "0 (auto) or a positive integer")
        _positive("collect.max_batch_size", self.max_batch_size)
        _positive("collect.max_length", self.max_length)


@dataclass
class ExtractConfig:
    method: str = "svd"
    k: int = 4
    projected: bool = False
    lda_shrinkage: Optional[float] = None
    lda_solver: str = "lsqr"
    positions: Optional[list[int]] = None

    def __post_init__(self) -> None:
        if self.positions is not None:
            _check(len(self.positions) > 0 and all(int(p) != 0 for p in self.positions), "extract.positions",
                   self.positions, "null (every captured position) or a non-empty list of -P..-1 and 1..R")
        _one_of("extract.method", self.method, ("svd", "mean_diff", "lda"))
        _check(self.k >= 1, "extract.k", self.k, "an integer >= 1")
        if self.method in ("mean_diff", "lda"):
            _check(self.k == 1, "extract.k", self.k,
                   f"1 for extract.method={self.method} (a single direction per layer; use extract={self.method})")
        _one_of("extract.lda_solver", self.lda_solver, ("lsqr", "eigen"))
        if self.lda_shrinkage is not None:
            _fraction("extract.lda_shrinkage", self.lda_shrinkage)


@dataclass
class RankConfig:
    strategy: str = "global_topk"
    score: str = "fdr"
    top_k: int = 14
    layer_top_k: int = 3
    threshold: float = 1.0
    depth_min: float = 0.0
    depth_max: float = 1.0
    eps: float = 1e-8
    significance: float = 0.05
    n_permutations: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        _one_of("rank.strategy", self.strategy, ("global_topk", "layer_topk", "threshold", "all"))
        _check(0.0 < self.significance <= 1.0, "rank.significance", self.significance, "a level in (0, 1] (1 = off)")
        _check(self.n_permutations >= 0, "rank.n_permutations", self.n_permutations, "an integer >= 0")
        _one_of("rank.score", self.score, ("fdr", "fdr_purity"))
        _check(self.top_k >= 1, "rank.top_k", self.top_k, "an integer >= 1")
        _check(self.layer_top_k >= 1, "rank.layer_top_k", self.layer_top_k, "an integer >= 1")
        _fraction("rank.depth_min", self.depth_min)
        _fraction("rank.depth_max", self.depth_max)
        _check(self.depth_min < self.depth_max, "rank.depth_min", self.depth_min, "less than rank.depth_max")
        _positive("rank.eps", self.eps)


@dataclass
class KernelConfig:
    peak_position: float = 0.6
    peak_weight: float = 1.0
    min_weight: float = 0.0
    distance: float = 0.4

    def __post_init__(self) -> None:
        _fraction("entangle.kernel.peak_position", self.peak_position)
        _check(self.peak_weight >= 0, "entangle.kernel.peak_weight", self.peak_weight, "a number >= 0")
        _check(self.min_weight >= 0, "entangle.kernel.min_weight", self.min_weight, "a number >= 0")
        _fraction("entangle.kernel.distance", self.distance, open_low=True)


@dataclass
class EntangleConfig:
    m: int = 10
    tau: Optional[float] = None
    tau_quantile: float = 0.95
    alpha_base: float = 0.825
    alpha_entangled: float = 0.03
    mode: str = "measured"
    ramp_low: float = 0.3
    ramp_high: float = 0.7
    kernel: KernelConfig = field(default_factory=KernelConfig)
    cost_weight: float = 1.0
    measure_prompts: int = 32
    measure_tokens: int = 8
    calibrate: bool = True
    calibrate_steps: int = 6
    max_drift: Optional[float] = None
    calibrate_refusal: str = "generate"
    join_min_prompts: int = 2

    def __post_init__(self) -> None:
        _check(self.m >= 1, "entangle.m", self.m, "an integer >= 1")
        _check(self.join_min_prompts >= 0, "entangle.join_min_prompts", self.join_min_prompts, "an integer >= 0")
        if self.tau is not None:
            _fraction("entangle.tau", self.tau)
        _fraction("entangle.tau_quantile", self.tau_quantile)
        _check(0.0 <= self.alpha_base <= 2.0, "entangle.alpha_base", self.alpha_base, "a number in [0, 2]")
        _check(0.0 <= self.alpha_entangled <= 2.0, "entangle.alpha_entangled", self.alpha_entangled,
               "a number in [0, 2]")
        _one_of("entangle.mode", self.mode, ("discrete", "ramp", "split", "kernel", "uniform", "measured"))
        _check(self.cost_weight >= 0.0, "entangle.cost_weight", self.cost_weight, "a number >= 0")
        _check(self.measure_prompts >= 1, "entangle.measure_prompts", self.measure_prompts, "an integer >= 1")
        _check(self.measure_tokens >= 1, "entangle.measure_tokens", self.measure_tokens, "an integer >= 1")
        _check(self.calibrate_steps >= 1, "entangle.calibrate_steps", self.calibrate_steps, "an integer >= 1")
        _one_of("entangle.calibrate_refusal", self.calibrate_refusal, ("generate", "opening"))
        _check(self.max_drift is None or self.max_drift > 0, "entangle.max_drift", self.max_drift,
               "null or a positive number (nats per token)")
        _fraction("entangle.ramp_low", self.ramp_low)
        _fraction("entangle.ramp_high", self.ramp_high)
        _check(self.ramp_low < self.ramp_high, "entangle.ramp_low", self.ramp_low, "less than entangle.ramp_high")


@dataclass
class SignatureConfig:
    max_ngram: int = 4
    min_support: float = 0.05
    min_ratio: float = 10.0
    window: int = 12

    def __post_init__(self) -> None:
        _check(self.max_ngram >= 3, "evaluate.auto.max_ngram", self.max_ngram, "an integer >= 3 (phrases have 3 or more words)")
        _positive("evaluate.auto.window", self.window)
        _check(0.0 < self.min_support <= 1.0, "evaluate.auto.min_support", self.min_support, "a share in (0, 1]")
        _check(self.min_ratio >= 1.0, "evaluate.auto.min_ratio", self.min_ratio, "a ratio >= 1")


@dataclass
class EvaluateConfig:
    scorer: str = "auto"
    markers: Optional[list[str]] = None
    extra_markers: list[str] = field(default_factory=list)
    auto: SignatureConfig = field(default_factory=SignatureConfig)
    signature_prompts: int = 64
    prefixes: Optional[list[str]] = None
    judge_path: Optional[str] = None
    judge_refusal_labels: list[str] = field(default_factory=lambda: ["refusal", "LABEL_1"])
    judge_pair: bool = False
    max_new_tokens: int = 32
    kl_tokens: int = 32
    kl_topk: int = 1024
    n_harmful: int = 100
    n_harmless: int = 100
    n_xstest: int = 50
    n_capability: int = 100
    n_gsm8k: int = 50
    reference_text: Optional[str] = None
    ppl_window: int = 256
    batch_size: int = 16
    generate_batch_size: int = 64
    max_prompt_tokens: int = 1024
    mc_paths: list[str] = field(default_factory=lambda: ["bundled://capability_mc", "bundled://arc"])
    mc_norm: str = "mean"
    gsm8k_path: Optional[str] = "bundled://gsm8k"
    gsm8k_max_new_tokens: int = 256
    skill_path: Optional[str] = "organism://skill_eval.jsonl"
    skill_max_new_tokens: int = 8
    residual_proxy: bool = True
    plots: bool = True
    probe_metrics: bool = True
    adapter: Optional[str] = None

    def __post_init__(self) -> None:
        _one_of("evaluate.scorer", self.scorer, ("auto", "keywords", "prefix", "judge"))
        _one_of("evaluate.mc_norm", self.mc_norm, ("mean", "sum"))
        for key in ("max_new_tokens", "kl_tokens", "batch_size", "generate_batch_size", "max_prompt_tokens",
                    "gsm8k_max_new_tokens", "skill_max_new_tokens"):
            _positive(f"evaluate.{key}", getattr(self, key))
        _check(self.ppl_window >= 2, "evaluate.ppl_window", self.ppl_window, "an integer >= 2")
        for key in ("n_harmful", "n_harmless", "n_xstest", "n_capability", "n_gsm8k", "kl_topk", "signature_prompts"):
            _check(getattr(self, key) >= 0, f"evaluate.{key}", getattr(self, key), "an integer >= 0")
        if self.scorer == "judge":
            _check(bool(self.judge_path), "evaluate.judge_path", self.judge_path,
                   "a local sequence-classification model directory when evaluate.scorer=judge")


@dataclass
class IterateConfig:
    max_iterations: int = 3
    alpha_decay: float = 0.7
    target_refusal: float = 0.0
    stability_cos: float = 0.98
    stability_fdr: float = 0.1
    escalate_positions: int = 8
    escalate_above: float = 0.1
    refused_only_min: int = 8

    def __post_init__(self) -> None:
        _check(self.refused_only_min >= 0, "iterate.refused_only_min", self.refused_only_min,
               "an integer >= 0 (0 = every later iteration fits on all harmful fit prompts)")
        _check(self.max_iterations >= 1, "iterate.max_iterations", self.max_iterations, "an integer >= 1")
        _check(self.escalate_positions >= 0, "iterate.escalate_positions", self.escalate_positions,
               "an integer >= 0 (0 = never collect answer positions on its own)")
        _fraction("iterate.escalate_above", self.escalate_above)
        _fraction("iterate.stability_fdr", self.stability_fdr)
        _fraction("iterate.alpha_decay", self.alpha_decay, open_low=True)
        _fraction("iterate.target_refusal", self.target_refusal)
        _fraction("iterate.stability_cos", self.stability_cos)


@dataclass
class SearchConfig:
    n_trials: int = 16
    study: str = "saber"
    storage: Optional[str] = None
    sampler: str = "tpe"
    seed: int = 0
    objectives: list[str] = field(default_factory=lambda: ["probe_refusal_rate", "probe_kl_tf_mean"])
    space: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.n_trials >= 1, "search.n_trials", self.n_trials, "an integer >= 1")
        _one_of("search.sampler", self.sampler, ("tpe", "nsga2", "random"))
        _check(len(self.objectives) >= 1, "search.objectives", self.objectives, "at least one metric name")


@dataclass
class SaberConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    entangle: EntangleConfig = field(default_factory=EntangleConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    method: str = "saber"
    stages: list[str] = field(default_factory=lambda: list(STAGE_ORDER))
    store_root: str = "outputs/store"
    force: bool = False
    iteration: int = 0
    seed: int = 0
    debug: bool = False

    def __post_init__(self) -> None:
        _check(not (self.edit.method == "lsq" and self.edit.lsq.protect_weight is None and not self.entangle.calibrate),
               "edit.lsq.protect_weight", None,
               "a number when entangle.calibrate=false (only the calibration can choose it)")


def register_configs() -> None:
    """Register the schema so conf/config.yaml can name it in its defaults list."""
    ConfigStore.instance().store(name="saber_schema", node=SaberConfig)
