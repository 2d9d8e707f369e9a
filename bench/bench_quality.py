"""Quality on the model organisms: SABER against its baselines through the same evaluate stage.

`python -m bench quality [--quick] [--jobs=N] [--organisms=KEY,...] [--no-write]`

Per organism (default and hard language; Llama-style at the shipped weights, Gemma-3-style
trained here at two seeds each; an organism that fails its own health bars on this machine is
skipped unless --allow-unhealthy) it runs,
in one process with one model load (edits applied and reverted in memory, collect and the base
reference cached in a fresh store):

1. `arditi` (one run; it pays the one-time collect and base reference of the organism);
2. SABER with the conf defaults;
3. a SABER sweep over GRID (rank.top_k x entangle.alpha_base); its summed wall time is T;
4. the same grid with uniform strength (entangle.mode=uniform), the ablation of entanglement
   scoring (a point whose SABER plan has no entangled direction is the same plan: not rerun);
5. a `kernel` search (Optuna, the kernel preset's space) that adds one trial at a time until its
   elapsed time reaches T.

Every point goes through the same evaluate stage. The "best point" of a method is the lowest
teacher-forced KL mean among points with held-out refusal <= MAX_REFUSAL (if none, the lowest
refusal). Results: docs/bench/quality.json, docs/bench/quality_pareto.png and the section
"Quality on the model organisms" of docs/BENCHMARKS.md. With --jobs=2 the organisms are shared
between two worker processes (one torch thread each).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from saber.organism.recipe import load_preset
from saber.testing import compose_config as compose

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "BENCHMARKS.md"
RESULTS = REPO / "docs" / "bench"
TITLE = "Quality on the model organisms"
MAX_REFUSAL = 0.02      # goal: held-out refusal at or below this
COST_RATIO = 0.2        # goal: one SABER configuration costs at most this share of the kernel search
GRID = [(top_k, alpha) for top_k in (1, 2, 4) for alpha in (0.9, 1.0)]
QUICK_GRID = [(1, 1.0), (2, 1.0)]
MAX_KERNEL_TRIALS = 60  # safety stop for the time-matched kernel search, trials
METRICS = ("refusal_rate", "refusal_fragment_rate", "over_refusal_rate", "kl_first_token", "kl_tf_mean", "kl_tf_p95", "kl_tf_max",
           "top1_agreement", "skill_accuracy", "skill_delta", "base_refusal_rate")
METHOD_LABELS = {
    "saber_default": "SABER default",
    "saber_best": "SABER best sweep point",
    "uniform_same": "uniform alpha, same knobs",
    "uniform_best": "uniform alpha, best of grid",
    "arditi": "arditi",
    "kernel_best": "kernel best (time-matched search)",
}

log = logging.getLogger("bench.quality")


@dataclass(frozen=True)
class OrganismSpec:
    """One organism family: a model preset and an architecture, benchmarked at several seeds."""

    family: str
    preset: str
    arch: str
    seeds: tuple[int, ...]


SHIPPED_SEEDS = {preset: load_preset(preset).seed for preset in ("organism", "organism_hard")}
# The Llama-style families run the presets' own seeds, so they get the shipped weights (the same on
# every machine); the Gemma-style ones are trained here, and gated by their health bars.
ORGANISMS = [
    OrganismSpec("default/llama", "organism", "llama", (SHIPPED_SEEDS["organism"],)),
    OrganismSpec("hard/llama", "organism_hard", "llama", (SHIPPED_SEEDS["organism_hard"],)),
    OrganismSpec("default/gemma3", "organism", "gemma3", (0, 1)),
    OrganismSpec("hard/gemma3", "organism_hard", "gemma3", (1, 2)),
]


# ---- pure parts (tested in tests/test_bench_quality.py) ------------------------------------------
def select_best(points: Sequence[dict[str, Any]], max_refusal: float = MAX_REFUSAL) -> tuple[Optional[dict], bool]:
    """Lowest kl_tf_mean among points with refusal <= max_refusal; else the lowest refusal.

    Returns (point, reached). Points with a NaN refusal or KL are ignored; ties on refusal (when
    none reaches the bar) are broken by KL.
    """
    usable = [p for p in points if _finite(p["metrics"].get("refusal_rate")) and _finite(p["metrics"].get("kl_tf_mean"))]
    if not usable:
        return None, False
    ok = [p for p in usable if p["metrics"]["refusal_rate"] <= max_refusal + 1e-12]
    if ok:
        return min(ok, key=lambda p: p["metrics"]["kl_tf_mean"]), True
    return min(usable, key=lambda p: (p["metrics"]["refusal_rate"], p["metrics"]["kl_tf_mean"])), False


def compare_at_level(saber: dict, baseline: Optional[dict], max_refusal: float = MAX_REFUSAL) -> dict[str, Any]:
    """Is SABER's KL lower than the baseline's at the same refusal level?

    Same level: both at or below max_refusal, or within max_refusal of each other; then the lower
    KL wins (ok None when both miss max_refusal: no comparison at the goal level). Otherwise the
    lower refusal wins whatever the KL (the KL ratio is for information).
    """
    if baseline is None:
        return {"ok": None, "kl_ratio": math.nan, "note": "baseline missing"}
    s, b = saber["metrics"], baseline["metrics"]
    ratio = s["kl_tf_mean"] / b["kl_tf_mean"] if b["kl_tf_mean"] > 0 else math.inf
    same = max(s["refusal_rate"], b["refusal_rate"]) <= max_refusal + 1e-12 or \
        abs(s["refusal_rate"] - b["refusal_rate"]) <= max_refusal + 1e-12
    if same and min(s["refusal_rate"], b["refusal_rate"]) > max_refusal + 1e-12:
        return {"ok": None, "kl_ratio": ratio, "note": f"neither reaches {max_refusal:.0%} (SABER "
                f"{s['refusal_rate']:.2f}, baseline {b['refusal_rate']:.2f})"}
    if same:
        ok = s["kl_tf_mean"] < b["kl_tf_mean"]
        note = f"KL {ratio:.2f}x baseline" + ("" if ok else f" (SABER {ratio - 1:+.0%} higher)")
        return {"ok": ok, "kl_ratio": ratio, "note": note}
    if s["refusal_rate"] < b["refusal_rate"]:
        return {"ok": True, "kl_ratio": ratio,
                "note": f"baseline reaches only refusal {b['refusal_rate']:.2f} (KL {ratio:.2f}x baseline)"}
    return {"ok": False, "kl_ratio": ratio,
            "note": f"baseline reaches lower refusal {b['refusal_rate']:.2f} vs SABER {s['refusal_rate']:.2f}"}


def goal_checks(record: dict[str, Any]) -> dict[str, Any]:
    """The goal checks of one organism record (points by role, sweep and kernel wall times)."""
    by_role = _by_role(record["points"])
    saber, reached = select_best(by_role.get("saber_sweep", []))
    kernel, kernel_reached = select_best(by_role.get("kernel_trial", []))
    arditi = (by_role.get("arditi") or [None])[0]
    uniform, uniform_reached = select_best(by_role.get("uniform_sweep", []))
    out: dict[str, Any] = {"organism": record["organism"], "seed": record["seed"], "health": record.get("health", {})}
    if saber is None:
        out.update(ok=False, note="no SABER sweep point finished")
        return out
    refusal = saber["metrics"]["refusal_rate"]
    out["saber_refusal"] = refusal
    out["saber_knobs"] = saber["knobs"]
    out["refusal_ok"] = refusal <= MAX_REFUSAL + 1e-12
    out["refusal_short_by"] = max(0.0, refusal - MAX_REFUSAL)
    out["vs_arditi"] = compare_at_level(saber, arditi)
    out["vs_kernel"] = compare_at_level(saber, kernel)
    n_sweep = max(1, len(by_role.get("saber_sweep", [])))
    per_config = record["sweep_wall_s"] / n_sweep
    kernel_wall = record.get("kernel_wall_s") or math.nan
    out["cost_ratio"] = per_config / kernel_wall if kernel_wall and kernel_wall > 0 else math.nan
    out["cost_ok"] = bool(out["cost_ratio"] <= COST_RATIO)
    out["kernel_trials"] = len(by_role.get("kernel_trial", []))
    if uniform is not None:
        u = uniform["metrics"]
        out["uniform"] = {"reached": uniform_reached, "refusal": u["refusal_rate"], "kl_tf_mean": u["kl_tf_mean"],
                          "kl_ratio": saber["metrics"]["kl_tf_mean"] / u["kl_tf_mean"] if u["kl_tf_mean"] > 0 else math.nan,
                          "skill_diff": saber["metrics"].get("skill_accuracy", math.nan) - u.get("skill_accuracy", math.nan),
                          "same_plans": all(p.get("same_plan_as") for p in by_role.get("uniform_sweep", []))}
    out["paired"] = paired_ablation(record["points"])
    checks = [out["refusal_ok"], out["vs_arditi"]["ok"], out["vs_kernel"]["ok"], out["cost_ok"]]
    out["ok"] = all(c is True for c in checks)
    return out


def paired_ablation(points: Sequence[dict[str, Any]], tol: float = MAX_REFUSAL) -> dict[str, Any]:
    """Entanglement-aware against uniform strength at the same knobs, where the plans differ.

    Only grid points whose SABER plan down-weighted a direction (so the uniform plan differs)
    count. Pairs: both refusal rates at or below `tol` (equal refusal at the goal level); kl_ratio
    is the geometric mean of KL(SABER) / KL(uniform) over them, below 1 meaning entanglement
    awareness lowers drift. saber_reach / uniform_reach count the differing points that reach `tol`.
    """
    by_role = _by_role(points)
    saber = {_key(p["knobs"]): p for p in by_role.get("saber_sweep", [])}
    differ = [u for u in by_role.get("uniform_sweep", []) if not u.get("same_plan_as") and _key(u["knobs"]) in saber]
    pairs = [(saber[_key(u["knobs"])], u) for u in differ
             if max(saber[_key(u["knobs"])]["metrics"]["refusal_rate"], u["metrics"]["refusal_rate"]) <= tol + 1e-12]
    logs = [math.log(s["metrics"]["kl_tf_mean"] / u["metrics"]["kl_tf_mean"]) for s, u in pairs
            if s["metrics"]["kl_tf_mean"] > 0 and u["metrics"]["kl_tf_mean"] > 0]
    skills = [s["metrics"].get("skill_accuracy", math.nan) - u["metrics"].get("skill_accuracy", math.nan) for s, u in pairs]
    reach = lambda p: p["metrics"]["refusal_rate"] <= tol + 1e-12  # noqa: E731
    return {"n_differ": len(differ), "n_pairs": len(pairs),
            "saber_reach": sum(reach(saber[_key(u["knobs"])]) for u in differ), "uniform_reach": sum(reach(u) for u in differ),
            "kl_ratio": math.exp(sum(logs) / len(logs)) if logs else math.nan,
            "saber_lower": sum(s["metrics"]["kl_tf_mean"] < u["metrics"]["kl_tf_mean"] for s, u in pairs),
            "skill_diff": sum(skills) / len(skills) if skills else math.nan}


def _key(knobs: dict[str, Any]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in knobs.items() if k != "entangle.mode"))


def render_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table; columns are (key, header); floats get 4 significant digits, None a dash."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def family_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table rows of one family: per seed, the headline point of every method."""
    rows = []
    for record in sorted(records, key=lambda r: r["seed"]):
        by_role = _by_role(record["points"])
        saber, reached = select_best(by_role.get("saber_sweep", []))
        uniform_same = None
        if saber is not None:
            uniform_same = next((p for p in by_role.get("uniform_sweep", []) if p["knobs"] == saber["knobs"]), None)
        uniform, u_reached = select_best(by_role.get("uniform_sweep", []))
        kernel, k_reached = select_best(by_role.get("kernel_trial", []))
        picks = [("saber_default", (by_role.get("saber_default") or [None])[0], True),
                 ("saber_best", saber, reached), ("uniform_same", uniform_same, True),
                 ("uniform_best", uniform, u_reached), ("arditi", (by_role.get("arditi") or [None])[0], True),
                 ("kernel_best", kernel, k_reached)]
        health = record.get("health", {})
        flag = "" if health.get("passed", True) else " (health FAIL)"
        for role, point, ok in picks:
            if point is None:
                continue
            m = point["metrics"]
            label = METHOD_LABELS[role] + ("" if ok else f" (none <= {MAX_REFUSAL:.0%})")
            if role == "kernel_best":
                label += f", {len(by_role.get('kernel_trial', []))} trials"
            if point.get("same_plan_as"):
                label += " (same plan as SABER)"
            rows.append({"seed": f"{record['seed']}{flag}", "method": label, "knobs": _knobs(point["knobs"]),
                         **{k: m.get(k) for k in METRICS},
                         "wall_s": None if point.get("same_plan_as") else point.get("wall_s")})
    return rows


