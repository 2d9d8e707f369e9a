"""Prompt sets: loading from files, bundled sets or Hugging Face datasets, dedup and splits.

A prompt source (``conf/data``) names exactly one of ``path`` or ``hf``. ``path`` is a local
file (csv, json, jsonl, parquet, txt), ``bundled://<name>`` (a set shipped in
``saber/data/prompts``) or ``<scheme>://<file>`` resolved against ``roots[scheme]`` (for
example ``organism://`` against the trained organism's directory). Texts are stripped, empty
ones dropped, and duplicates removed on normalised text (casefold, NFKC, collapsed whitespace)
keeping the first occurrence, before ``limit`` keeps the first N.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BUNDLED_DIR = Path(__file__).resolve().parent / "data" / "prompts"
# Auto-detected text columns in priority order, matched case-insensitively (exact case first):
# JailbreakBench has both Goal (the request) and Behavior (a short label), so goal comes first.
TEXT_COLUMNS = ("prompt", "instruction", "goal", "behavior", "forbidden_prompt", "question", "text")
EXTENSIONS = (".csv", ".json", ".jsonl", ".parquet", ".txt")
_WS = re.compile(r"\s+")


class PromptSetError(ValueError):
    """A prompt source is malformed, misconfigured, or yields no usable prompts."""


class PromptFileNotFoundError(PromptSetError, FileNotFoundError):
    """A configured prompt file does not exist (catchable as either parent)."""


@dataclass(frozen=True)
class PromptSet:
    """An ordered, deduplicated tuple of prompt texts and where they came from."""

    name: str
    texts: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def normalise(text: str) -> str:
    """Comparison key for dedup and overlap checks: NFKC, casefold, single spaces, stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def bundled_sets() -> dict[str, Path]:
    """Names and files of the prompt sets shipped with the package."""
    return {p.stem: p for p in sorted(BUNDLED_DIR.glob("*.jsonl"))}


# ----------------------------------------------------------------------------- sources


def _source_config(source: Any) -> Any:
    """A PromptSourceConfig from one, from a mapping of its keys, or from a bare path."""
    from saber.config.schema import PromptSourceConfig

    if isinstance(source, PromptSourceConfig):
        return source
    if isinstance(source, (str, Path)):
        return PromptSourceConfig(path=str(source))
    if isinstance(source, Mapping):
        return PromptSourceConfig(**dict(source))
    raise TypeError(f"a prompt source must be a PromptSourceConfig, a mapping or a path, got {type(source).__name__}")


