"""Prompt loading (all formats), dedup, fit/held-out splits, overlap checks, bundled sets."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from saber.config.schema import PromptSourceConfig

from saber.prompts import (PromptFileNotFoundError, PromptSet, PromptSetError, assert_disjoint,
                           bundled_sets, load_prompts, load_records, normalise, split_fit_heldout)

ROWS = [
    {"goal": "Explain photosynthesis", "other": "x"},
    {"goal": "  explain   PHOTOSYNTHESIS ", "other": "dup"},
    {"goal": "Name three rivers", "other": "y"},
    {"goal": "   ", "other": "empty"},
    {"goal": "Sum 2 and 3", "other": "z"},
]
EXPECTED = ("Explain photosynthesis", "Name three rivers", "Sum 2 and 3")


def _write(tmp: Path, fmt: str, rows: list[dict] = ROWS) -> Path:
    path = tmp / f"prompts.{fmt}"
    if fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


Source = PromptSourceConfig  # the schema's class: what the pipeline passes


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "parquet"])
@pytest.mark.parametrize("column", [None, "goal"])
def test_tabular_formats_load_with_and_without_column(tmp_path: Path, fmt: str,
                                                      column: str | None) -> None:
    path = _write(tmp_path, fmt)
    ps = load_prompts({"path": str(path), "column": column}, "data.harmful")
    assert ps.texts == EXPECTED
    assert ps.name == "data.harmful" and str(path) in ps.source and "[goal]" in ps.source


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_explicit_other_column(tmp_path: Path, fmt: str) -> None:
    ps = load_prompts(Source(path=str(_write(tmp_path, fmt)), column="other"), "data.x")
    assert ps.texts == ("x", "dup", "y", "empty", "z")


def test_txt_and_json_strings(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\n  second  \nFIRST\n")
    assert load_prompts(Source(path=str(txt)), "k").texts == ("first", "second")
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["a b", "A  B", "c"]))
    assert load_prompts(str(js), "k").texts == ("a b", "c")


def test_auto_column_priority_and_case_insensitive(tmp_path: Path) -> None:
    path = _write(tmp_path, "jsonl", [{"text": "t1", "instruction": "i1"},
                                      {"text": "t2", "instruction": "i2"}])
    assert load_prompts(Source(path=str(path)), "k").texts == ("i1", "i2")
    upper = _write(tmp_path, "csv", [{"FORBIDDEN_PROMPT": "f1", "n": 1}])
    assert load_prompts(Source(path=str(upper)), "k").texts == ("f1",)
    jbb = tmp_path / "jbb.csv"  # JailbreakBench layout: Goal is the request, Behavior a label
    jbb.write_text(",Goal,Target,Behavior,Category\n0,Write a poem,Sure,Poetry,Art\n")
    assert load_prompts(Source(path=str(jbb)), "k").texts == ("Write a poem",)


def test_limit_keeps_first_after_dedup(tmp_path: Path) -> None:
    path = _write(tmp_path, "jsonl")
    assert load_prompts(Source(path=str(path), limit=2), "k").texts == EXPECTED[:2]
    with pytest.raises(PromptSetError, match=r"data\.h\.limit is 0"):
        load_prompts(Source(path=str(path), limit=0), "data.h")


def test_organism_scheme_resolves_against_root(tmp_path: Path) -> None:
    _write(tmp_path, "jsonl")
    ps = load_prompts(Source(path="organism://prompts.jsonl"), "k", roots={"organism": tmp_path})
    assert ps.texts == EXPECTED and ps.source.startswith("organism://prompts.jsonl")
    with pytest.raises(PromptSetError, match=r"data\.h.*organism://.*known schemes: bundled"):
        load_prompts(Source(path="organism://prompts.jsonl"), "data.h")


# ----------------------------------------------------------------------------- errors


def test_missing_file_names_path_and_key(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError) as err:
        load_prompts(Source(path=str(missing)), "data.harmful")
    assert isinstance(err.value, PromptSetError) and isinstance(err.value, PromptFileNotFoundError)
    assert "data.harmful" in str(err.value) and str(missing) in str(err.value)
    with pytest.raises(PromptSetError, match=r"data\.harmful: no bundled prompt set 'nope'.*"
                                             r"available: .*harmful"):
        load_prompts(Source(path="bundled://nope"), "data.harmful")


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "prompts.xlsx"
    path.write_text("x")
    with pytest.raises(PromptSetError, match=r"data\.harmless: .*prompts\.xlsx: unknown "
                                             r"extension '\.xlsx'"):
        load_prompts(Source(path=str(path)), "data.harmless")


def test_wrong_column_lists_available(tmp_path: Path) -> None:
    path = _write(tmp_path, "csv")
    with pytest.raises(PromptSetError, match=r"data\.harmful: .*prompts\.csv: no column 'prompt'"
                                             r"; available columns: goal, other"):
        load_prompts(Source(path=str(path), column="prompt"), "data.harmful")
    nothing = _write(tmp_path, "jsonl", [{"a": "x", "b": "y"}])
    with pytest.raises(PromptSetError, match=r"data\.k: .*prompts\.jsonl: none of the usual .*"
                                             r"one of: a, b"):
        load_prompts(Source(path=str(nothing)), "data.k")
    txt = tmp_path / "p.txt"
    txt.write_text("x\n")
    with pytest.raises(PromptSetError, match=r"data\.k: .*p\.txt: column='goal' was given"):
        load_prompts(Source(path=str(txt), column="goal"), "data.k")


def test_empty_after_cleaning(tmp_path: Path) -> None:
    path = _write(tmp_path, "jsonl", [{"prompt": " "}, {"prompt": ""}])
    with pytest.raises(PromptSetError, match=r"data\.h: .*prompts\.jsonl: no prompts left .*"
                                             r"\(2 rows read\)"):
        load_prompts(Source(path=str(path)), "data.h")


def test_non_text_row_names_index_and_type(tmp_path: Path) -> None:
    path = _write(tmp_path, "jsonl", [{"prompt": "ok"}, {"prompt": 42}])
    with pytest.raises(PromptSetError, match=r"data\.h: .*prompts\.jsonl: row 1 holds int 42, "
                                             r"not text \(column 'prompt'\)"):
        load_prompts(Source(path=str(path)), "data.h")
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["ok", None]))
    with pytest.raises(PromptSetError, match=r"data\.h: .*p\.json: row 1 holds NoneType"):
        load_prompts(Source(path=str(js)), "data.h")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(PromptSetError, match=r"data\.h: .*bad\.jsonl: line 2 is not JSON"):
        load_prompts(Source(path=str(bad)), "data.h")


def test_path_and_hf_exactly_one(tmp_path: Path) -> None:
    with pytest.raises(PromptSetError, match=r"data\.h: set exactly one of data\.h\.path and "
                                             r"data\.h\.hf"):
        load_prompts(Source(), "data.h")
    with pytest.raises(PromptSetError, match=r"exactly one.*path='a\.csv', hf='x/y'"):
        load_prompts(Source(path="a.csv", hf="x/y"), "data.h")


def test_hf_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(PromptSetError, match=r"data\.h: hf='org/set'.*pip install datasets"):
        load_prompts(Source(hf="org/set"), "data.h")


# ----------------------------------------------------------------------------- splits


def _set(n: int) -> PromptSet:
    return PromptSet("data.harmful", tuple(f"prompt number {i}" for i in range(n)), "test")


def test_split_is_deterministic_and_partitions() -> None:
    ps = _set(100)
    fit, held = split_fit_heldout(ps, 0.3, seed=7)
    assert (fit, held) == split_fit_heldout(ps, 0.3, seed=7)
    assert len(held.texts) == 30 and len(fit.texts) == 70
    assert set(fit.texts).isdisjoint(held.texts)
    assert set(fit.texts) | set(held.texts) == set(ps.texts)
    assert list(fit.texts) == [t for t in ps.texts if t in set(fit.texts)]  # order kept
    assert fit.name == "data.harmful[fit]" and held.name == "data.harmful[heldout]"
    other_fit, _ = split_fit_heldout(ps, 0.3, seed=8)
    assert other_fit.texts != fit.texts
    assert_disjoint(fit, held)


@pytest.mark.parametrize("n,frac,expected", [(10, 0.25, 2), (3, 0.01, 1), (3, 0.99, 2), (2, 0.5, 1)])
def test_split_sizes_round_and_keep_both_sides(n: int, frac: float, expected: int) -> None:
    fit, held = split_fit_heldout(_set(n), frac, seed=0)
    assert len(held.texts) == expected and len(fit.texts) == n - expected


def test_split_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"heldout_fraction for data\.harmful is 1\.0"):
        split_fit_heldout(_set(10), 1.0, seed=0)
    with pytest.raises(PromptSetError, match=r"data\.harmful \(test\) has 1 prompt"):
        split_fit_heldout(_set(1), 0.5, seed=0)


def test_assert_disjoint_catches_case_and_whitespace_overlap() -> None:
    a = PromptSet("data.harmful", ("How do I pick a lock?", "Bake bread", "x1", "x2", "x3"), "a.csv")
    b = PromptSet("data.harmful_eval", ("how do i  PICK a lock?\n", "X1", "x2", "x3", "new"),
                  "b.csv")
    with pytest.raises(ValueError) as err:
        assert_disjoint(a, b)
    msg = str(err.value)
    assert "data.harmful (a.csv)" in msg and "data.harmful_eval (b.csv)" in msg
    assert "share 4 prompt(s)" in msg and "How do I pick a lock?" in msg and "'x3'" not in msg
    assert_disjoint(a, PromptSet("c", ("Bake bread now",), "c"))
    assert normalise("  A\tB\u00a0C ") == "a b c"


# ----------------------------------------------------------------------------- bundled


EXPECTED_BUNDLED = {"harmful": 128, "harmful_eval": 100, "harmless": 128, "harmless_eval": 100,
                    "harmless_jbb": 100, "capability_mc": 100, "arc": 50, "gsm8k": 50,
                    "capability": 128, "xstest_safe": 250}


def test_bundled_sets_load_with_expected_sizes() -> None:
    sets = bundled_sets()
    assert set(EXPECTED_BUNDLED) <= set(sets)
    for name, n in EXPECTED_BUNDLED.items():
        ps = load_prompts({"path": f"bundled://{name}"}, f"data.{name}")
        assert len(ps.texts) == n, name
        assert all(t.strip() == t and t for t in ps.texts)
    total = sum(p.stat().st_size for p in sets["harmful"].parent.iterdir())
    assert total < 1_000_000


def test_bundled_eval_sets_are_disjoint_from_fit_sets() -> None:
    load = lambda n: load_prompts(f"bundled://{n}", f"data.{n}")  # noqa: E731
    assert_disjoint(load("harmful"), load("harmful_eval"))
    assert_disjoint(load("harmless"), load("harmless_eval"))
    assert_disjoint(load("capability"), load("capability_mc"))
    fit, held = split_fit_heldout(load("harmful"), 0.3, seed=0)
    assert_disjoint(fit, load("harmful_eval"))
    assert_disjoint(held, load("harmful_eval"))


def test_bundled_records_have_scoring_fields() -> None:
    for name in ("capability_mc", "arc"):
        rows = load_records(f"bundled://{name}", f"evaluate.{name}")
        for row in rows:
            assert len(row["choices"]) == 4 and row["answer"] in range(4)
            assert row["prompt"].startswith(row["question"]) and row["prompt"].endswith("Answer:")
    for row in load_records("bundled://gsm8k", "evaluate.gsm8k_path"):
        float(row["answer"])  # a plain number, no thousands separators
        assert row["solution"].split("####")[-1].strip().replace(",", "") == row["answer"]
        assert row["prompt"] == row["question"]
