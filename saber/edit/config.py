"""Edit configuration: the one class behind the `edit` config group and the library's edit calls."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from saber.checks import check, one_of

SCOPES = ("all", "same", "from_source")
TIED_MODES = ("untie", "refuse")
EXPORT_FORMATS = ("full", "lora", "both")
METHODS = ("auto", "projection", "lsq")
# laurel_out: Gemma 3n's LAuReL branch; per_layer_embed_out: Gemma 3n / 4 per-layer-input projection.
# Every role that writes into the residual stream is edited by default.
KNOWN_ROLES = ("attn_out", "linear_attn_out", "mlp_down", "expert_down", "fused_expert_down",
               "laurel_out", "per_layer_embed_out")
DEFAULT_ROLES = KNOWN_ROLES


@dataclass
class LsqConfig:
    """Settings of the least-squares edit (saber.edit.lsq; derivation in docs/EDIT.md).

    null_eps: the update is confined to input directions along which the protected inputs' second
        moment is <= null_eps x its largest eigenvalue; 1 keeps every direction.
    ridge: lambda = ridge x trace(K_h) / m, the Tikhonov term that bounds the update where the
        harmful inputs barely differ from the protected ones.
    protect_weight: mu, the weight of the change on protected inputs; null: calibrated on the
        held-out probes (the largest mu that still reaches the refusal target, divided by
        protect_margin: the last mu that reaches the target on the probes sits at the edge, and
        the edge does not carry over to new prompts; the edge itself when the divided mu refuses
        more on the probes).
    protect_prompts: protected prompts per kind (harmless, capability fit prompts), each with the
        model's own answer.
    focus: weight each harmful token by ||Q^T W x||^2, the writer's output along the plan's
        directions there, so the update targets the tokens that carry them (false: every token
        of the harmful prompts and answers counts the same).
    max_memory_gib: with edit.method=auto, lsq is used when its writer moments and weight copies
        (float64) fit in this many GiB, else the projection.
    compare_projection: with edit.method=auto and mu calibrated, also calibrate the projection of
        the same directions and keep it when it reaches the target with less drift on the held-out
        harmless and capability probes (saber.measured.compare_projection).
    """

    null_eps: float = 1.0
    ridge: float = 1e-3
    protect_weight: Optional[float] = None
    protect_margin: float = 4.0
    protect_prompts: int = 128
    max_memory_gib: float = 8.0
    focus: bool = False
    compare_projection: bool = True

    def __post_init__(self) -> None:
        check(0.0 < self.null_eps <= 1.0, "edit.lsq.null_eps", self.null_eps, "a number in (0, 1]")
        check(self.protect_weight is None or self.protect_weight >= 0.0, "edit.lsq.protect_weight",
              self.protect_weight, "null (calibrated) or a number >= 0")
        check(self.ridge > 0.0, "edit.lsq.ridge", self.ridge, "a positive number")
        check(self.protect_margin >= 1.0, "edit.lsq.protect_margin", self.protect_margin, "a factor >= 1")
        check(self.max_memory_gib > 0, "edit.lsq.max_memory_gib", self.max_memory_gib, "a positive number of GiB")
        check(self.protect_prompts >= 1, "edit.lsq.protect_prompts", self.protect_prompts, "an integer >= 1")


@dataclass
class EditConfig:
    """How an edit plan is turned into weight changes, and where the edited model goes.

    The Hydra schema uses this class for the `edit` group, so its defaults are the only ones.
    scope: which layers' writers a direction found at layer s is removed from: "all" layers
        (Arditi-style), only the "same" layer, or layers <= s ("from_source").
    roles: writer roles to edit (see saber.model.adapters for the list per architecture).
    embedding: also edit the token embedding (treated as layer -1 for `scope`).
    tied_embeddings: when the embedding is tied to the output head: "untie" (give the head its
        own unchanged copy) or "refuse" (raise).
    norm_preserving: keep every residual-space column's norm.
    sandwich_correction: for writers followed by a per-channel norm gain g, remove
        normalise(g * v) instead of v so that v is removed from what reaches the residual.
    dtype_compute: arithmetic precision of the edit ("float32" or "float64").
    method: "projection" (remove the directions from every output), "lsq" (remove them where the
        writer's inputs look like the harmful prompts' and keep the protected prompts' outputs;
        saber.edit.lsq) or "auto": lsq where it can run (saber.edit.lsq.resolve_method), else
        the projection.
    export, export_format, overwrite, out_dir: what the edit stage writes (see conf/edit/default.yaml).
    """

    scope: str = "all"
    roles: list[str] = field(default_factory=lambda: list(DEFAULT_ROLES))
    embedding: bool = False
    tied_embeddings: str = "refuse"
    norm_preserving: bool = False
    sandwich_correction: bool = True
    dtype_compute: str = "float32"
    method: str = "auto"
    lsq: LsqConfig = field(default_factory=LsqConfig)
    export: bool = True
    export_format: str = "full"
    overwrite: bool = False
    out_dir: Optional[str] = None

    def __post_init__(self) -> None:
        one_of("edit.scope", self.scope, SCOPES)
        one_of("edit.tied_embeddings", self.tied_embeddings, TIED_MODES)
        one_of("edit.dtype_compute", self.dtype_compute, ("float32", "float64"))
        one_of("edit.export_format", self.export_format, EXPORT_FORMATS)
        for role in self.roles:
            one_of("edit.roles", role, KNOWN_ROLES)
        one_of("edit.method", self.method, METHODS)
        check(not (self.method == "lsq" and self.norm_preserving), "edit.norm_preserving", self.norm_preserving,
              "false with edit.method=lsq (the least-squares update keeps protected outputs; rescaling columns "
              "would change them)")

    def targets_layer(self, source_layer: int, target_layer: int) -> bool:
        """Whether a direction found at `source_layer` is removed from `target_layer`'s writers."""
        if self.scope == "all":
            return True
        if self.scope == "same":
            return target_layer == source_layer
        return target_layer <= source_layer


def as_edit_config(cfg: Any) -> EditConfig:
    """An EditConfig from an EditConfig, a mapping, or any object with the same attributes
    (e.g. the Hydra `edit` node)."""
    if isinstance(cfg, EditConfig):
        return cfg
    names = [f.name for f in fields(EditConfig)]
    if isinstance(cfg, Mapping):
        values = {n: cfg[n] for n in names if n in cfg}
    else:
        values = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
    if "roles" in values:
        values["roles"] = [str(r) for r in values["roles"]]
    if "lsq" in values and not isinstance(values["lsq"], LsqConfig):
        values["lsq"] = LsqConfig(**dict(values["lsq"]))
    return EditConfig(**values)
