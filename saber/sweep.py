"""Sweep aggregation: gather every job's summary, find the Pareto front, write the report.

`SweepReportCallback` runs in the Hydra process at the end of a multirun (any launcher: basic,
joblib, submitit). Each job writes `run_summary.json` into its own job directory; the callback
reads them all and writes `sweep.parquet`, `pareto.parquet`, `pareto.png` and `leaderboard.md`
into the sweep directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("saber.sweep")
# chosen on the held-out probe prompts; the evaluation sets' refusal_rate and kl_tf_mean only report
DEFAULT_OBJECTIVES = ("probe_refusal_rate", "probe_kl_tf_mean")
REPORTED = ("refusal_rate", "refusal_fragment_rate", "over_refusal_rate", "kl_tf_mean", "kl_first_token")


def pareto_mask(values: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows when every column is minimised.

    Row a dominates row b when a <= b in every column and a < b in at least one. Rows with a NaN
    objective are never on the front.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values).all(axis=1)
    mask = finite.copy()
    for i in np.flatnonzero(finite):
        others = values[finite]
        dominated = np.any(np.all(others <= values[i], axis=1) & np.any(others < values[i], axis=1))
        mask[i] = not dominated
    return mask


def gather(sweep_dir: Path) -> pd.DataFrame:
    """One row per finished job: its overrides and its flattened headline metrics."""
    rows = []
    for path in sorted(sweep_dir.glob("*/run_summary.json")):
        record = json.loads(path.read_text())
        row: dict[str, Any] = {"job": path.parent.name, "overrides": " ".join(record.get("overrides", []))}
        row.update(record.get("headline", {}))
        row["evaluate_dir"] = record.get("artifacts", {}).get("evaluate", "")
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_front(frame: pd.DataFrame, objectives: Sequence[str]) -> pd.DataFrame:
    """The non-dominated jobs over `objectives` (all minimised), sorted by the first one."""
    missing = [o for o in objectives if o not in frame.columns]
    if missing:
        raise KeyError(f"sweep objectives {missing} are not in the job summaries; "
                       f"available: {sorted(c for c in frame.columns if c not in ('job', 'overrides'))}")
    mask = pareto_mask(frame[list(objectives)].to_numpy())
    return frame[mask].sort_values(list(objectives)).reset_index(drop=True)


def plot_pareto(frame: pd.DataFrame, front: pd.DataFrame, objectives: Sequence[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = objectives[0], objectives[1]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(frame[x], frame[y], color="0.6", label="sweep point")
    ax.plot(front[x], front[y], "o-", color="tab:red", label="Pareto front")
    for _, row in front.iterrows():
        ax.annotate(str(row["job"]), (row[x], row[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title("Refusal against drift")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def leaderboard(frame: pd.DataFrame, front: pd.DataFrame, objectives: Sequence[str]) -> str:
    """Markdown: the Pareto front first, then every job sorted by the objectives."""
    shown = ["job", *objectives, *[c for c in (*REPORTED, "skill_accuracy") if c in frame], "overrides"]
    shown = list(dict.fromkeys(c for c in shown if c in frame.columns))

    def table(df: pd.DataFrame) -> str:
        lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
        for _, row in df.iterrows():
            cells = [f"{row[c]:.4g}" if isinstance(row[c], (float, np.floating)) else str(row[c]) for c in shown]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    ordered = frame.sort_values(list(objectives))
    probes = all(o.startswith("probe_") for o in objectives)
    chosen = ("The front is chosen on the held-out probe prompts; the evaluation-set columns only report."
              if probes else "The front is chosen on the evaluation sets themselves, so its numbers are optimistic.")
    return (f"# Sweep leaderboard\n\nObjectives (minimised): {', '.join(objectives)}. {chosen}\n\n"
            f"## Pareto front ({len(front)} of {len(frame)} jobs)\n\n{table(front)}\n\n"
            f"## All jobs\n\n{table(ordered)}\n")


def write_report(sweep_dir: Path, objectives: Sequence[str] = DEFAULT_OBJECTIVES) -> pd.DataFrame:
    """Aggregate a finished sweep directory; returns the Pareto front."""
    frame = gather(sweep_dir)
    if frame.empty:
        raise FileNotFoundError(f"no job in {sweep_dir} wrote run_summary.json; did every job fail?")
    front = pareto_front(frame, objectives)
    frame.to_parquet(sweep_dir / "sweep.parquet", index=False)
    front.to_parquet(sweep_dir / "pareto.parquet", index=False)
    if len(objectives) >= 2:
        plot_pareto(frame, front, objectives, sweep_dir / "pareto.png")
    (sweep_dir / "leaderboard.md").write_text(leaderboard(frame, front, objectives))
    log.info("sweep report: %d jobs, %d on the Pareto front -> %s", len(frame), len(front), sweep_dir)
    return front


class SweepReportCallback(Callback):
    """Hydra callback: write the sweep report when a multirun ends."""

    def __init__(self, objectives: Sequence[str] = DEFAULT_OBJECTIVES) -> None:
        self.objectives = tuple(objectives)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            write_report(sweep_dir, self.objectives)
        except (FileNotFoundError, KeyError) as err:
            log.error("sweep report not written: %s", err)
