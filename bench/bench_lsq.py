"""The least-squares edit against the projection edit on many organisms, both at the defaults.

`python -m bench lsq [--seeds=0,1,2,3,4] [--families=default/llama,...] [--no-write] [--merge=dirs]`

Per organism (the families and seeds of `bench defaults`; a seed failing its own health bars is
reported and not benchmarked), in one store and with one model load:

1. `projection`: the conf defaults with edit.method=projection, from an empty store;
2. `lsq`: the same with edit.method=lsq (what edit.method=auto picks on these organisms;
   collect, ranking, signature and references reused);
3. `arditi`: one difference-of-means direction removed everywhere at alpha 1.

Every point goes through the same evaluate stage and scorer (`auto`); every choice is made on
held-out probes. Results: docs/bench/lsq.json and the section "Least-squares edit on many
organisms" of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Sequence

from bench.bench_defaults import (COLUMNS, GOALS, _fmt, family_summary, healthy, organism_sweep, point_table,
                                  summary_table, write_results)
from bench.bench_quality import machine

TITLE = "Least-squares edit on many organisms"
ROLES = {"projection": ("saber", {"edit.method": "projection"}), "lsq": ("saber", {"edit.method": "lsq"}),
         "arditi": ("arditi", {})}
def verdicts(records: Sequence[dict[str, Any]]) -> list[str]:
    """Where lsq stands against the projection on each healthy organism."""
    out = []
    for r in records:
        if not healthy(r):
            continue
        p, q = r["points"]["projection"]["metrics"], r["points"]["lsq"]["metrics"]
        goal = GOALS[r["preset"]]
        ratio = q["kl_tf_mean"] / p["kl_tf_mean"] if p["kl_tf_mean"] > 0 else float("nan")
        out.append(f"- {r['family']} s{r['seed']}: refusal {_fmt(p['refusal_rate'])} -> {_fmt(q['refusal_rate'])} "
                   f"(goal {goal}: {'met' if q['refusal_rate'] <= goal else '**missed**'}), KL mean x{ratio:.2f}, "
                   f"skill {_fmt(p['skill_delta'])} -> {_fmt(q['skill_delta'])}")
    return out


def markdown(records: Sequence[dict[str, Any]], argv: Sequence[str], total_s: float) -> str:
    summary = family_summary(records, roles=tuple(ROLES))
    cols = list(COLUMNS)
    lines = [f"Command: `python -m bench lsq {' '.join(argv)}`. Machine: {machine()}. "
             f"Run {dt.date.today().isoformat()}, {total_s / 60:.0f} min in all. Every organism was trained on this "
             "machine from its preset's recipe at the seed shown; held-out evaluation sets, one scorer (`auto`), "
             "every choice made on held-out probes.", "",
             "Median / worst case over the benchmarked seeds (worst: the highest value, skill: the lowest):", "",
             *summary_table(summary, cols)]
    lines += ["", "Per organism:", "", *point_table(records, ("projection", "lsq")), "", "lsq against the projection:", "", *verdicts(records)]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    organism_sweep("lsq", __doc__, argv, ROLES, write)


def write(records: list[dict[str, Any]], argv: Sequence[str], total: float, no_write: bool) -> None:
    write_results("lsq", TITLE, markdown(records, argv, total), records, argv, total, no_write,
                  summary=family_summary(records, roles=tuple(ROLES)))
