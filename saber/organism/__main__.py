"""`python -m saber.organism --preset organism`: train (or load from cache) and print the health check."""

from __future__ import annotations

import argparse
import json
import time

import torch

from saber.organism.build import build_organism
from saber.organism.health import BARS, health_check
from saber.organism.recipe import OrganismRecipe, load_preset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m saber.organism", description=__doc__)
    parser.add_argument("--preset", default="organism", help="conf/model preset: organism | organism_hard")
    parser.add_argument("--store", default="outputs/store", help="artifact store root")
    parser.add_argument("--force", action="store_true", help="retrain even if the store has it")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override recipe keys, e.g. --set seed=3 arch=gemma3")
    args = parser.parse_args(argv)

    recipe = load_preset(args.preset)
    overrides = dict(_parse(item) for item in args.set)
    recipe = OrganismRecipe.from_mapping({**recipe.to_dict(), **overrides})
    t0 = time.perf_counter()
    organism_dir = build_organism(recipe, args.store, force=args.force)
    print(f"organism: {organism_dir} ({time.perf_counter() - t0:.1f} s)")
    train_log = json.loads((organism_dir / "train_log.json").read_text())
    print(f"training: {train_log['train_seconds']} s wall, {train_log['train_cpu_seconds']} s CPU")
    torch.set_num_threads(2)
    report = health_check(organism_dir)
    for key, value in report.items():
        print(f"{key:32s} {value:.3f}")
    failed = False
    for key, op, bar in BARS[recipe.variant]:
        ok = report[key] >= bar if op == ">=" else report[key] <= bar
        failed |= not ok
        print(f"{'PASS' if ok else 'FAIL'} {key} {report[key]:.3f} {op} {bar}")
    raise SystemExit(1 if failed else 0)


def _parse(item: str) -> tuple[str, object]:
    """KEY=VALUE with a JSON value (numbers, booleans) or a bare string."""
    key, value = item.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


if __name__ == "__main__":
    main()
