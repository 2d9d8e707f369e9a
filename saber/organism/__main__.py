"""`python -m saber.organism --preset organism`: load the shipped organism (or train one) and check its health.

Without --train the shipped weights of the preset are loaded (hash verified) and the health table
is measured on this machine. --train trains from the recipe into the store, prints the health
table and says whether the result reproduces the shipped weights (bit-identical training holds
only on one machine, so on another CPU it is expected to differ). --export DIR writes a trained
organism in shipped form (16-bit shards, prompts, organism.json with hash and health).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from saber.organism.build import build_organism, read_health, train_organism
from saber.organism.health import format_health, health_check, verdict
from saber.organism.recipe import OrganismRecipe, load_preset


def build_parser() -> argparse.ArgumentParser:
    """The command line; repeated `--set` flags add up (a later one used to replace the earlier ones)."""
    parser = argparse.ArgumentParser(prog="python -m saber.organism", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="organism", help="conf/model preset: organism | organism_hard | organism_deep | organism_novel")
    parser.add_argument("--store", default="outputs/store", help="artifact store root (trained organisms)")
    parser.add_argument("--train", action="store_true", help="train from the recipe instead of loading shipped weights")
    parser.add_argument("--force", action="store_true", help="with --train: retrain even if the store has it")
    parser.add_argument("--export", type=Path, metavar="DIR",
                        help="with --train: write the trained organism in shipped form into the new directory DIR")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="override recipe keys, e.g. --set seed=3 arch=gemma3 (implies training)")
    return parser


def recipe_overrides(items: list[str]) -> dict[str, Any]:
    """The `--set` items as recipe keys; a key given twice is an error, not a silent choice."""
    overrides: dict[str, Any] = {}
    for key, value in (_parse(item) for item in items):
        if key in overrides:
            raise SystemExit(f"python -m saber.organism: --set {key} is given twice ({overrides[key]!r} and "
                             f"{value!r}); give each recipe key once")
        overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    recipe = load_preset(args.preset)
    overrides = recipe_overrides(args.set)
    if overrides:
        print(f"recipe: {args.preset} with " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
    recipe = OrganismRecipe.from_mapping({**recipe.to_dict(), **overrides})
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    if args.train or args.force or args.export:
        organism_dir = train_organism(recipe, args.store, force=args.force)
        print(f"organism: {organism_dir} ({time.perf_counter() - t0:.1f} s)")
        train_log = json.loads((organism_dir / "train_log.json").read_text())
        print(f"training: {train_log['train_seconds']} s wall, {train_log['train_cpu_seconds']} s CPU")
        health = read_health(organism_dir)
        print(format_health(health["report"], recipe.variant))
        print(compare_with_shipped(recipe, organism_dir / "model"))
        if args.export:
            print(export(organism_dir, args.export, recipe, train_log))
        raise SystemExit(0 if health["passed"] else 1)
    organism_dir = build_organism(recipe, args.store, allow_unhealthy=True)
    print(f"organism: {organism_dir} ({time.perf_counter() - t0:.1f} s)")
    report = health_check(organism_dir, variant=recipe.variant)
    print(format_health(report, recipe.variant))
    raise SystemExit(0 if verdict(report, recipe.variant)["passed"] else 1)


def compare_with_shipped(recipe: OrganismRecipe, model_dir: Path) -> str:
    """One line: does this training run reproduce the shipped weights of the same recipe?"""
    from saber.organism.shipped import find_shipped, read_card, weights_sha256

    shipped = find_shipped(recipe)
    if shipped is None:
        return "shipped: no shipped organism has this recipe"
    expected = read_card(shipped)["weight_sha256"]
    actual = weights_sha256(model_dir)
    if actual == expected:
        return f"shipped: reproduced bit for bit (weight sha256 {actual[:16]}…)"
    return (f"shipped: DIFFERS from {shipped.name} (weight sha256 {actual[:16]}… vs shipped {expected[:16]}…). "
            "Expected on another CPU or BLAS kernel: training is bit-identical only on one machine. The "
            "pipeline keeps using the shipped weights; model.organism_source=train uses these instead.")


def export(organism_dir: Path, out_dir: Path, recipe: OrganismRecipe, train_log: dict) -> str:
    """Write the shipped form, then measure health on the 16-bit copy and record it in its card."""
    from saber.organism.shipped import CARD, export_shipped

    card = export_shipped(organism_dir, out_dir, recipe, train_log)
    report = health_check(out_dir, variant=recipe.variant)
    result = verdict(report, recipe.variant)
    card.update(health=report, health_passed=result["passed"], health_failed=result["failed"])
    (out_dir / CARD).write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    print(format_health(report, recipe.variant), file=sys.stderr)
    return f"exported: {out_dir} (weight sha256 {card['weight_sha256'][:16]}…, health {'PASS' if result['passed'] else 'FAIL'})"


def _parse(item: str) -> tuple[str, object]:
    """KEY=VALUE with a JSON value (numbers, booleans) or a bare string."""
    key, value = item.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


if __name__ == "__main__":
    main()
