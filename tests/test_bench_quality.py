"""The pure parts of bench/bench_quality.py on planted points: selection, goal checks, tables."""

from __future__ import annotations

import math


from bench.bench_quality import (FAMILY_COLUMNS, SUMMARY_COLUMNS, compare_at_level, family_rows, goal_checks,
                                 findings, paired_ablation, render_table, select_best, summary_rows)


def point(role: str, refusal: float, kl: float, skill: float = 1.0, wall: float = 10.0, **knobs: float) -> dict:
    return {"role": role, "method": role, "knobs": dict(knobs), "wall_s": wall, "same_plan_as": None,
            "metrics": {"refusal_rate": refusal, "kl_tf_mean": kl, "skill_accuracy": skill, "kl_tf_p95": 2 * kl,
                        "over_refusal_rate": 0.0, "kl_first_token": kl}}


def test_select_best_prefers_lowest_kl_under_the_refusal_bar() -> None:
    pts = [point("s", 0.00, 0.009, k=1), point("s", 0.02, 0.004, k=2), point("s", 0.10, 0.001, k=3),
           point("s", math.nan, 0.0001, k=4)]
    best, reached = select_best(pts, 0.02)
    # 0.02 is at the bar (inclusive); the 0.10 point has lower KL but misses it; NaN is ignored
    assert reached and best["knobs"] == {"k": 2}


def test_select_best_falls_back_to_lowest_refusal_then_kl() -> None:
    pts = [point("s", 0.30, 0.001, k=1), point("s", 0.10, 0.009, k=2), point("s", 0.10, 0.005, k=3)]
    best, reached = select_best(pts, 0.02)
    assert not reached and best["knobs"] == {"k": 3}
    assert select_best([], 0.02) == (None, False)


def test_compare_at_level() -> None:
    saber = point("s", 0.0, 0.002)
    assert compare_at_level(saber, point("a", 0.01, 0.004))["ok"] is True
    worse = compare_at_level(saber, point("a", 0.0, 0.001))
    assert worse["ok"] is False and abs(worse["kl_ratio"] - 2.0) < 1e-12
    # a baseline that never reaches the refusal level loses on refusal even with a lower KL
    off = compare_at_level(saber, point("k", 0.40, 0.0005))
    assert off["ok"] is True and "only refusal 0.40" in off["note"]
    # SABER above the bar: the level is SABER's own refusal, a baseline below it is compared on KL
    assert compare_at_level(point("s", 0.5, 0.003), point("k", 0.3, 0.002))["ok"] is False
    # an edit that removed nothing (refusal 1, KL ~0) does not beat a baseline that removed some refusal
    noop = compare_at_level(point("s", 1.0, 1e-7), point("a", 0.27, 0.04))
    assert noop["ok"] is False and "lower refusal 0.27" in noop["note"]
    assert compare_at_level(point("s", 1.0, 1e-7), point("a", 0.99, 0.04))["ok"] is None  # both missed the bar


def planted_record() -> dict:
    points = [point("arditi", 0.0, 0.004), point("saber_default", 0.8, 0.001),
              point("saber_sweep", 0.0, 0.003, wall=10.0, **{"rank.top_k": 1, "entangle.alpha_base": 1.0}),
              point("saber_sweep", 0.0, 0.002, wall=10.0, **{"rank.top_k": 2, "entangle.alpha_base": 1.0}),
              point("saber_sweep", 0.3, 0.0005, wall=10.0, **{"rank.top_k": 2, "entangle.alpha_base": 0.9}),
              point("uniform_sweep", 0.0, 0.0025, skill=0.9, **{"rank.top_k": 2, "entangle.alpha_base": 1.0}),
              point("kernel_trial", 0.05, 0.001), point("kernel_trial", 0.0, 0.006)]
    return {"organism": "default/llama", "seed": 0, "health": {"passed": True, "failed": []},
            "sweep_wall_s": 30.0, "kernel_wall_s": 31.0, "points": points}


def test_goal_checks_on_planted_record() -> None:
    checks = goal_checks(planted_record())
    assert checks["saber_knobs"] == {"rank.top_k": 2, "entangle.alpha_base": 1.0} and checks["refusal_ok"]
    assert checks["vs_arditi"]["ok"] and abs(checks["vs_arditi"]["kl_ratio"] - 0.5) < 1e-12
    assert checks["vs_kernel"]["ok"] and abs(checks["vs_kernel"]["kl_ratio"] - 2 / 6) < 1e-12
    # one configuration = 30 s / 3 points = 10 s against a 31 s search: ratio 0.32 > 0.2, a failure
    assert abs(checks["cost_ratio"] - 10 / 31) < 1e-12 and not checks["cost_ok"] and not checks["ok"]
    assert abs(checks["uniform"]["kl_ratio"] - 0.8) < 1e-12 and abs(checks["uniform"]["skill_diff"] - 0.1) < 1e-12


