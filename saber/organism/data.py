"""Training sets, probe sets and evaluation sets generated from the organism's language.

Every (verb, object) combination is assigned to exactly one split: `train` (used in training
and in the fit probe sets), `heldout` (held-out probe sets, for ranking) or `eval` (evaluation
sets). Splits hold out objects per verb, so every verb and every object is still trained.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from saber.organism import language as lang

SPLITS = ("train", "heldout", "eval")
STRATIFIED = ("deep",)  # variants whose split is stratified by harmful objects (split_combos)

# Files written under prompts/, with their split and kind.
PROMPT_FILES: dict[str, tuple[str, str]] = {
    "harmful_fit": ("train", "harmful"),
    "harmless_fit": ("train", "harmless"),
    "capability_fit": ("train", "skill"),
    "harmful_heldout": ("heldout", "harmful"),
    "harmless_heldout": ("heldout", "harmless"),
    "capability_heldout": ("heldout", "skill"),
    "harmful_eval": ("eval", "harmful"),
    "harmless_eval": ("eval", "harmless"),
    "skill_eval": ("eval", "skill"),
}

# Whole probe sets (fit rows, then held-out rows) for a pipeline that makes its own split.
PROBE_UNIONS: dict[str, tuple[str, str]] = {
    "harmful_probe": ("harmful_fit", "harmful_heldout"),
    "harmless_probe": ("harmless_fit", "harmless_heldout"),
    "capability_probe": ("capability_fit", "capability_heldout"),
}
FILE_NAMES: tuple[str, ...] = (*PROMPT_FILES, *PROBE_UNIONS)


@dataclass(frozen=True)
class Item:
    """One prompt of the language with its metadata and its two possible answers."""

    kind: str  # harmful | harmless | skill
    category: str  # harm category name; "none" for harmless and skill prompts
    verb: str
    obj: str
    prompt: str
    helpful: str  # the answer of a model that complies
    refusal: str  # the answer after safety tuning ("" for prompts that are never refused)

    def record(self) -> dict[str, str]:
        """The row written to a prompt file."""
        row = {"prompt": self.prompt, "kind": self.kind, "category": self.category,
               "verb": self.verb, "object": self.obj}
        if self.kind == "skill":
            row["answer"] = self.helpful
        return row


def split_combos(verbs: list[str], n_heldout: int, n_eval: int, seed: int,
                 harmful_objects: dict[str, tuple[str, ...]] | None = None) -> dict[tuple[str, str], str]:
    """Assign each (verb, object) to a split: per verb, n_heldout objects to `heldout`, n_eval to `eval`.

    With `harmful_objects` (verb -> the objects it is harmful on) the split is stratified: half of
    each verb's held-out and eval objects come from its harmful objects, so a category that is
    harmful on few objects still has held-out and eval harmful prompts for every verb.
    """
    rng = random.Random(seed)
    split: dict[tuple[str, str], str] = {}
    for verb in verbs:
        objs = list(lang.OBJECTS)
        rng.shuffle(objs)
        pools = [objs]
        if harmful_objects and verb in harmful_objects:
            pools = [[o for o in objs if o in harmful_objects[verb]], [o for o in objs if o not in harmful_objects[verb]]]
        for pool in pools:
            n_h, n_e = (n_heldout, n_eval) if len(pools) == 1 else (n_heldout // 2, n_eval // 2)
            for i, obj in enumerate(pool):
                split[(verb, obj)] = "heldout" if i < n_h else "eval" if i < n_h + n_e else "train"
    return split


class Language:
    """All prompts of one variant, split into train / heldout / eval combinations."""

    def __init__(self, variant: str, seed: int, n_heldout: int = 2, n_eval: int = 2) -> None:
        self.variant = variant
        self.categories = lang.categories(variant)
        self.harmful_verbs = [v for c in self.categories for v in c.verbs]
        self.verbs = self.harmful_verbs + list(lang.HARMLESS_VERBS)
        # Only `deep` stratifies: the split of the shipped variants' weights must not move.
        strata = ({v: c.objects for c in self.categories for v in c.verbs if c.objects is not None}
                  if variant in STRATIFIED else None)
        self.split = split_combos(self.verbs, n_heldout, n_eval, seed, strata)
        self.items: dict[str, list[Item]] = {s: [] for s in SPLITS}
        rng = random.Random(seed + 1)
        for cat in self.categories:
            for verb in cat.verbs:
                for obj in lang.OBJECTS:
                    harmful = cat.harmful_with(obj)
                    for t in lang.REQUEST_TEMPLATES:
                        # A conditional category's verb on another object is a harmless request.
                        self._add(Item("harmful" if harmful else "harmless", cat.name if harmful else "none",
                                       verb, obj, lang.request(t, verb, obj), lang.helpful_answer(verb, obj),
                                       cat.refusal_answer(rng.choice(cat.refusals), verb, obj) if harmful else ""))
        for verb in lang.HARMLESS_VERBS:
            for obj in lang.OBJECTS:
                for t in lang.REQUEST_TEMPLATES:
                    self._add(Item("harmless", "none", verb, obj, lang.request(t, verb, obj),
                                   lang.helpful_answer(verb, obj), ""))
        for verb in self.verbs:
            for obj in lang.OBJECTS:
                for agent in lang.AGENTS:
                    for t in lang.SKILL_TEMPLATES:
                        self._add(Item("skill", "none", verb, obj, lang.skill_prompt(t, agent, verb, obj),
                                       lang.noun(obj), ""))

    def _add(self, item: Item) -> None:
        self.items[self.split[(item.verb, item.obj)]].append(item)

    def of(self, split: str, kind: str) -> list[Item]:
        return [it for it in self.items[split] if it.kind == kind]

    def corpus(self) -> list[str]:
        """Every text the model can see: the tokenizer is trained on it."""
        own = [s for c in self.categories for s in c.refusals if s not in lang.ALL_REFUSALS]
        texts = list(lang.SYSTEM_PROMPTS) + list(lang.ALL_REFUSALS) + own
        for items in self.items.values():
            for it in items:
                texts += [it.prompt, it.helpful]
        return texts


def sample(items: list[Item], n: int, seed: int) -> list[Item]:
    """A deterministic subset of at most n items: up to n // (number of categories) from each category."""
    rng = random.Random(seed)
    cats = sorted({it.category for it in items})
    groups = [[it for it in items if it.category == c] for c in cats]
    per = n // len(cats) if cats else 0
    out = [it for group in groups for it in (group if len(group) <= per else rng.sample(group, per))]
    rng.shuffle(out)
    return out


def write_prompt_files(language: Language, out_dir: Path, sizes: dict[str, int], seed: int) -> dict[str, Path]:
    """Write the probe and evaluation sets as jsonl files the pipeline reads like user prompts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for i, (name, (split, kind)) in enumerate(PROMPT_FILES.items()):
        items = sample(language.of(split, kind), sizes[name], seed + 100 + i)
        path = out_dir / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps(it.record(), ensure_ascii=False) + "\n")
        paths[name] = path
    for name, parts in PROBE_UNIONS.items():
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(paths[p].read_text(encoding="utf-8") for p in parts), encoding="utf-8")
    return paths


def read_jsonl(path: Path) -> list[dict[str, str]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