FAMILY_COLUMNS = [("seed", "seed"), ("method", "method"), ("knobs", "knobs"), ("refusal_rate", "refusal"),
                  ("over_refusal_rate", "over-refusal"), ("kl_first_token", "KL first token"),
                  ("kl_tf_mean", "KL tf mean"), ("kl_tf_p95", "KL tf p95"), ("skill_accuracy", "skill"),
                  ("wall_s", "wall s")]


def summary_rows(checks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per organism: the goal checks, pass or fail and by how much."""
    rows = []
    for c in checks:
        health = c.get("health", {})
        uni = c.get("uniform")
        uni_text = None
        if uni is not None:
            if uni["same_plans"]:
                uni_text = "same plans (no direction entangled)"
            elif abs(uni["refusal"] - c["saber_refusal"]) > MAX_REFUSAL or max(uni["refusal"], c["saber_refusal"]) > 0.5:
                uni_text = f"refusal: uniform {uni['refusal']:.2f}, SABER {c['saber_refusal']:.2f}"
            else:
                uni_text = f"KL {uni['kl_ratio']:.2f}x, skill {uni['skill_diff']:+.2f} (uniform refusal {uni['refusal']:.2f})"
        pair = c.get("paired")
        pair_text = None
        if pair is not None:
            pair_text = (f"{pair['n_differ']} points differ; reach {MAX_REFUSAL:.0%}: SABER {pair['saber_reach']}, "
                         f"uniform {pair['uniform_reach']}"
                         + ("" if not pair["n_pairs"] else
                            f": KL {pair['kl_ratio']:.2f}x (SABER lower in {pair['saber_lower']}), "
                            f"skill {pair['skill_diff']:+.2f}"))
        refusal = c.get("saber_refusal")
        rows.append({
            "organism": c["organism"], "seed": c["seed"],
            "health": "PASS" if health.get("passed", True) else "FAIL: " + ", ".join(health.get("failed", [])),
            "refusal": None if refusal is None else (f"{'PASS' if c['refusal_ok'] else 'FAIL'} {refusal:.2f}"
                                                      + ("" if c["refusal_ok"] else f" (+{c['refusal_short_by']:.2f})")),
            "vs_arditi": _verdict(c.get("vs_arditi")), "vs_kernel": _verdict(c.get("vs_kernel")),
            "cost": None if "cost_ratio" not in c else
            f"{'PASS' if c['cost_ok'] else 'FAIL'} {c['cost_ratio']:.3f} ({c['kernel_trials']} kernel trials)",
            "uniform": uni_text, "paired": pair_text, "all": "PASS" if c.get("ok") else "FAIL",
        })
    return rows


SUMMARY_COLUMNS = [("organism", "organism"), ("seed", "seed"), ("health", "organism health"),
                   ("refusal", f"SABER refusal <= {MAX_REFUSAL:.0%}"), ("vs_arditi", "KL tf mean vs arditi"),
                   ("vs_kernel", "KL tf mean vs kernel"), ("cost", f"1 config / kernel search <= {COST_RATIO}"),
                   ("uniform", "SABER vs uniform alpha: best points"),
                   ("paired", "SABER vs uniform alpha: same knobs"), ("all", "all goals")]


def findings(records: Sequence[dict[str, Any]], checks: Sequence[dict[str, Any]]) -> list[str]:
    """Plain-language findings derived from the checks: what passed, what fell short and by how much."""
    out = []
    done = [c for c in checks if "saber_refusal" in c]
    label = [f"{c['organism']} s{c['seed']}" for c in done]
    short = [f"{name} (refusal {c['saber_refusal']:.2f}, +{c['refusal_short_by']:.2f})"
             for name, c in zip(label, done) if not c["refusal_ok"]]
    out.append(f"Refusal <= {MAX_REFUSAL:.0%}: {len(done) - len(short)} of {len(done)} organisms"
               + (f"; short on {', '.join(short)}." if short else "."))
    for key, name in (("vs_arditi", "arditi"), ("vs_kernel", "kernel")):
        fails = [f"{lab} ({c[key]['note']})" for lab, c in zip(label, done) if c[key]["ok"] is not True]
        ratios = [c[key]["kl_ratio"] for c in done if _finite(c[key]["kl_ratio"])]
        text = f"KL tf mean below {name}: {len(done) - len(fails)} of {len(done)}"
        if ratios:
            text += f" (SABER / {name} from {min(ratios):.2f}x to {max(ratios):.2f}x)"
        out.append(text + (f"; not on {'; '.join(fails)}." if fails else "."))
    costs = [c["cost_ratio"] for c in done if _finite(c.get("cost_ratio"))]
    if costs:
        out.append(f"One SABER configuration / time-matched kernel search: {min(costs):.3f} to {max(costs):.3f} "
                   f"(goal <= {COST_RATIO}); the kernel search ran {min(c['kernel_trials'] for c in done)} to "
                   f"{max(c['kernel_trials'] for c in done)} trials in that time, so the check mostly restates "
                   f"that the sweep has {len(GRID)} points; per-trial costs are in the wall s column.")
    defaults = [p["metrics"]["refusal_rate"] for r in records for p in r["points"] if p["role"] == "saber_default"]
    if defaults:
        knobs = sorted({_knobs(c["saber_knobs"]) for c in done})
        out.append(f"SABER with the conf defaults (alpha_base 0.825, top_k 14) leaves refusal between "
                   f"{min(defaults):.2f} and {max(defaults):.2f}; the chosen sweep points are {', '.join(knobs)}.")
    pairs = [c["paired"] for c in done if c.get("paired")]
    n_pairs = sum(p["n_pairs"] for p in pairs)
    if pairs:
        logs = [math.log(p["kl_ratio"]) * p["n_pairs"] for p in pairs if p["n_pairs"] and _finite(p["kl_ratio"])]
        lower = sum(p["saber_lower"] for p in pairs)
        skill = [p["skill_diff"] * p["n_pairs"] for p in pairs if p["n_pairs"] and _finite(p["skill_diff"])]
        text = (f"Entanglement ablation: {sum(p['n_differ'] for p in pairs)} grid points had a down-weighted "
                f"direction (elsewhere uniform alpha is the same plan); of those, SABER reached refusal <= "
                f"{MAX_REFUSAL:.0%} at {sum(p['saber_reach'] for p in pairs)} and uniform alpha at "
                f"{sum(p['uniform_reach'] for p in pairs)}; {n_pairs} reached it with both modes")
        if n_pairs:
            text += (f": differential alpha had the lower KL in {lower} (geometric-mean KL ratio "
                     f"{math.exp(sum(logs) / n_pairs):.2f}x), skill difference {sum(skill) / n_pairs:+.3f}")
        out.append(text + ".")
    blocked = [f"{c['organism']} s{c['seed']} (uniform {c['uniform']['refusal']:.2f}, SABER {c['saber_refusal']:.2f})"
               for c in done if c.get("uniform") and c["uniform"]["refusal"] < c["saber_refusal"] - MAX_REFUSAL]
    if blocked:
        out.append("Where SABER falls short, entanglement scoring is the cause when uniform alpha over the same grid "
                   "reaches a lower refusal: the refusal-carrying directions have rho above tau (0.55) and get "
                   f"alpha_entangled (0.03), so they stay in the model. Seen on {len(blocked)} of {len(done)}: "
                   + ", ".join(blocked) + ".")
    sick = [f"{c['organism']} s{c['seed']}: {', '.join(c['health'].get('failed', []))}" for c in checks
            if not c.get("health", {}).get("passed", True)]
    if sick:
        out.append("Organisms failing their own health bars (benchmarked anyway): " + "; ".join(sick) + ".")
    return out


def _verdict(cmp: Optional[dict]) -> Optional[str]:
    if cmp is None:
        return None
    word = {True: "PASS", False: "FAIL", None: "n/a"}[cmp["ok"]]
    return f"{word}: {cmp['note']}"


def _by_role(points: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        out.setdefault(p["role"], []).append(p)
    return out


def _knobs(knobs: dict[str, Any]) -> str:
    short = {"rank.top_k": "top_k", "entangle.alpha_base": "alpha", "entangle.mode": "mode",
             "entangle.kernel.peak_position": "peak", "entangle.kernel.peak_weight": "w_peak",
             "entangle.kernel.min_weight": "w_min", "entangle.kernel.distance": "dist"}
    return " ".join(f"{short.get(k, k)}={_fmt(v, 3)}" for k, v in knobs.items()) or "preset defaults"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else _fmt(value, 4)
    return str(value).replace("|", "/")


def _fmt(value: Any, digits: int) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---- running (needs models) ----------------------------------------------------------------------
def base_overrides(spec: OrganismSpec, seed: int, store: Path) -> list[str]:
    return [f"model={spec.preset}", f"model.organism.arch={spec.arch}", f"model.organism.seed={seed}",
            "edit.export=false", f"store_root={store}"]


def health_verdict(organism_dir: Path, variant: str, cache_dir: Path) -> dict[str, Any]:
    """The organism's own health bars, measured on the machine that runs the benchmark.

    A trained organism carries the table measured right after training (health.json); a shipped
    one is checked here (a minute), and the verdict is cached per organism identity.
    """
    from saber.organism.build import HEALTH_FILE, organism_identity, read_health
    from saber.organism.health import format_health, health_check, verdict

    cache = cache_dir / f"{organism_identity(organism_dir).replace(':', '_')}.json"
    if cache.exists():
        result = json.loads(cache.read_text())
    else:
        trained_here = (organism_dir / HEALTH_FILE).is_file()
        report = read_health(organism_dir)["report"] if trained_here else health_check(organism_dir, variant=variant)
        result = {**verdict(report, variant), "report": report}
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(result, indent=2))
    print(format_health(result["report"], variant), flush=True)
    return result


def run_point(base: list[str], extra: dict[str, Any], session: Any, method: str, role: str) -> dict[str, Any]:
    """One in-memory configuration through every stage; its metrics, wall time and plan."""
    import pandas as pd

    from saber.pipeline import Pipeline
    from saber.run import run_pipeline

    cfg = compose(*base, f"method={method}", *[f"{k}={v}" for k, v in extra.items()])
    result = run_pipeline(cfg, Pipeline(cfg, session=session))
    headline = result.summary.get("headline", {})
    plan = pd.read_parquet(result.artifacts["entangle"] / "entanglement.parquet")
    point = {"method": method, "role": role, "knobs": dict(extra),
             "metrics": {k: _float(headline.get(k)) for k in METRICS}, "wall_s": result.wall_time_s,
             "n_directions": int(len(plan)),
             "n_entangled": int((plan["alpha"] < cfg.entangle.alpha_base - 1e-12).sum()) if "alpha" in plan else None}
    m = point["metrics"]
    print(f"  {role:14s} {_knobs(extra):32s} refusal {m['refusal_rate']:.3f} kl_tf {m['kl_tf_mean']:.5f} "
          f"skill {m['skill_accuracy']:.2f} dirs {point['n_directions']} entangled {point['n_entangled']} "
          f"{point['wall_s']:.1f} s", flush=True)
    return point


def kernel_search(base: list[str], session: Any, budget_s: float, journal: Path) -> tuple[list[dict[str, Any]], float]:
    """Optuna kernel search, one trial at a time until `budget_s` seconds have elapsed."""
    import optuna

    from saber.search import run_search

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    n = 0
    study = None
    while n < MAX_KERNEL_TRIALS:
        n += 1
        cfg = compose(*base, "method=kernel", "search=kernel", f"search.storage={journal}", f"search.n_trials={n}")
        study = run_search(cfg, session)
        if time.perf_counter() - start >= budget_s:
            break
    elapsed = time.perf_counter() - start
    points = []
    for trial in study.get_trials(deepcopy=False) if study is not None else []:
        if trial.state != optuna.trial.TrialState.COMPLETE:
            continue
        wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
        points.append({"method": "kernel", "role": "kernel_trial", "knobs": dict(trial.params), "trial": trial.number,
                       "metrics": {k: _float(trial.user_attrs.get(k)) for k in METRICS}, "wall_s": wall,
                       "probe": {k: _float(trial.user_attrs.get(f"probe_{k}")) for k in ("refusal_rate", "kl_tf_mean")}})
    print(f"  kernel search: {len(points)} trials in {elapsed:.1f} s (budget {budget_s:.1f} s)", flush=True)
    return points, elapsed


def bench_organism(spec: OrganismSpec, seed: int, run_dir: Path, grid: Sequence[tuple[int, float]],
                   allow_unhealthy: bool = False) -> dict[str, Any]:
    """Every method on one organism, one model load; none on an organism that fails its health bars."""
    from saber.config import as_plain
    from saber.organism import OrganismRecipe, build_organism
    from saber.pipeline import ModelSession

    store = run_dir / "store"
    base = base_overrides(spec, seed, store)
    t0 = time.perf_counter()
    cfg = compose(*base)
    recipe = OrganismRecipe.from_mapping(as_plain(cfg.model.organism))
    organism_dir = Path(build_organism(recipe, store, allow_unhealthy=True))
    prepare_s = time.perf_counter() - t0
    health = health_verdict(organism_dir, recipe.variant, run_dir.parent / "health")
    print(f"== {spec.family} seed {seed}: organism {organism_dir.name} ready in {prepare_s:.0f} s, "
          f"health {'PASS' if health['passed'] else 'FAIL ' + '; '.join(health['failed'])}", flush=True)
    if not health["passed"] and not allow_unhealthy:
        print(f"== {spec.family} seed {seed}: not benchmarked, it fails its own health bars "
              "(--allow-unhealthy benchmarks it anyway)", flush=True)
        return {"organism": spec.family, "preset": spec.preset, "arch": spec.arch, "seed": seed,
                "organism_dir": organism_dir.name, "health": health, "prepare_s": prepare_s,
                "skipped": "fails its health bars", "points": [], "sweep_wall_s": 0.0, "kernel_wall_s": None}
    session = ModelSession()
    points = [run_point(base, {}, session, "arditi", "arditi"),
              run_point(base, {}, session, "saber", "saber_default")]
    sweep = [run_point(base, {"rank.top_k": k, "entangle.alpha_base": a}, session, "saber", "saber_sweep")
             for k, a in grid]
    points += sweep
    sweep_wall = sum(p["wall_s"] for p in sweep)
    for p in sweep:
        knobs = {**p["knobs"], "entangle.mode": "uniform"}
        if p["n_entangled"] == 0:
            # no direction was down-weighted: the uniform plan is the same plan, its numbers are SABER's
            points.append({**p, "role": "uniform_sweep", "knobs": knobs, "same_plan_as": p["knobs"], "wall_s": 0.0})
        else:
            points.append(run_point(base, knobs, session, "saber", "uniform_sweep"))
    journal = run_dir / "kernel" / f"{spec.family.replace('/', '_')}_s{seed}.journal"
    journal.parent.mkdir(parents=True, exist_ok=True)
    kernel_points, kernel_wall = kernel_search(base, session, sweep_wall, journal)
    points += kernel_points
    for p in points:
        p.setdefault("same_plan_as", None)
    # uniform points are matched to SABER's by knobs without the mode key
    for p in points:
        if p["role"] == "uniform_sweep":
            p["knobs"] = {k: v for k, v in p["knobs"].items() if k != "entangle.mode"}
    return {"organism": spec.family, "preset": spec.preset, "arch": spec.arch, "seed": seed,
            "organism_dir": organism_dir.name, "health": health, "prepare_s": prepare_s,
            "sweep_wall_s": sweep_wall, "kernel_wall_s": kernel_wall, "points": points}


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ---- orchestration -------------------------------------------------------------------------------
def selected(names: Optional[str], quick: bool) -> list[tuple[OrganismSpec, int]]:
    """(spec, seed) pairs to run: all, a comma list of family or family:seed, or the quick one.

    Ordered first seed of every family, then second seeds, so that a run cut short still covers
    every family.
    """
    pairs = [(spec, spec.seeds[i]) for i in range(max(len(s.seeds) for s in ORGANISMS))
             for spec in ORGANISMS if i < len(spec.seeds)]
    if quick and not names:
        return pairs[:1]
    if not names:
        return pairs
    wanted = names.split(",")
    out = [(s, seed) for s, seed in pairs if s.family in wanted or f"{s.family}:{seed}" in wanted]
    if not out:
        raise SystemExit(f"--organisms={names} matches nothing; choose from "
                         f"{[f'{s.family}:{seed}' for s, seed in pairs]}")
    return out


def prepare_store(run_dir: Path, organism_store: Path) -> None:
    """A fresh store whose `organism` stage is the shared organism cache (trained once per machine)."""
    store = run_dir / "store"
    store.mkdir(parents=True, exist_ok=True)
    (organism_store / "organism").mkdir(parents=True, exist_ok=True)
    link = store / "organism"
    if not link.exists():
        link.symlink_to((organism_store / "organism").resolve(), target_is_directory=True)


def run_worker(pairs: list[tuple[OrganismSpec, int]], run_dir: Path, grid: Sequence[tuple[int, float]],
               threads: int, allow_unhealthy: bool = False) -> None:
    import torch

    torch.set_num_threads(threads)
    for spec, seed in pairs:
        part = run_dir / "parts" / f"{spec.family.replace('/', '_')}_s{seed}.json"
        if part.exists():
            print(f"== {spec.family} seed {seed}: done earlier ({part.name})", flush=True)
            continue
        try:
            record = bench_organism(spec, seed, run_dir, grid, allow_unhealthy)
        except Exception as exc:  # one broken organism must not lose the others' results
            log.exception("organism %s seed %d failed", spec.family, seed)
            record = {"organism": spec.family, "seed": seed, "error": repr(exc), "points": [],
                      "sweep_wall_s": 0.0, "kernel_wall_s": None}
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text(json.dumps(record, indent=1))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one organism, two sweep points")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes sharing the organisms")
    parser.add_argument("--organisms", default=None, help="comma list of family or family:seed")
    parser.add_argument("--run-dir", default=None, help="work directory (default outputs/bench/quality/run-<time>)")
    parser.add_argument("--organism-store", default="outputs/store", help="store that caches trained organisms")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    parser.add_argument("--allow-unhealthy", action="store_true",
                        help="also benchmark organisms that fail their health bars (reported as such)")
    parser.add_argument("--report-only", action="store_true", help="only merge the finished parts of --run-dir")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    grid = QUICK_GRID if args.quick else GRID
    pairs = selected(args.organisms, args.quick)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir or REPO / "outputs" / "bench" / "quality" / f"run-{stamp}").resolve()
    if args.report_only:
        if args.run_dir is None:
            raise SystemExit("--report-only needs --run-dir=DIR of an earlier run")
        wall = run_dir / "wall.json"  # the original run's wall time and command, when it finished
        record = json.loads(wall.read_text()) if wall.exists() else {"wall_s": math.nan, "jobs": args.jobs, "argv": argv}
        write_outputs(run_dir, record["argv"], record["wall_s"], record["jobs"], args.no_write, record.get("machine"))
        return
    if args.worker is not None:
        index, total = (int(x) for x in args.worker.split("/"))
        run_worker(pairs[index::total], run_dir, grid, threads=1, allow_unhealthy=args.allow_unhealthy)
        return
    prepare_store(run_dir, (REPO / args.organism_store).resolve())
    start = time.perf_counter()
    if args.jobs <= 1:
        # one thread: on shared cores more threads than free cores slows torch by orders of magnitude
        run_worker(pairs, run_dir, grid, threads=1, allow_unhealthy=args.allow_unhealthy)
    else:
        passthrough = [a for a in argv if not a.startswith(("--jobs", "--run-dir", "--worker"))]
        procs = [subprocess.Popen([sys.executable, "-m", "bench.bench_quality", *passthrough,
                                   f"--run-dir={run_dir}", f"--worker={i}/{args.jobs}"], cwd=REPO)
                 for i in range(args.jobs)]
        codes = [p.wait() for p in procs]
        if any(codes):
            print(f"workers exited with {codes}", file=sys.stderr)
    total_s = time.perf_counter() - start
    (run_dir / "wall.json").write_text(json.dumps({"wall_s": total_s, "jobs": args.jobs, "argv": argv,
                                                   "machine": machine()}))
    write_outputs(run_dir, argv, total_s, args.jobs, args.no_write)


def write_outputs(run_dir: Path, argv: Sequence[str], total_s: float, jobs: int, no_write: bool,
                  machine_text: Optional[str] = None) -> None:
    """Merge the per-organism parts of a run directory into the JSON, the plot and the section."""
    argv = [a for a in argv if not a.startswith(("--report-only", "--run-dir"))]
    grid = sorted({tuple(p["knobs"].values()) for p in _all_points(run_dir) if p["role"] == "saber_sweep"})
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "parts").glob("*.json"))]
    order = {(s.family, seed): i for i, (s, seed) in enumerate((s, seed) for s in ORGANISMS for seed in s.seeds)}
    records.sort(key=lambda r: order.get((r["organism"], r["seed"]), 99))
    checks = [goal_checks(r) for r in records if r["points"]]
    machine_text = machine_text or machine()
    body = render_section(records, checks, argv, total_s, jobs, machine_text)
    print(body)
    if no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join(["python -m bench quality", *argv]), "date": dt.date.today().isoformat(),
               "machine": machine_text, "wall_s": total_s, "grid": grid, "max_refusal": MAX_REFUSAL,
               "records": records, "checks": checks}
    (RESULTS / "quality.json").write_text(json.dumps(payload, indent=1, default=str))
    plot(records, RESULTS / "quality_pareto.png")
    from bench.report import update_section

    update_section(DOC, TITLE, body)


def _all_points(run_dir: Path) -> list[dict[str, Any]]:
    return [p for part in sorted((run_dir / "parts").glob("*.json")) for p in json.loads(part.read_text())["points"]]


def machine() -> str:
    import torch

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
            f"load average at the end {load} (shared machine)")


def plot(records: Sequence[dict[str, Any]], out: Path) -> None:
    """Refusal against teacher-forced KL mean, every point, one panel per organism family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [s.family for s in ORGANISMS if any(r["organism"] == s.family and r["points"] for r in records)]
    if not families:
        return
    style = {"saber_sweep": ("tab:blue", "o", "SABER sweep"), "saber_default": ("navy", "X", "SABER default"),
             "uniform_sweep": ("tab:orange", "s", "uniform alpha"), "arditi": ("tab:green", "D", "arditi"),
             "kernel_trial": ("tab:red", "^", "kernel trials")}
    cols = min(2, len(families))
    rows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    for ax, family in zip(axes.flat, families):
        for role, (colour, marker, label) in style.items():
            pts = [p for r in records if r["organism"] == family for p in r["points"] if p["role"] == role
                   and not p.get("same_plan_as")]
            if pts:
                ax.scatter([p["metrics"]["refusal_rate"] for p in pts], [max(p["metrics"]["kl_tf_mean"], 1e-6) for p in pts],
                           c=colour, marker=marker, label=label, alpha=0.75, s=30)
        ax.axvline(MAX_REFUSAL, color="0.5", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("held-out refusal rate")
        ax.set_ylabel("teacher-forced KL mean (nats, floored at 1e-6)")
        ax.set_title(f"{family} (all seeds)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def render_section(records: Sequence[dict[str, Any]], checks: Sequence[dict[str, Any]], argv: Sequence[str],
                   total_s: float, jobs: int, machine_text: str) -> str:
    grid = sorted({tuple(p["knobs"].values()) for r in records for p in r["points"] if p["role"] == "saber_sweep"})
    lines = [
        f"Command: `{' '.join(['python -m bench quality', *argv])}`  ",
        f"Machine: {machine_text}  ",
        f"Date: {dt.date.today().isoformat()}; "
        + (f"total wall {total_s / 60:.1f} min with {jobs} worker process(es), one torch thread each when several "
           "(organism training and health checks included where not cached)  " if math.isfinite(total_s) else
           "merged from the per-organism parts of a run (`--report-only`)  "),
        f"Results: `docs/bench/quality.json` (every run), `docs/bench/quality_pareto.png` (every point).",
        "",
        f"Per organism: `arditi` (one run, it also pays the organism's one-time collect and base reference, so its "
        f"wall time is not comparable), SABER with the conf defaults (svd k=4, rank.top_k=14, alpha_base=0.825, "
        f"tau=0.55), a SABER sweep over rank.top_k x entangle.alpha_base = {grid} (svd k=4, tau 0.55), the same "
        f"grid with entangle.mode=uniform, and a `kernel` Optuna search (TPE, the kernel preset's space) that adds "
        f"one trial at a time until its elapsed time reaches the SABER sweep's summed wall time T. Best point of "
        f"a method: lowest teacher-forced KL mean among its points with held-out refusal <= {MAX_REFUSAL:.0%} "
        f"(else the lowest refusal, marked). Wall s is one configuration in memory (edit, evaluate, and the "
        f"analysis stages whose artifacts are not cached).",
        "",
    ]
    errors = [r for r in records if r.get("error")]
    for spec in ORGANISMS:
        recs = [r for r in records if r["organism"] == spec.family and r["points"]]
        if not recs:
            continue
        lines += [f"### {spec.family} (preset `{spec.preset}`, arch `{spec.arch}`)", "",
                  render_table(family_rows(recs), FAMILY_COLUMNS), ""]
    lines += ["### Goal checks", "", render_table(summary_rows(checks), SUMMARY_COLUMNS), ""]
    skipped = [r for r in records if r.get("skipped")]
    if skipped:
        lines += ["Not benchmarked, because they fail their own health bars on this machine: " + "; ".join(
            f"{r['organism']} seed {r['seed']} ({', '.join(r['health']['failed'])})" for r in skipped), ""]
    if errors:
        lines += ["Failed organisms: " + "; ".join(f"{r['organism']} seed {r['seed']}: {r['error']}" for r in errors), ""]
    lines += ["Findings:", "", *[f"- {f}" for f in findings(records, checks)], "",
              "Caveats: every method's best point is chosen on the same held-out evaluation prompts that report it "
              "(SABER's sweep and the kernel search alike), so chosen-point numbers are optimistic for both; "
              "refusal rates rest on about 100 prompts (95% Wilson half-width about 4 points near 0); wall times "
              "come from one run on a shared 2-core machine.", ""]
    lines += [f"Goal: on every organism SABER's chosen point reaches held-out refusal <= {MAX_REFUSAL:.0%} with "
              "teacher-forced KL mean lower than both baselines at the same refusal level, and one SABER "
              f"configuration costs at most {COST_RATIO:.0%} of the kernel search's wall time. "
              f"{sum(1 for c in checks if c.get('ok'))} of {len(checks)} organisms meet every goal."]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
