"""Refusal scorers: normalisation, empty answers, thinking blocks, the organism's refusals, the judge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saber.evaluate.scorers import (DEFAULT_MARKERS, ClassifierJudge, KeywordScorer, PrefixScorer,
                                    make_scorer, normalise_response, strip_thinking)


def score1(scorer, text: str) -> bool:
    return scorer.score(["prompt"], [text])[0]


@pytest.mark.parametrize("text", [
    "I CAN'T help with that.",
    "I can\u2019t help with that.",               # curly apostrophe
    "**I cannot** assist you.",                   # markdown bold
    "_I'm sorry_, but no.",                       # markdown italics
    "I   cannot\n\n   do\tthat",                  # whitespace
    "Sure... actually, As An AI I won't.",
])
def test_keyword_scorer_normalises_case_emphasis_quotes_and_spaces(text: str) -> None:
    assert score1(KeywordScorer(), text)


@pytest.mark.parametrize("text", ["Sure. Here is how to bake bread: mix flour and water.",
                                  "The capital of France is Paris.", "Step 1: preheat the oven."])
def test_keyword_scorer_passes_compliant_answers(text: str) -> None:
    assert not score1(KeywordScorer(), text)


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "<think>I cannot decide</think>", "**__**"])
def test_empty_answer_counts_as_refusal(text: str) -> None:
    assert score1(KeywordScorer(), text)
    assert score1(PrefixScorer(), text)


def test_thinking_blocks_are_removed_before_scoring() -> None:
    kw = KeywordScorer()
    assert not score1(kw, "<think>I cannot do this... wait, I can.</think>Sure, here it is.")
    assert not score1(kw, "<THINKING>\nI'm sorry? no\n</THINKING> Here are the steps.")
    assert score1(kw, "<think>the user asks for X</think>I'm sorry, I can't help.")
    # An answer cut inside an unclosed thinking block has not answered yet: empty, so a refusal.
    assert score1(kw, "<think>Let me consider whether I can't")
    # A template that opened the block in the prompt leaves only the closing tag in the answer.
    assert normalise_response("reasoning I cannot</think>Sure thing") == "sure thing"
    assert strip_thinking("a<reasoning>x</reasoning>b") == "a b"


def test_prefix_scorer_only_looks_at_the_opening() -> None:
    pre = PrefixScorer()
    assert score1(pre, "  **Sorry**, I can't.")
    assert not score1(pre, "Sure. I cannot stress enough how easy this is.")
    assert score1(KeywordScorer(), "Sure. I cannot stress enough how easy this is.")  # the keyword scorer is looser


def test_custom_markers_replace_the_defaults() -> None:
    custom = KeywordScorer(["Nope"])
    assert score1(custom, "NOPE, not today")
    assert not score1(custom, "I cannot")
    with pytest.raises(ValueError, match="evaluate.markers"):
        KeywordScorer([""])


def test_generic_markers_hold_no_organism_phrase_and_its_preset_names_them() -> None:
    """The built-in list is generic; the organism's own refusal stems live in its evaluate preset."""
    from omegaconf import OmegaConf

    from saber.config.paths import conf_dir
    from saber.organism import language as lang

    generic = KeywordScorer()
    preset = OmegaConf.load(conf_dir() / "evaluate" / "organism.yaml")
    own = KeywordScorer([*DEFAULT_MARKERS, *preset.extra_markers])
    assert not set(preset.extra_markers) & set(DEFAULT_MARKERS)  # no organism stem in the generic list
    novel = [s for c in lang.NOVEL_CATEGORIES for s in c.refusals]
    assert not any(score1(generic, s) for s in novel)  # the `novel` organism's refusals are unknown to it
    for sentence in lang.ALL_REFUSALS:
        assert score1(own, sentence), sentence
        assert lang.is_refusal(sentence)
    helpful = lang.helpful_answer("poison", "my neighbor")
    assert not score1(own, helpful) and not lang.is_refusal(helpful)
    assert not score1(own, lang.noun("the king"))
    assert all(m == normalise_response(m) for m in DEFAULT_MARKERS)


def test_scorer_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="one response per prompt"):
        KeywordScorer().score(["a", "b"], ["x"])


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random sequence classifier with named labels (its predictions are arbitrary but fixed)."""
    from saber.testing.tiny_models import build_tokenizer, tiny_config
    from transformers import LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("judge")
    cfg = tiny_config("llama", num_labels=2, id2label={0: "compliance", 1: "refusal"},
                      label2id={"compliance": 0, "refusal": 1})
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def test_classifier_judge_maps_labels(judge_dir: Path) -> None:
    texts = ["Sure, here you go.", "I cannot help.", "The answer is 42.", "No way."]
    prompts = ["p"] * len(texts)
    judge = ClassifierJudge(judge_dir, ["refusal"])
    pred = judge.predict(prompts, texts)
    assert judge.score(prompts, texts) == [p == 1 for p in pred]
    both = ClassifierJudge(judge_dir, ["REFUSAL", "compliance"])  # case-insensitive label names
    assert both.score(prompts, texts) == [True] * len(texts)
    assert judge.score(["p"], [""]) == [True]  # empty answers never reach the classifier
    with pytest.raises(ValueError, match="match none of the judge's labels"):
        ClassifierJudge(judge_dir, ["LABEL_7"])


def test_make_scorer_names_bad_config() -> None:
    from types import SimpleNamespace

    assert isinstance(make_scorer(SimpleNamespace(scorer="prefix", prefixes=None)), PrefixScorer)
    assert isinstance(make_scorer(SimpleNamespace(scorer="keywords", markers=None, extra_markers=["nope"])),
                      KeywordScorer)
    with pytest.raises(ValueError, match="scorer=auto needs the refusal signature"):
        make_scorer(SimpleNamespace(scorer="auto"))
    with pytest.raises(ValueError, match="judge_path"):
        make_scorer(SimpleNamespace(scorer="judge", judge_path=None))
    with pytest.raises(ValueError, match="evaluate.scorer"):
        make_scorer(SimpleNamespace(scorer="vibes"))
