"""Probe reference stage: the base model's half of the evaluation on collect's held-out probes
(`python -m stages.probe_reference`; the spec lives beside `reference` in stages/reference.py)."""

from __future__ import annotations

from stages.cli import stage_main
from stages.reference import PROBE_SPEC as SPEC

__all__ = ["SPEC", "main"]
main = stage_main("probe_reference")

if __name__ == "__main__":
    main()
