"""The stage graph: which artifacts each stage reads, and how a stage's fingerprint is formed.

A stage is a `StageSpec` (defined in `stages/<name>.py`, found through the `saber.stages` entry
points): a name, a schema version, the config
subtrees it reads, the stages it reads from, and a `build(ctx, out_dir)` function. The pipeline
resolves upstream artifacts through the store, so a rerun with unchanged inputs does no model
work, and a change to one knob reruns only the stages downstream of it.

Iterations: iteration i > 0 collects activations on the model edited by the plans of
iterations 0..i-1, so collect[i] reads entangle[0..i-1]; edit and evaluate read every plan.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from saber.config import SaberConfig, as_plain
from saber.model.identity import model_identity
from saber.stage_names import AUXILIARY, STAGE_ORDER
from saber.store import Artifact, ArtifactStore

log = logging.getLogger("saber.pipeline")


@dataclass(frozen=True)
class StageSpec:
    """What the runner needs to know about one stage."""

    name: str
    schema_version: int
    config_keys: tuple[str, ...]
    # stages read, or a function of the config giving them; "name@k" reads that stage at iteration k
    upstream: tuple[str, ...] | Callable[[SaberConfig], tuple[str, ...]]
    build: Callable[["StageContext", Path], Optional[Mapping[str, Any]]]
    reads_plans: bool = False
    base_model_only: bool = False  # computed once per run on the unedited model: always read at iteration 0
    part_of: Optional[str] = None  # an auxiliary stage built for this stage, and forced with it
    exclude_keys: tuple[str, ...] = ()  # dotted keys inside config_keys that do not change the artifact


class MissingUpstreamError(RuntimeError):
    """A stage run alone found no artifact of a stage it reads."""


@dataclass
class StageContext:
    """Everything a stage's build function may read: config, upstream artifacts, the model."""

    cfg: SaberConfig
    pipeline: "Pipeline"
    iteration: int
    upstream: dict[str, Artifact]
    plans: list[Artifact] = field(default_factory=list)

    def model_dir(self) -> Path:
        return self.pipeline.model_dir()

    def prompt_roots(self) -> dict[str, Path]:
        return self.pipeline.prompt_roots()

    def load_model(self, *, with_plans: bool = True) -> tuple[Any, Any]:
        """Base model and tokenizer, with this iteration's earlier plans applied in memory."""
        return self.pipeline.load_model(self.plans if with_plans else [])


STAGE_ENTRY_POINTS = "saber.stages"  # entry-point group (pyproject.toml) that names each stage's spec


class StageRegistry(dict):
    """Stage name -> StageSpec, filled on first use from the `saber.stages` entry points.

    The stage shells (`stages/<name>.py`) define the specs and pyproject.toml names them, so the
    library finds them without importing the shells' package; a plugin package can add stages
    the same way. Iterating yields the run order (saber.stage_names).
    """

    def __missing__(self, name: str) -> StageSpec:
        from importlib.metadata import entry_points

        known = STAGE_ORDER + AUXILIARY
        if name not in known:
            raise KeyError(f"unknown stage '{name}'; stages are: {', '.join(known)}")
        found = {ep.name: ep for ep in entry_points(group=STAGE_ENTRY_POINTS)}
        if name not in found:
            raise KeyError(f"stage '{name}' has no '{STAGE_ENTRY_POINTS}' entry point: the package metadata is "
                           "stale or missing; reinstall it (pip install -e . in a checkout) and remove any old "
                           "saber_abliteration.egg-info in the working directory, which shadows it")
        spec = found[name].load()
        self[name] = spec
        return spec

    def __iter__(self):  # type: ignore[override]
        return iter(STAGE_ORDER)

    def __contains__(self, name: object) -> bool:
        return name in STAGE_ORDER + AUXILIARY


STAGES: dict[str, StageSpec] = StageRegistry()


def _stage_registry() -> dict[str, StageSpec]:
    return STAGES


@dataclass
class ModelSession:
    """One loaded base model shared by every stage, iteration and search trial of a process.

    Plans are applied in place and reverted exactly before the next set is applied, so the
    weights are loaded once.
    """

    model: Any = None
    tokenizer: Any = None
    handles: list[Any] = field(default_factory=list)

    def revert(self) -> None:
        for handle in reversed(self.handles):
            handle.revert()
        self.handles = []


