"""Evaluation pieces with planted answers: Wilson intervals, multiple choice, GSM8K extraction,
the stored reference, outputs, and exported-vs-in-memory equivalence."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_divergence import PROMPTS, Perturb, eval_cfg, load, prompt_width, sets, tiny_dir  # noqa: E402,F401

from saber.evaluate import (EvalSets, ExactItem, MCItem, build_reference, evaluate_against_reference,  # noqa: E402
                            evaluate_models, extract_final_number, load_reference, model_card_text,
                            refusal_rate, save_reference, wilson_interval, write_outputs)
from saber.evaluate.capability import mc_accuracy, mc_choice_scores, text_match  # noqa: E402
from saber.evaluate.generation import encode_prompts, encode_text  # noqa: E402
from saber.evaluate.scorers import KeywordScorer  # noqa: E402
from saber.evaluate.sets import load_eval_sets  # noqa: E402
from saber.evaluate.stats import aggregate, proportion  # noqa: E402

# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("k,n,lo,hi", [
    (0, 10, 0.0, 0.2775),      # published Wilson score intervals (Newcombe 1998), 4 decimals
    (5, 10, 0.2366, 0.7634),
    (81, 263, 0.2553, 0.3662),
    (10, 10, 0.7225, 1.0),
])
def test_wilson_interval_known_values(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(k, n)
    # Half a unit of the 4th decimal: the published values are rounded to 4 places.
    assert got[0] == pytest.approx(lo, abs=5e-5) and got[1] == pytest.approx(hi, abs=5e-5)


def test_wilson_interval_matches_scipy() -> None:
    from scipy.stats import binomtest

    for k, n in [(0, 1), (3, 7), (50, 100), (99, 100), (1, 1000)]:
        ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_empty_statistics_are_nan_with_warning() -> None:
    with pytest.warns(RuntimeWarning):
        assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.warns(RuntimeWarning):
        assert math.isnan(aggregate([], "kl")["mean"])
    assert math.isnan(proportion([])["rate"])


def test_aggregate_formulas() -> None:
    agg = aggregate([0.0, 0.0, 0.0, 4.0])
    assert agg["mean"] == 1.0 and agg["rmse"] == 2.0 and agg["max"] == 4.0
    assert agg["p95"] == pytest.approx(0.0 + 0.85 * 4.0)  # numpy linear interpolation between 0 and 4


# ----------------------------------------------------------------------------- exact match


@pytest.mark.parametrize("text,expected", [
    ("She loses $8 + $1.40 + $1.60 = $11\n#### 11", "11"),
    ("So the answer is 1,250.", "1250"),
    ("Total: 3 apples and 4 pears, so 7", "7"),
    ("The answer: -2.50 dollars", "-2.5"),
    ("#### 12.0", "12"),
    ("no number here", None),
    ("", None),
])
def test_gsm8k_final_number_extraction(text: str, expected: str | None) -> None:
    assert extract_final_number(text) == expected


def test_bundled_gsm8k_answers_parse() -> None:
    from saber.prompts import load_records

    rows = load_records("bundled://gsm8k", "test")
    assert rows and all(extract_final_number(r["answer"]) is not None for r in rows)
    # The worked solution ends with the same number as the answer field.
    assert all(extract_final_number(r["solution"]) == extract_final_number(r["answer"])
               for r in rows if "solution" in r)


def test_text_match_for_skill_answers() -> None:
    assert text_match("Neighbor.\nmore text", "neighbor")
    assert text_match("<think>hmm</think> the king", "The king")
    assert not text_match("my neighbor", "neighbor")
    assert not text_match("", "neighbor")


# ----------------------------------------------------------------------------- multiple choice


def test_mc_log_likelihood_picks_a_planted_answer(tiny_dir: Path) -> None:
    base, tok = load(tiny_dir)
    choices = ("xq", "zv", "kj", "wy")
    ids = [set(c) for c in encode_text(tok, list(choices))]
    assert all(not (ids[i] & ids[j]) for i in range(4) for j in range(4) if i != j)  # disjoint tokens
    items = [MCItem(q, choices, ans) for q, ans in zip(PROMPTS[:4], [2, 0, 3, 1])]
    base_acc = mc_accuracy(mc_choice_scores(base, tok, items, 16), items)
    for item in items:
        planted, _ = load(tiny_dir)
        bias = torch.zeros(base.config.vocab_size)
        bias[sorted(ids[item.answer])] = 30.0
        width = max(len(x) for x in encode_prompts(tok, [item.question]))
        Perturb(planted, width, None, bias)
        scores = mc_choice_scores(planted, tok, [item], 16)[0]
        assert max(range(4), key=lambda i: scores[i]) == item.answer, scores
    assert len(base_acc) == 4


# ----------------------------------------------------------------------------- reference and outputs


def test_reference_roundtrip_gives_identical_numbers(tiny_dir: Path, tmp_path: Path) -> None:
    base, tok = load(tiny_dir)
    edited, _ = load(tiny_dir)
    torch.manual_seed(5)
    Perturb(edited, prompt_width(tok), range(1, 100), torch.randn(base.config.vocab_size))
    cfg = eval_cfg(kl_topk=32)
    ev = EvalSets(harmful=PROMPTS[:2], harmless=PROMPTS, skill=[ExactItem(PROMPTS[0], "x")],
                  mc={"toy": [MCItem(PROMPTS[1], ("xq", "zv"), 1)]}, reference_text="The quick brown fox. " * 20)
    ref = build_reference(base, tok, ev, cfg, KeywordScorer())
    save_reference(ref, tmp_path)
    again = load_reference(tmp_path)
    a = evaluate_against_reference(edited, tok, ev, ref, cfg, KeywordScorer())
    b = evaluate_against_reference(edited, tok, ev, again, cfg, KeywordScorer())
    assert a.metrics == b.metrics
    assert a.metrics["kl_tf_mean"] > 0 and "ppl_delta_reference_text" in a.metrics
    assert set(a.generations["set"]) == {"harmful", "harmless", "skill"}

    out = tmp_path / "out"
    out.mkdir()
    files = write_outputs(a, out, extra={"method": "saber"})
    assert {"summary.json", "generations.parquet", "divergence.parquet", "report.md", "kl_profile.png"} <= set(files)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["headline"]["kl_tf_mean"] == pytest.approx(a.metrics["kl_tf_mean"])
    card = model_card_text(summary, method="saber", config={"entangle": {"tau": 0.55}})
    assert "teacher-forced KL, mean" in card and "tau" in card and "refusal rate" in card


def test_refusal_rate_uses_the_scorer(tiny_dir: Path) -> None:
    base, tok = load(tiny_dir)
    cfg = eval_cfg()
    assert refusal_rate(base, tok, PROMPTS[:3], cfg, KeywordScorer(["\u0000never"])) == 0.0
    # An empty-string marker is rejected, so plant one the tiny model's noise always contains: nothing;
    # instead force EOS first: an empty answer is a refusal.
    silent, _ = load(tiny_dir)
    eos = torch.zeros(base.config.vocab_size)
    eos[tok.eos_token_id] = 1e4
    Perturb(silent, prompt_width(tok, PROMPTS[:3]), {0}, eos)
    assert refusal_rate(silent, tok, PROMPTS[:3], cfg, KeywordScorer()) == 1.0
    with pytest.warns(RuntimeWarning):
        assert math.isnan(refusal_rate(base, tok, [], cfg))


def test_load_eval_sets_from_bundled_files() -> None:
    from saber.config import DataConfig, EvaluateConfig, PromptSourceConfig

    data = DataConfig(harmful_eval=PromptSourceConfig(path="bundled://harmful_eval"),
                      harmless_eval=PromptSourceConfig(path="bundled://harmless_eval"),
                      xstest=PromptSourceConfig(path="bundled://xstest_safe"))
    ecfg = EvaluateConfig(n_harmful=5, n_harmless=4, n_xstest=3, n_capability=6, n_gsm8k=2)
    ev = load_eval_sets(ecfg, data, {})
    assert (len(ev.harmful), len(ev.harmless), len(ev.xstest), len(ev.gsm8k)) == (5, 4, 3, 2)
    assert set(ev.mc) == {"capability_mc", "arc"} and all(len(v) == 6 for v in ev.mc.values())
    assert all(0 <= it.answer < len(it.choices) for v in ev.mc.values() for it in v)
    assert ev.skill == []  # organism:// has no root for a non-organism model: skipped


# ----------------------------------------------------------------------------- exported vs in memory


@pytest.mark.slow
def test_exported_model_and_in_memory_plan_give_identical_numbers(tiny_dir: Path, tmp_path: Path) -> None:
    from saber.edit import EditConfig, EditPlan, PlanRow, apply_plan, export_edited

    base, tok = load(tiny_dir)
    d = base.config.hidden_size
    gen = torch.Generator().manual_seed(7)
    plan = EditPlan(rows=[PlanRow(0, 0, 0, 1.0, "v0"), PlanRow(1, 0, 1, 0.8, "v1")],
                    vectors={"v0": torch.randn(d, generator=gen), "v1": torch.randn(d, generator=gen)})
    cfg = eval_cfg()
    ref = build_reference(base, tok, sets(), cfg, KeywordScorer())

    exported_dir = export_edited(tiny_dir, tmp_path / "edited", plan, EditConfig())
    exported, _ = load(exported_dir)
    res_exported = evaluate_against_reference(exported, tok, sets(), ref, cfg, KeywordScorer())

    in_memory, _ = load(tiny_dir)
    handle = apply_plan(in_memory, plan, EditConfig())
    res_memory = evaluate_against_reference(in_memory, tok, sets(), ref, cfg, KeywordScorer())
    handle.revert()

    assert res_exported.metrics["kl_tf_mean"] > 1e-4  # the plan really changed the model
    for key, value in res_exported.metrics.items():
        other = res_memory.metrics[key]
        assert (math.isnan(value) and math.isnan(other)) or value == pytest.approx(other, abs=1e-6), key
    assert list(res_exported.generations["edited_response"]) == list(res_memory.generations["edited_response"])
    # And evaluate_models (base + edited objects) agrees with the stored-reference path.
    direct = evaluate_models(base, exported, tok, sets(), cfg, KeywordScorer())
    assert direct.metrics["kl_tf_mean"] == pytest.approx(res_exported.metrics["kl_tf_mean"], abs=1e-9)


# ----------------------------------------------------------------------------- the stage


@pytest.mark.slow
def test_stage_reuses_reference_and_matches_exported_and_in_memory(tiny_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import saber.evaluate as ev_mod
    from saber.config import PromptSourceConfig, SaberConfig
    from saber.edit import EditPlan, PlanRow, export_edited, save_plan
    from saber.pipeline import Pipeline, StageContext
    from saber.store import Artifact
    from stages import evaluate as stage

    cfg = SaberConfig()
    cfg.model.path = str(tiny_dir)
    cfg.store_root = str(tmp_path / "store")
    cfg.data.harmful_eval = PromptSourceConfig(path="bundled://harmful_eval")
    cfg.data.harmless_eval = PromptSourceConfig(path="bundled://harmless_eval")
    e = cfg.evaluate
    e.n_harmful, e.n_harmless, e.n_xstest, e.max_new_tokens, e.kl_tokens = 3, 4, 0, 6, 6
    e.mc_paths, e.gsm8k_path, e.skill_path = [], None, None  # probes are covered above; keep this fast
    e.scorer, e.probe_metrics = "keywords", False  # no probe sets here (the auto scorer and probe metrics have their own tests)
    pipeline = Pipeline(cfg)

    d = 64
    plan = EditPlan(rows=[PlanRow(0, 0, 0, 1.0, "v0")], vectors={"v0": torch.randn(d, generator=torch.Generator().manual_seed(3))})
    save_plan(plan, tmp_path / "plan")
    plan_art = Artifact("entangle", "f" * 64, tmp_path / "plan", {})
    export_edited(tiny_dir, tmp_path / "edit_exported" / "model", plan, cfg.edit)
    (tmp_path / "edit_plans_only").mkdir()

    builds = []
    real = ev_mod.build_reference
    monkeypatch.setattr(ev_mod, "build_reference", lambda *a, **k: builds.append(1) or real(*a, **k))
    results = {}
    for name in ("edit_exported", "edit_plans_only"):
        ctx = StageContext(cfg, pipeline, 0, {"edit": Artifact("edit", "e" * 64, tmp_path / name, {})}, [plan_art])
        out = tmp_path / f"out_{name}"
        out.mkdir()
        meta = stage.build(ctx, out)
        results[meta["source"]] = json.loads((out / "summary.json").read_text())["headline"]
    assert len(builds) == 1  # the base reference was computed once and then read from the store
    assert set(results) == {"exported", "in_memory"}
    assert results["exported"]["kl_tf_mean"] > 0
    for key, value in results["exported"].items():
        assert value == pytest.approx(results["in_memory"][key], abs=1e-6, nan_ok=True), key


def test_residual_proxy_fdr_sees_a_planted_direction(tiny_dir: Path) -> None:
    from saber.evaluate.proxy import fdr_table, residual_refusal_proxy

    gen = torch.Generator().manual_seed(0)
    d = 16
    v = torch.zeros(d)
    v[0] = 1.0
    a = torch.randn(200, d, generator=gen)
    h = torch.randn(200, d, generator=gen) + 3.0 * v  # harmful shifted by 3 sd along v only
    table = fdr_table([h], [a], {0: torch.stack([v, torch.eye(d)[1]])}, 1e-8)
    fdr_v, fdr_orth = table["fdr"].tolist()
    # Expected FDR along v: 3^2 / (1 + 1) = 4.5; sampling error of 200 rows is ~10-15%.
    assert 3.5 < fdr_v < 5.5 and fdr_orth < 0.1

    base, tok = load(tiny_dir)
    dirs = {layer: torch.randn(2, base.config.hidden_size, generator=gen) for layer in range(2)}
    out = residual_refusal_proxy(base, tok, PROMPTS[:3], PROMPTS[3:], dirs)
    assert len(out) == 4 and out["fdr"].notna().all() and (out["fdr"] >= 0).all()
