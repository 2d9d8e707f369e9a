"""Regenerate the prompt sets bundled in saber/data/prompts from the offline dataset copies.

Usage: python scripts/build_bundled_prompts.py DATA_DIR [--out saber/data/prompts]

DATA_DIR holds the upstream files in the layout described in saber/data/prompts/LICENSES.md
(advbench/, harmbench/, jailbreakbench/, refusal_direction/, mmlu/, arc_challenge/, gsm8k/,
xstest/). Selection is deterministic and independent of numpy or Python versions: candidates
are ordered by sha256 of a salt plus their normalised text and taken greedily, skipping near
duplicates (token Jaccard) of evaluation prompts and of prompts already taken.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SALT = "saber-bundled-v1"
EVAL_NEAR_DUP = 0.5   # token Jaccard at or above which a fit prompt counts as an eval duplicate
SELF_NEAR_DUP = 0.6   # token Jaccard at or above which two picked prompts count as duplicates
MAX_MC_CHARS = 600    # longest MMLU/ARC item (question plus choices) kept, to keep the set small
LETTERS = "ABCDEFGH"


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.casefold()).strip()


def tokens(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", text.casefold()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / max(len(a | b), 1)


def hash_order(rows: Iterable[dict[str, Any]], key: str = "prompt") -> list[dict[str, Any]]:
    """Rows in a pseudo-random order fixed by their text alone, duplicates dropped."""
    seen: set[str] = set()
    unique = []
    for row in rows:
        k = norm(row[key])
        if k and k not in seen:
            seen.add(k)
            unique.append(row)
    return sorted(unique, key=lambda r: hashlib.sha256(f"{SALT}|{norm(r[key])}".encode()).digest())


def pick(rows: Sequence[dict[str, Any]], n: int, avoid: Sequence[str] = (),
         key: str = "prompt") -> list[dict[str, Any]]:
    """First ``n`` hash-ordered rows that are not near duplicates of ``avoid`` or of each other."""
    avoid_tokens = [tokens(t) for t in avoid]
    avoid_norm = {norm(t) for t in avoid}
    taken: list[dict[str, Any]] = []
    taken_tokens: list[frozenset[str]] = []
    for row in hash_order(rows, key):
        t = tokens(row[key])
        if norm(row[key]) in avoid_norm or any(jaccard(t, a) >= EVAL_NEAR_DUP for a in avoid_tokens):
            continue
        if any(jaccard(t, b) >= SELF_NEAR_DUP for b in taken_tokens):
            continue
        taken.append(row)
        taken_tokens.append(t)
        if len(taken) == n:
            return taken
    raise SystemExit(f"only {len(taken)} rows available, {n} wanted")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def mc_prompt(question: str, choices: Sequence[str]) -> str:
    lines = [question.strip()] + [f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")
    print(f"{path.name}: {len(rows)} rows, {path.stat().st_size} bytes")


def build(data: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)

    jbb = read_csv(data / "jailbreakbench" / "harmful-behaviors.csv")
    harmful_eval = [{"prompt": r["Goal"].strip(), "category": r["Category"],
                     "source": f"JailbreakBench ({r['Source']})"} for r in jbb]
    eval_texts = [r["prompt"] for r in harmful_eval]

    adv = [{"prompt": r["goal"].strip(), "category": None, "source": "AdvBench"}
           for r in read_csv(data / "advbench" / "harmful_behaviors.csv")]
    hb = [{"prompt": r["Behavior"].strip(), "category": r["SemanticCategory"],
           "source": "HarmBench standard"}
          for r in read_csv(data / "harmbench" / "harmbench_behaviors_text_all.csv")
          if r["FunctionalCategory"] == "standard"]
    harmful = pick(adv, 64, avoid=eval_texts) + pick(hb, 64, avoid=eval_texts)
    harmful = hash_order(harmful)

    splits = data / "refusal_direction" / "splits"
    alpaca_train = [{"prompt": r["instruction"].strip(), "source": "Alpaca"}
                    for r in json.loads((splits / "harmless_train.json").read_text())]
    alpaca_test = [{"prompt": r["instruction"].strip(), "source": "Alpaca"}
                   for r in json.loads((splits / "harmless_test.json").read_text())]
    harmless = pick(alpaca_train, 128)
    harmless_eval = pick(alpaca_test, 100, avoid=[r["prompt"] for r in harmless])
    benign = [{"prompt": r["goal"].strip(), "category": r["category"], "source": "JailbreakBench benign"}
              for r in read_csv(data / "jailbreakbench" / "benign-behaviors.csv")]

    mmlu_rows = []
    for file in sorted((data / "mmlu" / "test").glob("*_test.csv")):
        subject = file.name[:-len("_test.csv")]
        for r in read_csv(file):
            choices = [r[f"choice{i}"] for i in range(4)]
            if len(r["question"]) + sum(map(len, choices)) > MAX_MC_CHARS:
                continue
            mmlu_rows.append({"prompt": mc_prompt(r["question"], choices),
                              "question": r["question"].strip(), "choices": choices,
                              "answer": int(r["answer"]), "subject": subject})
    mmlu_order = hash_order(mmlu_rows)
    capability_mc = mmlu_order[:100]
    capability_mmlu = mmlu_order[100:196]

    arc_rows = []
    for r in read_jsonl(data / "arc_challenge" / "arc_challenge_test.jsonl"):
        labels = [o["label"] for o in r["options"]]
        choices = [o["text"] for o in r["options"]]
        if len(choices) != 4 or len(r["question"]) + sum(map(len, choices)) > MAX_MC_CHARS:
            continue
        arc_rows.append({"prompt": mc_prompt(r["question"], choices),
                         "question": r["question"].strip(), "choices": choices,
                         "answer": labels.index(r["answer"]), "id": r["id"]})
    arc = hash_order(arc_rows)[:50]

    gsm_rows = []
    for r in read_jsonl(data / "gsm8k" / "test.jsonl"):
        final = r["answer"].split("####")[-1].strip().replace(",", "")
        gsm_rows.append({"prompt": r["question"].strip(), "question": r["question"].strip(),
                         "answer": final, "solution": r["answer"]})
    gsm_order = hash_order(gsm_rows)
    gsm8k = gsm_order[:50]
    capability = [{"prompt": r["prompt"], "source": f"MMLU {r['subject']}"}
                  for r in capability_mmlu]
    capability += [{"prompt": r["prompt"], "source": "GSM8K"} for r in gsm_order[50:82]]

    xstest = [{"prompt": r["prompt"].strip(), "id": int(r["id"]), "type": r["type"],
               "focus": r["focus"]}
              for r in read_csv(data / "xstest" / "xstest_prompts.csv") if r["label"] == "safe"]

    outputs = {
        "harmful": harmful, "harmful_eval": harmful_eval, "harmless": harmless,
        "harmless_eval": harmless_eval, "harmless_jbb": benign, "capability_mc": capability_mc,
        "arc": arc, "gsm8k": gsm8k, "capability": capability, "xstest_safe": xstest,
    }
    for name, rows in outputs.items():
        write_jsonl(out / f"{name}.jsonl", rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="directory with the upstream dataset copies")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "saber" / "data" / "prompts")
    args = parser.parse_args(argv)
    if not (args.data_dir / "jailbreakbench").is_dir():
        print(f"{args.data_dir} does not look like the dataset directory (no jailbreakbench/)",
              file=sys.stderr)
        return 2
    build(args.data_dir, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