def resolve_path(path: str, key: str, roots: Mapping[str, Path] | None = None) -> Path:
    """Turn ``bundled://x``, ``<scheme>://file`` or a plain path into an existing file path."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        if scheme == "bundled":
            sets = bundled_sets()
            name = rest[:-len(".jsonl")] if rest.endswith(".jsonl") else rest
            if name not in sets:
                raise PromptFileNotFoundError(f"{key}: no bundled prompt set {rest!r} (path {path!r}); "
                                     f"available: {', '.join(sets) or '(none)'}")
            return sets[name]
        if not roots or scheme not in roots:
            known = ", ".join(["bundled", *sorted(roots or {})])
            raise PromptSetError(f"{key}: path {path!r} uses scheme {scheme}:// but no root "
                                 f"directory is known for it; known schemes: {known}")
        resolved = Path(roots[scheme]) / rest
    else:
        resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise PromptFileNotFoundError(f"{key}: prompt file {str(resolved)!r} (from path {path!r}) does "
                             "not exist; fix the path or point it at bundled://<name>")
    return resolved


def load_records(path: str, key: str, roots: Mapping[str, Path] | None = None) -> list[Any]:
    """Raw rows of a prompt file (dicts, or strings for txt/list-of-strings json).

    For consumers that need more than the text, such as multiple-choice or GSM8K rows.
    """
    return _read_file(resolve_path(path, key, roots), key)


def _read_file(path: Path, key: str) -> list[Any]:
    ext = path.suffix.lower()
    where = f"{key}: {path}"
    try:
        if ext == ".txt":
            return [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
        if ext == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise PromptSetError(f"{where}: expected a JSON list of strings or objects, got "
                                     f"{type(data).__name__}")
            return data
        if ext == ".jsonl":
            rows = []
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise PromptSetError(f"{where}: line {lineno} is not JSON ({exc})") from exc
            return rows
        if ext in (".csv", ".parquet"):
            import pandas as pd

            frame = (pd.read_csv(path, dtype=str, keep_default_na=False) if ext == ".csv"
                     else pd.read_parquet(path))
            frame.columns = [str(c) for c in frame.columns]
            return frame.to_dict(orient="records")
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, OSError) as exc:
        if isinstance(exc, PromptSetError):
            raise
        raise PromptSetError(f"{where}: cannot be read as {ext[1:]} ({exc})") from exc
    raise PromptSetError(f"{where}: unknown extension {ext or '(none)'!r}; use one of "
                         f"{', '.join(EXTENSIONS)}")


def _read_hf(name: str, split: str, key: str) -> tuple[list[Any], str]:
    try:
        import datasets
    except ImportError as exc:
        raise PromptSetError(f"{key}: hf={name!r} needs the Hugging Face datasets library; "
                             "pip install datasets, or use a local file via path") from exc
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many unrelated types
        raise PromptSetError(f"{key}: cannot load hf={name!r} split={split!r} ({exc})") from exc
    return [dict(row) for row in ds], f"hf://{name}[{split}]"


def _pick_column(rows: list[Any], column: str | None, where: str) -> str | None:
    """Column holding the text; None when rows are bare strings."""
    first = next((r for r in rows if isinstance(r, Mapping)), None)
    if first is None:
        if column is not None:
            raise PromptSetError(f"{where}: column={column!r} was given but the rows are plain "
                                 "strings without columns; drop the column setting")
        return None
    available = list(first.keys())
    if column is not None:
        if column not in available:
            raise PromptSetError(f"{where}: no column {column!r}; available columns: "
                                 f"{', '.join(map(str, available))}")
        return column
    for candidate in TEXT_COLUMNS:
        matches = [c for c in available if str(c).casefold() == candidate]
        if matches:
            return candidate if candidate in matches else matches[0]
    raise PromptSetError(f"{where}: none of the usual text columns ({', '.join(TEXT_COLUMNS)}) "
                         f"found; set column to one of: {', '.join(map(str, available))}")


def _texts(rows: list[Any], column: str | None, where: str) -> list[str]:
    texts = []
    for index, row in enumerate(rows):
        if column is None:
            value = row
        elif not isinstance(row, Mapping):
            raise PromptSetError(f"{where}: row {index} is a {type(row).__name__}, not an object "
                                 f"with column {column!r}")
        elif column not in row:
            raise PromptSetError(f"{where}: row {index} has no column {column!r}")
        else:
            value = row[column]
        if not isinstance(value, str):
            raise PromptSetError(f"{where}: row {index} holds {type(value).__name__} "
                                 f"{value!r:.60}, not text" + (f" (column {column!r})"
                                                               if column else ""))
        texts.append(value.strip())
    return texts


def dedup(texts: Sequence[str]) -> list[str]:
    """Drop empty texts and later duplicates of a normalised text, keeping order."""
    seen: set[str] = set()
    kept = []
    for text in texts:
        norm = normalise(text)
        if norm and norm not in seen:
            seen.add(norm)
            kept.append(text)
    return kept


def load_prompts(source: Any, key: str, roots: Mapping[str, Path] | None = None) -> PromptSet:
    """Load one configured prompt source (Mapping, config object, or a bare path string).

    ``key`` is the config key (e.g. ``data.harmful``) quoted in every error message.
    """
    source = _source_config(source)
    path, hf, column, limit = source.path, source.hf, source.column, source.limit
    split = source.split or "train"
    if (path is None) == (hf is None):
        raise PromptSetError(f"{key}: set exactly one of {key}.path and {key}.hf (got path="
                             f"{path!r}, hf={hf!r})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise PromptSetError(f"{key}.limit is {limit!r}; use a positive integer or null")
    if path is not None:
        file = resolve_path(str(path), key, roots)
        rows, origin = _read_file(file, key), str(path) if "://" in str(path) else str(file)
        where = f"{key}: {file}"
    else:
        rows, origin = _read_hf(str(hf), str(split), key)
        where = f"{key}: {origin}"
    chosen = _pick_column(rows, column, where)
    texts = dedup(_texts(rows, chosen, where))
    if not texts:
        raise PromptSetError(f"{where}: no prompts left after dropping empty rows and duplicates "
                             f"({len(rows)} rows read)")
    if limit is not None:
        texts = texts[:limit]
    label = origin + (f" [{chosen}]" if chosen else "") + (f" limit={limit}" if limit else "")
    return PromptSet(name=key, texts=tuple(texts), source=label)


# ----------------------------------------------------------------------------- splits


def split_fit_heldout(prompts: PromptSet, heldout_fraction: float,
                      seed: int) -> tuple[PromptSet, PromptSet]:
    """Split into (fit, heldout), deterministic in ``seed`` and the set's order.

    The held-out part is ``round(n * heldout_fraction)`` prompts (at least 1 and at most n - 1)
    chosen by a seeded numpy permutation of positions, so the same prompts in another order
    split differently. Each part keeps the original relative order.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction for {prompts.name} is {heldout_fraction!r}; use a "
                         "fraction strictly between 0 and 1")
    n = len(prompts.texts)
    if n < 2:
        raise PromptSetError(f"{prompts.name} ({prompts.source}) has {n} prompt(s); a fit/"
                             "held-out split needs at least 2")
    n_heldout = min(max(int(round(n * heldout_fraction)), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    held = np.sort(order[:n_heldout])
    fit = np.sort(order[n_heldout:])
    return (
        PromptSet(f"{prompts.name}[fit]", tuple(prompts.texts[i] for i in fit), prompts.source),
        PromptSet(f"{prompts.name}[heldout]", tuple(prompts.texts[i] for i in held),
                  prompts.source),
    )


def assert_disjoint(a: PromptSet, b: PromptSet) -> None:
    """Raise ValueError if the sets share a prompt (modulo case and whitespace)."""
    keys_b = {normalise(t) for t in b.texts}
    shared = [t for t in a.texts if normalise(t) in keys_b]
    if shared:
        examples = "; ".join(repr(t[:80]) for t in shared[:3])
        raise ValueError(f"prompt sets {a.name} ({a.source}) and {b.name} ({b.source}) share "
                         f"{len(shared)} prompt(s), e.g. {examples}; remove the overlap so "
                         "evaluation stays held out")
