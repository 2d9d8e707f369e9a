"""Search mode: multi-objective Optuna over the method's knobs, one model kept in memory.

`python -m saber.search [overrides]` runs trials until the study holds `search.n_trials`
finished ones. Every trial goes through the same stages and artifact store as `saber.run`
(collect is computed once and reused), with edits applied in memory to the one loaded model and
reverted after the trial. The study lives in an Optuna journal file, so a killed search resumes
without repeating finished trials, and several workers (processes or machines sharing the file)
can work on one study.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Optional

import hydra
import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from saber.config import SaberConfig, register_configs, validate
from saber.config.paths import CONF_DIR
from saber.entangle import unused_strength_knobs
from saber.pipeline import ModelSession, Pipeline, configure_logging
from saber.run import objectives, run_pipeline

log = logging.getLogger("saber.search")
register_configs()


def parse_space(space: dict[str, str]) -> dict[str, tuple[str, Any]]:
    """Parse "int:low:high" / "float:low:high" / "cat:a,b" specs, naming the bad key on error."""
    parsed: dict[str, tuple[str, Any]] = {}
    for key, spec in space.items():
        kind, _, rest = str(spec).partition(":")
        try:
            if kind in ("int", "float"):
                low, high = rest.split(":")
                cast = int if kind == "int" else float
                parsed[key] = (kind, (cast(low), cast(high)))
            elif kind == "cat":
                parsed[key] = (kind, [_scalar(v) for v in rest.split(",")])
            else:
                raise ValueError(kind)
        except ValueError:
            raise ValueError(f"config key 'search.space.{key}' = {spec!r} is invalid: expected "
                             "'int:low:high', 'float:low:high' or 'cat:a,b,c'") from None
    return parsed


def _scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def suggest(trial: optuna.Trial, space: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, (kind, arg) in space.items():
        if kind == "int":
            values[key] = trial.suggest_int(key, *arg)
        elif kind == "float":
            values[key] = trial.suggest_float(key, *arg)
        else:
            values[key] = trial.suggest_categorical(key, arg)
    return values


def trial_config(base: SaberConfig, values: dict[str, Any]) -> SaberConfig:
    """The base config with the trial's knob values set (validated like any other config)."""
    node = OmegaConf.structured(copy.deepcopy(base))
    for key, value in values.items():
        OmegaConf.update(node, key, value, merge=False)
    cfg = validate(node)
    cfg.edit.export = False
    return cfg


def make_sampler(cfg: SaberConfig) -> optuna.samplers.BaseSampler:
    if cfg.search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.search.seed)
    if cfg.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.search.seed)
    return optuna.samplers.TPESampler(seed=cfg.search.seed)


def open_study(cfg: SaberConfig) -> optuna.Study:
    """Create or reopen the study in its journal file (safe for several concurrent workers)."""
    storage_path = Path(cfg.search.storage or Path(cfg.store_root).parent / "search" / f"{cfg.search.study}.journal")
    storage_path.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage_path)))
    return optuna.create_study(study_name=cfg.search.study, storage=storage, load_if_exists=True,
                               directions=["minimize"] * len(cfg.search.objectives),
                               sampler=make_sampler(cfg))


def n_finished(study: optuna.Study) -> int:
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def check_space_acts(cfg: SaberConfig) -> None:
    """Refuse a searched entangle knob that the composed run never reads: its trials would differ
    only in a number nothing uses (saber.entangle.unused_strength_knobs)."""
    unused = unused_strength_knobs(cfg.entangle.mode, cfg.entangle.calibrate)
    for key in cfg.search.space:
        group, _, rest = key.partition(".")
        why = unused.get(rest.split(".")[0]) if group == "entangle" else None
        if why:
            raise ValueError(f"config key 'search.space.{key}' cannot change the edit: {why}. Remove it from "
                             "search.space, or choose the entangle mode / entangle.calibrate=false that reads it")


