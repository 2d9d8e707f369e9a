"""Command-line entry shared by every stage module: `python -m stages.<name> key=value ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from saber.config import register_configs, validate
from saber.config.paths import CONF_DIR
from saber.errors import reported_errors
from saber.outputs import guard_run_outputs
from saber.pipeline import Pipeline, configure_logging


register_configs()


def stage_main(stage: str) -> Callable[[], None]:
    """A Hydra entry point that runs one stage from the artifacts already in the store."""

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def _main(raw: DictConfig) -> None:
        configure_logging()
        with reported_errors(bool(raw.get("debug", False)), prog=f"stages.{stage}"):
            cfg = validate(raw)
            cfg.store_root = to_absolute_path(cfg.store_root)
            if stage == "edit":
                guard_run_outputs(cfg, Path(HydraConfig.get().runtime.output_dir))  # before any model work
            pipeline = Pipeline(cfg)
            pipeline.force_stages = {stage} if cfg.force else set()
            artifact = pipeline.ensure(stage, cfg.iteration, build_missing=False)
        print(f"{stage}: {artifact.path}")

    def entry() -> None:
        import sys

        from saber.errors import precheck_argv

        precheck_argv(sys.argv[1:], prog=f"stages.{stage}")
        _main()

    return entry