def test_paired_ablation_counts_only_differing_plans_at_equal_refusal() -> None:
    knobs = [{"rank.top_k": k} for k in (1, 2, 3, 4)]
    saber = [point("saber_sweep", 0.0, 0.002, **knobs[0]), point("saber_sweep", 0.0, 0.001, **knobs[1]),
             point("saber_sweep", 0.0, 0.004, skill=0.8, **knobs[2]), point("saber_sweep", 0.0, 0.001, **knobs[3])]
    same = {**point("uniform_sweep", 0.0, 0.002, **knobs[0]), "same_plan_as": knobs[0]}
    uniform = [same, point("uniform_sweep", 0.0, 0.004, **knobs[1]), point("uniform_sweep", 0.01, 0.001, skill=1.0, **knobs[2]),
               point("uniform_sweep", 0.5, 0.0001, **knobs[3])]
    out = paired_ablation(saber + uniform, tol=0.02)
    # knobs[0]: same plan (skipped); knobs[3]: refusal differs by 0.5 (skipped); pairs: ratios 1/4 and 4/1
    assert out["n_differ"] == 3 and out["n_pairs"] == 2 and out["saber_lower"] == 1
    assert abs(out["kl_ratio"] - 1.0) < 1e-12 and abs(out["skill_diff"] - (-0.1)) < 1e-12


def test_tables_render_planted_numbers() -> None:
    record = planted_record()
    rows = family_rows([record])
    methods = [r["method"] for r in rows]
    assert methods[0] == "SABER default" and any(m.startswith("kernel best") and "2 trials" in m for m in methods)
    table = render_table(rows, FAMILY_COLUMNS)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) and all(line.count("|") == len(FAMILY_COLUMNS) + 1 for line in lines)
    assert "| top_k=2 alpha=1 |" in table and "0.002" in table
    summary = render_table(summary_rows([goal_checks(record)]), SUMMARY_COLUMNS)
    assert "FAIL 0.323" in summary and "PASS 0.00" in summary


def test_render_table_cells() -> None:
    table = render_table([{"a": None, "b": math.nan, "c": "x|y", "d": 0.000123456}], [("a", "A"), ("b", "B"),
                                                                                      ("c", "C"), ("d", "D")])
    assert table.splitlines()[2] == "| - | nan | x/y | 0.0001235 |"


def test_findings_state_shortfalls() -> None:
    record = planted_record()
    record["points"][2]["metrics"]["refusal_rate"] = 0.05  # no sweep point at the bar any more but one
    text = " ".join(findings([record], [goal_checks(record)]))
    assert "Refusal <= 2%: 1 of 1 organisms." in text and "0.323 to 0.323" in text
    record["points"][3]["metrics"]["refusal_rate"] = 0.10
    text = " ".join(findings([record], [goal_checks(record)]))
    assert "short on default/llama s0 (refusal 0.05, +0.03)" in text


def test_organism_failing_its_health_bars_is_not_benchmarked(tmp_path, monkeypatch) -> None:
    """The gate: an unhealthy organism gets its health table printed and no quality numbers."""
    from pathlib import Path

    import bench.bench_quality as bq

    organism_dir = Path(tmp_path / "organism")
    monkeypatch.setattr("saber.organism.build_organism", lambda *a, **k: organism_dir)
    monkeypatch.setattr(bq, "health_verdict", lambda *a, **k: {"passed": False, "report": {},
                                                                "failed": ["harmless_refusal 0.07 (bar <= 0.05)"]})
    ran: list[str] = []

    def fake_point(base: list, extra: dict, session: object, method: str, role: str) -> dict:
        ran.append(role)
        return {**point(role, 0.0, 0.001, **extra), "n_entangled": 0}

    monkeypatch.setattr(bq, "run_point", fake_point)
    monkeypatch.setattr(bq, "kernel_search", lambda *a, **k: ([], 0.0))
    record = bq.bench_organism(bq.ORGANISMS[2], 0, tmp_path / "run", bq.QUICK_GRID)
    assert ran == [] and record["points"] == [] and record["skipped"]
    body = bq.render_section([record], [], [], 1.0, 1, "machine")
    assert "Not benchmarked" in body and "harmless_refusal 0.07" in body
    # asked explicitly (--allow-unhealthy), it runs the methods (stubbed here) and keeps the verdict
    record = bq.bench_organism(bq.ORGANISMS[2], 0, tmp_path / "run", bq.QUICK_GRID, allow_unhealthy=True)
    assert ran[:2] == ["arditi", "saber_default"] and record["points"] and not record["health"]["passed"]