def run_search(cfg: SaberConfig, session: Optional[ModelSession] = None) -> optuna.Study:
    """Run trials until the study has `search.n_trials` finished ones; return the study."""
    space = parse_space(cfg.search.space)
    check_space_acts(cfg)
    study = open_study(cfg)
    session = session or ModelSession()
    done = n_finished(study)
    if done >= cfg.search.n_trials:
        log.info("study %s already has %d finished trials", cfg.search.study, done)
        return study

    def objective(trial: optuna.Trial) -> list[float]:
        values = suggest(trial, space)
        trial_cfg = trial_config(cfg, values)
        result = run_pipeline(trial_cfg, Pipeline(trial_cfg, session=session))
        metrics = objectives(result)
        missing = [o for o in cfg.search.objectives if o not in metrics]
        if missing:
            raise KeyError(f"search objectives {missing} not in the evaluation summary; "
                           f"available: {sorted(metrics)}")
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("evaluate_dir", str(result.artifacts.get("evaluate", "")))
        return [metrics[o] for o in cfg.search.objectives]

    stop = optuna.study.MaxTrialsCallback(cfg.search.n_trials, states=(optuna.trial.TrialState.COMPLETE,))
    study.optimize(objective, n_trials=cfg.search.n_trials - done, callbacks=[stop])
    shared = objectives_shared_by_every_trial(study)
    if shared is not None:
        log.warning("search: every finished trial of study %s gave the same objectives %s although its knobs "
                    "differ: the knobs in search.space (%s) do not change this run (with entangle.calibrate=true "
                    "the calibration sets the strengths itself); search other knobs, or set "
                    "entangle.calibrate=false to search fixed strengths", cfg.search.study, shared,
                    ", ".join(cfg.search.space))
    return study


def objectives_shared_by_every_trial(study: optuna.Study, min_trials: int = 3) -> Optional[list[float]]:
    """The objectives when at least `min_trials` finished trials with different knob values all
    gave exactly the same ones (a search that cannot tell its trials apart, most likely because
    the run overrides the searched knobs), else None."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < min_trials or len({tuple(sorted(t.params.items())) for t in done}) < 2:
        return None
    values = {tuple(t.values) for t in done}
    return list(values.pop()) if len(values) == 1 else None


def write_search_report(study: optuna.Study, objective_names: list[str], out_dir: Path) -> Path:
    """trials.parquet and pareto.parquet (Optuna's best trials) next to the journal."""
    frame = study.trials_dataframe(attrs=("number", "params", "user_attrs", "state", "values"))
    frame.to_parquet(out_dir / "trials.parquet", index=False)
    # chosen on the objectives (held-out probe metrics by default); the evaluation sets only report
    reported = ("refusal_rate", "refusal_fragment_rate", "over_refusal_rate", "kl_tf_mean")
    best = [{"number": t.number, **t.params, **dict(zip(objective_names, t.values)),
             "reported": {k: t.user_attrs[k] for k in reported if k in t.user_attrs}} for t in study.best_trials]
    (out_dir / "pareto.json").write_text(json.dumps(best, indent=2))
    return out_dir / "pareto.json"


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(raw: DictConfig) -> None:
    configure_logging()
    from saber.errors import reported_errors

    with reported_errors(bool(raw.get("debug", False)), prog="saber.search"):
        cfg = validate(raw)
        cfg.store_root = to_absolute_path(cfg.store_root)
        if cfg.search.storage:
            cfg.search.storage = to_absolute_path(cfg.search.storage)
        study = run_search(cfg)
    out = write_search_report(study, list(cfg.search.objectives), Path(HydraConfig.get().runtime.output_dir))
    print(f"study {cfg.search.study}: {n_finished(study)} finished trials; Pareto set: {out}")


def main() -> None:
    import sys

    from saber.errors import precheck_argv

    precheck_argv(sys.argv[1:], prog="saber.search")
    _hydra_main()


if __name__ == "__main__":
    main()
