"""The runner: `python -m saber.run [overrides]` chains every stage through the artifact store.

Each stage is resolved by fingerprint, so a finished configuration reruns in seconds, a changed
edit knob reruns only edit and evaluate, and an interrupted run resumes at the first stage whose
artifact is missing. Iterations re-collect on the edited model until a stopping rule fires.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from saber.config import SaberConfig, register_configs, validate
from saber.config.paths import CONF_DIR
from saber.escalation import escalate
from saber.iteration import IterationLog, run_iterations
from saber.stage_names import ANALYSIS_STAGES, STAGE_ORDER
from saber.errors import reported_errors
from saber.outputs import guard_run_outputs
from saber.pipeline import Pipeline, configure_logging


log = logging.getLogger("saber.run")
register_configs()


@dataclass
class RunResult:
    """What one run produced: artifact paths per stage, the iteration log, the summary."""

    artifacts: dict[str, Path] = field(default_factory=dict)
    iterations: Optional[IterationLog] = None
    summary: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0


def run_pipeline(cfg: SaberConfig, pipeline: Optional[Pipeline] = None) -> RunResult:
    """Run the configured stages (all iterations) and return where everything landed."""
    start = time.perf_counter()
    pipeline = pipeline or Pipeline(cfg)
    unknown = [s for s in cfg.stages if s not in STAGE_ORDER]
    if unknown:
        raise ValueError(f"config key 'stages' names unknown stages {unknown}; valid: {list(STAGE_ORDER)}")
    guard_run_outputs(cfg, _hydra_run_dir())  # before any model work
    if any(s in cfg.stages for s in ANALYSIS_STAGES):
        from saber.probes import check_counts, load_probe_splits

        check_counts(cfg, load_probe_splits(cfg.data, pipeline.prompt_roots()))
    result = RunResult()
    wanted_analysis = [s for s in ANALYSIS_STAGES if s in cfg.stages]
    needs_plans = "edit" in cfg.stages or "evaluate" in cfg.stages
    last = 0
    if needs_plans:
        pipeline, cfg, result.iterations = escalate(pipeline, cfg, run_iterations(pipeline, cfg))
        last = result.iterations.last_iteration
    for stage in wanted_analysis:
        result.artifacts[stage] = pipeline.ensure(stage, last).path
    for stage in ("edit", "evaluate"):
        if stage in cfg.stages:
            result.artifacts[stage] = pipeline.ensure(stage, last).path
    if "evaluate" in result.artifacts:
        summary_path = result.artifacts["evaluate"] / "summary.json"
        result.summary = json.loads(summary_path.read_text())
        if cfg.edit.export and cfg.edit.out_dir and "edit" in result.artifacts:
            add_evaluation_to_card(Path(cfg.edit.out_dir), result.artifacts["evaluate"] / "model_card.md")
    pipeline.release_model()
    result.wall_time_s = time.perf_counter() - start
    return result


def _hydra_run_dir() -> Optional[Path]:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def add_evaluation_to_card(model_dir: Path, card: Path) -> None:
    """Append the evaluation section to the exported model's README (once per evaluation)."""
    readme = model_dir / "README.md"
    text = readme.read_text() if readme.exists() else ""
    section = card.read_text()
    if section not in text:
        readme.write_text(text.rstrip("\n") + "\n\n" + section)


def format_summary(result: RunResult) -> str:
    """A short plain-text table of the headline numbers and where the artifacts are."""
    lines = []
    headline = result.summary.get("headline", {})
    if headline:
        width = max(len(k) for k in headline)
        lines.append("metric".ljust(width) + "  value")
        for key, value in headline.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(key.ljust(width) + "  " + shown)
    if result.iterations is not None:
        lines.append(f"iterations used: {result.iterations.last_iteration + 1} "
                     f"(stop: {result.iterations.stop_reason})")
    for stage, path in result.artifacts.items():
        lines.append(f"{stage:9s} {path}")
    if "evaluate" in result.artifacts:
        lines.append(f"report: {result.artifacts['evaluate'] / 'report.md'}")
    lines.append(f"wall time: {result.wall_time_s:.1f} s")
    return "\n".join(lines)


def objectives(result: RunResult) -> dict[str, float]:
    """The numbers a sweep or search optimises, flattened from the summary."""
    return {k: float(v) for k, v in result.summary.get("headline", {}).items()
            if isinstance(v, (int, float))}


def write_run_summary(result: RunResult, out_dir: Path, overrides: list[str]) -> Path:
    """The per-job record that sweep aggregation reads (`run_summary.json` in the job directory)."""
    record = {
        "overrides": overrides,
        "headline": objectives(result),
        "artifacts": {k: str(v) for k, v in result.artifacts.items()},
        "iterations": None if result.iterations is None else {
            "last_iteration": result.iterations.last_iteration,
            "stop_reason": result.iterations.stop_reason,
            "records": result.iterations.records,
        },
        "wall_time_s": result.wall_time_s,
    }
    path = out_dir / "run_summary.json"
    path.write_text(json.dumps(record, indent=2))
    return path


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(raw: DictConfig) -> Optional[float]:
    configure_logging()
    with reported_errors(bool(raw.get("debug", False))):
        cfg = validate(raw)
        cfg.store_root = to_absolute_path(cfg.store_root)
        result = run_pipeline(cfg)
    hydra_cfg = HydraConfig.get()
    write_run_summary(result, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    print(format_summary(result))
    return objectives(result).get("refusal_rate")


def main() -> None:
    """Console-script entry point (`saber ...`), same as `python -m saber.run ...`."""
    import sys

    from saber.errors import precheck_argv

    precheck_argv(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