def test_many_organism_bench_passes_the_weight_source_through_and_marks_shipped_seeds(tmp_path, monkeypatch) -> None:
    """`--source=auto` reaches the organism build and every role's run; a record whose organism
    has no training health file (the shipped weights) is labelled so in the per-point table."""
    from pathlib import Path

    import bench.bench_defaults as bd

    organism_dir = Path(tmp_path / "organism")
    organism_dir.mkdir()
    sources: list[str] = []

    def fake_build(recipe: object, store: object, source: str, **_: object) -> Path:
        sources.append(source)
        return organism_dir

    monkeypatch.setattr("saber.organism.build_organism", fake_build)
    monkeypatch.setattr(bd, "health_verdict", lambda *a, **k: {"passed": True, "report": {}, "failed": []})
    monkeypatch.setattr("saber.pipeline.ModelSession", lambda: None)
    runs: list[dict] = []

    def fake_point(base: list, extra: dict, session: object, method: str, role: str) -> dict:
        runs.append([*base, *[f"{k}={v}" for k, v in extra.items()]])
        metrics = {c: 0.0 for c in bd.POINT_COLUMNS}
        return {"role": role, "method": method, "wall_s": 1.0, "metrics": metrics}

    monkeypatch.setattr(bd, "run_point", fake_point)
    spec = bd.OrganismSpec("hard/llama", "organism_hard", "llama", ())
    record = bd.bench_one(spec, 3, tmp_path / "run", tmp_path / "store", roles={"a": ("saber", {})}, source="auto")
    assert sources == ["auto"] and "model.organism_source=auto" in runs[0]
    assert record["shipped"] and "| hard/llama | 3 (shipped) | a |" in "\n".join(bd.point_table([record]))
    (organism_dir / "health.json").write_text("{}")  # trained on this machine: carries its health file
    record = bd.bench_one(spec, 3, tmp_path / "run", tmp_path / "store", roles={"a": ("saber", {})})
    assert sources[-1] == "train" and not record["shipped"]
    assert "| hard/llama | 3 | a |" in "\n".join(bd.point_table([record]))


def test_kernel_role_chooses_its_trial_on_held_out_probes(monkeypatch) -> None:
    """The time-matched kernel search gets `both`'s wall time, and its trial is chosen like every
    other role's: on the probes (lowest probe KL within the goal), never on the evaluation sets."""
    import bench.bench_positions as bp

    def trial(n: int, probe_refusal: float, probe_kl: float, eval_kl: float) -> dict:
        return {"method": "kernel", "role": "kernel_trial", "trial": n, "wall_s": 1.0, "knobs": {},
                "metrics": {"refusal_rate": 0.0, "kl_tf_mean": eval_kl},
                "probe": {"refusal_rate": probe_refusal, "kl_tf_mean": probe_kl}}

    trials = [trial(0, 0.5, 0.001, 0.0001),  # best on the evaluation set, misses the goal on the probes
              trial(1, 0.05, 0.02, 0.03), trial(2, 0.0, 0.04, 0.01)]
    budgets: list[float] = []
    monkeypatch.setattr(bp, "kernel_search", lambda base, session, budget, journal: (budgets.append(budget) or trials, 7.0))
    record = {"preset": "organism_deep", "points": {"both": {"wall_s": 42.0}}}
    bp.kernel_role(record, ["model=organism_deep", "store_root=/tmp/x/store"], None)
    assert budgets == [42.0]
    kernel = record["points"]["kernel"]
    assert kernel["trial"] == 1 and kernel["wall_s"] == 7.0 and kernel["n_trials"] == 3


def test_merged_runs_join_the_roles_of_one_organism() -> None:
    """Two runs of the same organism with different --roles report as one organism with every role;
    another seed stays apart."""
    from bench.bench_defaults import merge_records

    def record(seed: int, roles: dict) -> dict:
        return {"family": "deep/llama", "seed": seed, "organism_dir": f"o{seed}", "points": roles}

    out = merge_records([record(5, {"lsq": 1, "both": 2}), record(7, {"lsq": 3}), record(5, {"default": 4, "both": 5})])
    assert [(r["seed"], r["points"]) for r in out] == [(5, {"lsq": 1, "both": 5, "default": 4}), (7, {"lsq": 3})]


def test_verdicts_compare_kl_only_among_roles_that_remove_refusal() -> None:
    """A role's KL is compared with the others that reach the refusal goal: below (1% or more
    lower), level (within 1%) or above; a role that leaves refusal is listed as missing the goal."""
    from bench.bench_positions import verdicts

    def m(refusal: float, kl: float) -> dict:
        return {"metrics": {"refusal_rate": refusal, "refusal_fragment_rate": refusal, "over_refusal_rate": 0.0,
                            "skill_delta": 0.0, "kl_tf_mean": kl}, "wall_s": 1.0}

    record = {"family": "deep/llama", "preset": "organism_deep", "seed": 5, "health": {"passed": True},
              "points": {"default": m(0.0, 0.010), "both": m(0.0, 0.01005), "linear": m(0.0, 0.02),
                         "positions": m(0.0, 0.005), "arditi": m(0.9, 0.001)}}
    (line,) = verdicts([record], "default")
    assert "default meets the bars" in line
    assert "below linear, level with both, above positions" in line and "arditi miss the refusal goal" in line
