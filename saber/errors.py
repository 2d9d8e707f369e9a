"""One-line command-line errors with a distinct exit code per kind of failure.

The project's own errors already name the key, file or value and what to do, so entry points
print that one line instead of Hydra's override dump and a traceback. `debug=true` or
HYDRA_FULL_ERROR=1 re-raises, with the traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

# Exit codes by kind (documented in docs/RELIABILITY.md); 1 stays "unexpected error".
EXIT_CODES: dict[str, int] = {
    "config": 2,        # a bad config value or key
    "prompts": 3,       # a missing or malformed prompt file
    "model": 4,         # the model cannot be loaded (missing, corrupt, remote code)
    "output": 5,        # an output directory SABER may not write
    "artifact": 6,      # a tampered or missing store artifact
    "disk": 7,          # not enough disk space
    "numerics": 8,      # NaN/Inf activations
    "organism": 9,      # a shipped organism changed, or a trained one is unhealthy
    "edit": 10,         # an edit the model or the export format cannot take (tied embeddings, LoRA limits)
}


def _kinds() -> list[tuple[type[BaseException], str]]:
    """Exception classes by kind, most specific first (imported here: this module must stay light)."""
    from omegaconf.errors import ValidationError

    from saber.collect import NonFiniteActivationsError
    from saber.config.schema import ConfigError
    from saber.directions import ActivationError
    from saber.edit.apply import TiedEmbeddingError
    from saber.edit.export import DiskSpaceError, ExportPathError
    from saber.edit.lora import LoraUnsupportedError
    from saber.model.loading import ModelLoadError
    from saber.organism.build import UnhealthyOrganismError
    from saber.organism.shipped import OrganismIntegrityError
    from saber.outputs import OutputGuardError
    from saber.pipeline import MissingUpstreamError
    from saber.prompts import PromptSetError
    from saber.store import ArtifactError

    return [(DiskSpaceError, "disk"), (OutputGuardError, "output"), (ExportPathError, "output"),
            (ConfigError, "config"), (ValidationError, "config"), (PromptSetError, "prompts"),
            (ModelLoadError, "model"), (ArtifactError, "artifact"), (MissingUpstreamError, "artifact"),
            (NonFiniteActivationsError, "numerics"), (ActivationError, "numerics"),
            (OrganismIntegrityError, "organism"), (UnhealthyOrganismError, "organism"),
            (TiedEmbeddingError, "edit"), (LoraUnsupportedError, "edit")]


def exit_code(exc: BaseException) -> int | None:
    """The exit code of one of the project's own errors; None for anything else."""
    for cls, kind in _kinds():
        if isinstance(exc, cls):
            return EXIT_CODES[kind]
    return None


@contextlib.contextmanager
def reported_errors(debug: bool = False, prog: str = "saber") -> Iterator[None]:
    """Turn the project's own errors into one stderr line and their exit code."""
    try:
        yield
    except Exception as exc:
        code = exit_code(exc)
        if code is None or debug or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{prog}: error: {exc} (debug=true shows the traceback)", file=sys.stderr)
        raise SystemExit(code) from None


def precheck_argv(argv: list[str], prog: str = "saber") -> None:
    """Check override keys before Hydra composes (unknown keys get a "did you mean")."""
    from saber.config.overrides import check_override_keys

    with reported_errors("debug=true" in argv, prog=prog):
        check_override_keys(argv)
