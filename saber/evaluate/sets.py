"""Load the evaluation's prompt sets and capability probes from the data and evaluate configs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from saber.evaluate.capability import ExactItem, MCItem
from saber.evaluate.reference import EvalSets
from saber.prompts import PromptSetError, load_prompts, load_records, resolve_path

log = logging.getLogger("saber.evaluate")
_LETTERS = "ABCDEFGHIJ"


def _texts(source: Any, key: str, n: int, roots: Mapping[str, Path], n_key: str) -> list[str]:
    if source is None or n == 0:
        return []
    texts = list(load_prompts(source, key, roots).texts)
    if n > len(texts):
        log.warning("%s = %d but %s has only %d prompts; all %d are scored", n_key, n, key, len(texts), len(texts))
    return texts[:n]


def _unknown_scheme(path: str, roots: Mapping[str, Path]) -> bool:
    if "://" not in path:
        return False
    scheme = path.split("://", 1)[0]
    return scheme != "bundled" and scheme not in roots


def _records(path: str | None, key: str, n: int, roots: Mapping[str, Path]) -> list[Any]:
    if not path or n == 0:
        return []
    if _unknown_scheme(path, roots):
        log.info("%s = %s: no %s:// root for this model; probe skipped", key, path, path.split("://")[0])
        return []
    return load_records(path, key, roots)[:n]


def parse_mc(rows: list[Any], key: str) -> list[MCItem]:
    """MMLU / ARC rows: question (or prompt), choices (list), answer (index or letter)."""
    items = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "choices" not in row or "answer" not in row:
            raise PromptSetError(f"{key}: row {i} needs 'question', 'choices' and 'answer' (index) fields")
        choices = tuple(str(c) for c in row["choices"])
        answer = row["answer"]
        if isinstance(answer, str) and not answer.strip().isdigit():
            answer = _LETTERS.index(answer.strip().upper()) if answer.strip().upper() in _LETTERS else -1
        answer = int(answer)
        if not 0 <= answer < len(choices) or len(choices) < 2:
            raise PromptSetError(f"{key}: row {i} has answer {row['answer']!r} outside its {len(choices)} choices")
        items.append(MCItem(str(row.get("question") or row.get("prompt")), choices, answer))
    return items


def parse_exact(rows: list[Any], key: str) -> list[ExactItem]:
    """Rows with a prompt (or question) and an answer string."""
    items = []
    for i, row in enumerate(rows):
        prompt = row.get("prompt") or row.get("question") if isinstance(row, Mapping) else None
        if not prompt or "answer" not in row:
            raise PromptSetError(f"{key}: row {i} needs 'prompt' (or 'question') and 'answer' fields")
        items.append(ExactItem(str(prompt), str(row["answer"])))
    return items


def load_eval_sets(ecfg: Any, data: Any, roots: Mapping[str, Path]) -> EvalSets:
    """EvalSets from `evaluate` and `data` config subtrees, each set cut to its configured size."""
    mc = {}
    for path in ecfg.mc_paths or []:
        name = Path(path.split("://", 1)[-1]).stem
        items = parse_mc(_records(path, "evaluate.mc_paths", ecfg.n_capability, roots), f"evaluate.mc_paths[{path}]")
        if items:
            mc[name] = items
    text = None
    if ecfg.reference_text:
        text = resolve_path(ecfg.reference_text, "evaluate.reference_text", roots).read_text(encoding="utf-8")
    return EvalSets(
        harmful=_texts(data.harmful_eval, "data.harmful_eval", ecfg.n_harmful, roots, "evaluate.n_harmful"),
        harmless=_texts(data.harmless_eval, "data.harmless_eval", ecfg.n_harmless, roots, "evaluate.n_harmless"),
        xstest=_texts(data.xstest, "data.xstest", ecfg.n_xstest, roots, "evaluate.n_xstest"),
        mc=mc,
        gsm8k=parse_exact(_records(ecfg.gsm8k_path, "evaluate.gsm8k_path", ecfg.n_gsm8k, roots), "evaluate.gsm8k_path"),
        skill=parse_exact(_records(ecfg.skill_path, "evaluate.skill_path", ecfg.n_capability, roots),
                          "evaluate.skill_path"),
        reference_text=text,
    )


def heldout_eval_sets(collect_dir: Path) -> EvalSets:
    """Collect's held-out probe prompts as an evaluation: what sweeps and searches choose on, so
    that the evaluation sets only report."""
    import pandas as pd

    from saber.collect import PROMPTS_FILE

    prompts = pd.read_parquet(Path(collect_dir) / PROMPTS_FILE)
    heldout = prompts[prompts["split"] == "heldout"]
    return EvalSets(harmful=heldout[heldout["kind"] == "harmful"]["text"].tolist(),
                    harmless=heldout[heldout["kind"] == "harmless"]["text"].tolist())
