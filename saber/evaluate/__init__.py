"""Evaluation of an edited model against its base: refusal, drift and capability.

Public entry points: `evaluate_models` (two models, no pipeline), `build_reference` +
`evaluate_against_reference` (the base half computed once and stored), `refusal_rate` (the
iteration stopping rule), `write_outputs` and `model_card_text`. See docs/EVALUATION.md.
"""

from saber.evaluate.capability import ExactItem, MCItem, extract_final_number
from saber.evaluate.core import EvalResult, evaluate_against_reference, evaluate_models, refusal_rate
from saber.evaluate.reference import EvalSets, Reference, build_reference, load_reference, save_reference
from saber.evaluate.report import model_card_text, write_outputs
from saber.evaluate.scorers import (ClassifierJudge, KeywordScorer, PrefixScorer, RefusalScorer, make_scorer,
                                    normalise_response)
from saber.evaluate.stats import wilson_interval

__all__ = [
    "ClassifierJudge", "EvalResult", "EvalSets", "ExactItem", "KeywordScorer", "MCItem", "PrefixScorer",
    "Reference", "RefusalScorer", "build_reference", "evaluate_against_reference", "evaluate_models",
    "extract_final_number", "load_reference", "make_scorer", "model_card_text", "normalise_response",
    "refusal_rate", "save_reference", "wilson_interval", "write_outputs",
]