class Pipeline:
    """Resolves stages through the artifact store, building what is missing."""

    def __init__(self, cfg: SaberConfig, store: Optional[ArtifactStore] = None,
                 session: Optional[ModelSession] = None) -> None:
        self.cfg = cfg
        self.store = store or ArtifactStore(cfg.store_root)
        self._model_dir: Optional[Path] = None
        self._organism_dir: Optional[Path] = None
        self._identity: Optional[str] = None
        self.session = session or ModelSession()
        self._resolved: dict[tuple[str, int], Artifact] = {}
        self.force_stages: set[str] = set(STAGE_ORDER + AUXILIARY) if cfg.force else set()

    # model -----------------------------------------------------------------------------------
    def model_dir(self) -> Path:
        """Directory of the base model; trains (or loads from cache) the organism when path is null."""
        if self._model_dir is None:
            if self.cfg.model.path is None:
                from saber.organism import OrganismRecipe, build_organism

                recipe = OrganismRecipe.from_mapping(as_plain(self.cfg.model.organism))
                self._organism_dir = Path(build_organism(
                    recipe, self.cfg.store_root, source=self.cfg.model.organism_source,
                    allow_unhealthy=self.cfg.model.allow_unhealthy))
                self._model_dir = self._organism_dir / "model"
            else:
                self._model_dir = Path(self.cfg.model.path)
        return self._model_dir

    def prompt_roots(self) -> dict[str, Path]:
        self.model_dir()
        roots = {}
        if self._organism_dir is not None:
            roots["organism"] = self._organism_dir / "prompts"
        return roots

    def model_identity(self) -> str:
        if self._identity is None:
            path = self.model_dir()
            if self._organism_dir is not None:
                from saber.organism.build import organism_identity

                self._identity = organism_identity(self._organism_dir)
            else:
                self._identity = model_identity(str(path))
        return self._identity

    def load_model(self, plans: list[Artifact]) -> tuple[Any, Any]:
        """Load the base model once per process; apply plans in memory for later iterations.

        The cached model is always returned to base weights before new plans are applied, so
        iterations and sweeps share one load.
        """
        from saber.edit import apply_plan, load_plan
        from saber.model.loading import load_model

        session = self.session
        if session.model is None:
            session.model, session.tokenizer = load_model(self.cfg.model, self.model_dir())
        session.revert()
        for plan_art in plans:
            session.handles.append(apply_plan(session.model, load_plan(plan_art.path), self.cfg.edit))
        return session.model, session.tokenizer

    def refusal_scorer(self) -> Any:
        """The evaluation's refusal scorer; `auto` reads the signature learned on the base model."""
        from saber.evaluate import make_scorer
        from saber.evaluate.settings import run_settings
        from saber.evaluate.signature import SIGNATURE_FILE, RefusalSignature

        signature = None
        if self.cfg.evaluate.scorer == "auto":
            art = self.ensure("signature", 0)
            if not art.file(SIGNATURE_FILE).is_file():
                raise RuntimeError(f"signature artifact {art.path} holds no {SIGNATURE_FILE}; rebuild it with "
                                   "force=true")
            signature = RefusalSignature.load(art.path)
        return make_scorer(run_settings(self.cfg), signature)

    def release_model(self) -> None:
        """Return the shared model to its base weights (the model stays loaded for reuse)."""
        self.session.revert()

    # stages ----------------------------------------------------------------------------------
    def _fingerprint_config(self, spec: StageSpec, iteration: int) -> dict[str, Any]:
        config = {key: as_plain(_get_path(self.cfg, key)) for key in spec.config_keys}
        for dotted in spec.exclude_keys:
            _drop(config, dotted)
        config["iteration"] = iteration
        digests = self._file_digests({k: v for k, v in config.items() if k != "model"})
        if digests:
            config["file_digests"] = digests
        return config

    def _file_digests(self, node: Any, where: str = "") -> dict[str, str]:
        """sha256 of every prompt or probe file the config names, so editing one in place reruns.

        Keys named `path`, `*_path` or `*_paths` with a value that resolves to a file count.
        """
        from saber.prompts import resolve_path
        from saber.store import sha256_file

        found: dict[str, str] = {}
        if isinstance(node, dict):
            for key, value in node.items():
                name = f"{where}.{key}" if where else str(key)
                is_path_key = key == "path" or str(key).endswith(("_path", "_paths"))
                values = value if isinstance(value, list) else [value]
                if is_path_key and all(isinstance(v, str) for v in values):
                    for v in values:
                        try:
                            found[f"{name}:{v}"] = sha256_file(resolve_path(v, name, self.prompt_roots()))
                        except (OSError, ValueError):
                            pass  # not a local file (a hub dataset, or reported by the stage itself)
                else:
                    found.update(self._file_digests(value, name))
        return found

    def command_for(self, stage: str) -> str:
        return f"python -m stages.{stage} <same overrides>"

    def ensure(self, stage: str, iteration: int = 0, *, build_missing: bool = True) -> Artifact:
        """Return the published artifact of `stage`, building it (and its upstreams) if needed.

        With build_missing=False (a stage run alone) a missing upstream artifact is an error
        that names the command producing it.
        """
        if (stage, iteration) in self._resolved:
            return self._resolved[(stage, iteration)]
        spec = _stage_registry()[stage]
        upstream, plans, fingerprints = self._inputs(spec, iteration, build_missing)
        ctx = StageContext(self.cfg, self, iteration, upstream, plans)
        artifact = self.store.get_or_build(
            stage, spec.schema_version, self._fingerprint_config(spec, iteration), fingerprints,
            self.model_identity(), lambda out: spec.build(ctx, out),
            force=stage in self.force_stages or spec.part_of in self.force_stages, command=self.command_for(stage),
        )
        self._resolved[(stage, iteration)] = artifact
        return artifact

    def _inputs(self, spec: StageSpec, iteration: int,
                build_missing: bool) -> tuple[dict[str, Artifact], list[Artifact], dict[str, str]]:
        """Upstream artifacts, the plans of earlier iterations, and their fingerprints."""
        upstream = {}
        for entry in (spec.upstream(self.cfg) if callable(spec.upstream) else spec.upstream):
            name, _, at = entry.partition("@")
            upstream[name] = self._upstream(name, int(at) if at else iteration, build_missing)
        plans: list[Artifact] = []
        if spec.reads_plans:
            # collect[i] probes the model edited by plans 0..i-1; edit and evaluate use plans 0..i
            last = iteration - 1 if spec.name == "collect" else iteration
            plans = [self._upstream("entangle", j, build_missing) for j in range(last + 1)]
        fingerprints = {name: art.fingerprint for name, art in upstream.items()}
        fingerprints.update({f"plan{j}": plan.fingerprint for j, plan in enumerate(plans)})
        return upstream, plans, fingerprints

    def _upstream(self, name: str, iteration: int, build_missing: bool) -> Artifact:
        if _stage_registry()[name].base_model_only:
            iteration = 0
        if build_missing:
            return self.ensure(name, iteration)
        return self._load_only(name, iteration)

    def _load_only(self, name: str, iteration: int) -> Artifact:
        """Find an upstream artifact without building it (used when a stage runs alone)."""
        from saber.store import fingerprint

        spec = _stage_registry()[name]
        _, _, fingerprints = self._inputs(spec, iteration, build_missing=False)
        fp = fingerprint(name, spec.schema_version, self._fingerprint_config(spec, iteration),
                         fingerprints, self.model_identity())
        art = self.store.load(name, fp, schema_version=spec.schema_version)
        if art is None:
            raise MissingUpstreamError(
                f"stage '{name}' has no artifact for this config (fingerprint {fp[:12]}) in "
                f"{self.store.root}; produce it first with: make {name} (or python -m stages.{name} "
                f"with the same overrides), or run the whole chain with python -m saber.run"
            )
        return art


def _drop(config: dict[str, Any], dotted: str) -> None:
    """Remove `dotted` (a key inside one of the fingerprinted subtrees) from `config`."""
    owner = max((k for k in config if dotted.startswith(k + ".")), key=len, default=None)
    if owner is None:
        raise KeyError(f"exclude_keys entry '{dotted}' lies inside none of the stage's config_keys")
    *path, leaf = dotted[len(owner) + 1:].split(".")
    node = config[owner]
    for part in path:
        node = node[part]
    node.pop(leaf)


def _get_path(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
