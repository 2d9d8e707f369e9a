"""Get the organism for a recipe: the shipped weights when they match it, else train into the store.

Layout of an organism directory (shipped or trained):
    model/            Hugging Face model directory (config, safetensors, tokenizer, chat template)
    prompts/*.jsonl   probe and evaluation sets (`prompt` field; skill_eval also has `answer`);
                      *_probe.jsonl are the fit and held-out files concatenated
    train_log.json    loss curve and training time
    health.json       the health table measured right after training, on the training machine
    organism.json     (shipped only) recipe, weight hash and health table: saber.organism.shipped
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from saber.organism.data import FILE_NAMES, Language, write_prompt_files
from saber.organism.language import language_digest
from saber.organism.recipe import OrganismRecipe
from saber.organism.train import train

STAGE = "organism"
SCHEMA_VERSION = 3  # 2: health.json measured at build time; 3: key holds the language digest, health the fragment rates
SOURCES = ("auto", "shipped", "train")
HEALTH_FILE = "health.json"

log = logging.getLogger(__name__)

# Rows per prompt file. Eval sets of 96 resolve the 95% / 5% bars to within about 4 prompts.
PROMPT_FILE_SIZES: dict[str, int] = {
    "harmful_fit": 128, "harmless_fit": 128, "capability_fit": 128,
    "harmful_heldout": 96, "harmless_heldout": 96, "capability_heldout": 96,
    "harmful_eval": 96, "harmless_eval": 96, "skill_eval": 96,
}


class UnhealthyOrganismError(RuntimeError):
    """A freshly trained organism fails its own health bars, so results on it would mislead."""


def build_into(recipe: OrganismRecipe, out_dir: Path) -> dict[str, Any]:
    """Generate the data, train, measure health, and write the organism layout into out_dir."""
    from saber.organism.health import health_check, verdict

    out_dir = Path(out_dir)
    language = Language(recipe.variant, recipe.data_seed)
    write_prompt_files(language, out_dir / "prompts", PROMPT_FILE_SIZES, recipe.data_seed)
    log.info("training organism %s/%s seed %d (%d + %d steps, 1-3 minutes per 100 steps on one core)",
             recipe.arch, recipe.variant, recipe.seed, recipe.steps_stage1, recipe.steps_stage2)
    train_log = train(recipe, language, out_dir / "model")
    (out_dir / "train_log.json").write_text(json.dumps(train_log, indent=1) + "\n", encoding="utf-8")
    report = health_check(out_dir, variant=recipe.variant)
    result = verdict(report, recipe.variant)
    (out_dir / HEALTH_FILE).write_text(json.dumps({"report": report, **result}, indent=1) + "\n",
                                       encoding="utf-8")
    return {"train_seconds": train_log["train_seconds"], "final_loss": train_log["loss"][-1]["loss"],
            "health_passed": result["passed"]}


def train_organism(recipe: OrganismRecipe, store_root: Path | str, *, force: bool = False) -> Path:
    """Train the recipe into the store (a cache hit when it was trained before on this store)."""
    from saber.store import ArtifactStore

    artifact = ArtifactStore(store_root).get_or_build(
        STAGE, SCHEMA_VERSION, {**recipe.to_dict(), "language_sha256": language_digest(recipe.variant)}, {}, None,
        lambda tmp: build_into(recipe, tmp), force=force,
        command="python -m saber.organism --preset <preset> --train --force",
    )
    return Path(artifact.path)


def build_organism(recipe: OrganismRecipe, store_root: Path | str, *, source: str = "auto",
                   force: bool = False, allow_unhealthy: bool = False) -> Path:
    """The organism directory for this recipe.

    source: ``auto`` takes the shipped weights when a shipped organism has exactly this recipe
    and trains otherwise; ``shipped`` requires one; ``train`` always trains (this machine's
    weights). ``force`` retrains. A trained organism that fails its health bars raises
    UnhealthyOrganismError unless ``allow_unhealthy``.
    """
    from saber.organism import shipped

    if source not in SOURCES:
        raise ValueError(f"model.organism_source must be one of {SOURCES}, got {source!r}")
    if source != "train" and not force:
        found = shipped.find_shipped(recipe)
        if found is not None:
            shipped.verify(found)
            return found
        if source == "shipped":
            raise ValueError(
                f"model.organism_source=shipped but no shipped organism has this recipe "
                f"(shipped: {', '.join(shipped.shipped_presets()) or 'none'}); drop the recipe overrides "
                "or set model.organism_source=auto to train it")
    organism_dir = train_organism(recipe, store_root, force=force)
    health = read_health(organism_dir)
    if not health["passed"] and not allow_unhealthy:
        raise UnhealthyOrganismError(
            f"the organism trained from this recipe ({organism_dir}) fails its health bars: "
            f"{'; '.join(health['failed'])}. Results on it would not mean what they claim: use the shipped "
            "organism (no recipe overrides), try another model.organism.seed, or set "
            "model.allow_unhealthy=true to run anyway")
    return organism_dir


def read_health(organism_dir: Path) -> dict[str, Any]:
    """The health verdict stored with a trained organism, or the card of a shipped one."""
    organism_dir = Path(organism_dir)
    if (organism_dir / HEALTH_FILE).is_file():
        return json.loads((organism_dir / HEALTH_FILE).read_text(encoding="utf-8"))
    from saber.organism.shipped import read_card

    card = read_card(organism_dir)
    return {"report": card["health"], "passed": card["health_passed"], "failed": card.get("health_failed", [])}


def organism_identity(organism_dir: Path) -> str:
    """Model identity for fingerprints: the weight hash of a shipped organism, else its artifact name."""
    from saber.organism.shipped import CARD, read_card

    organism_dir = Path(organism_dir)
    if (organism_dir / CARD).is_file():
        return f"organism:shipped:{read_card(organism_dir)['weight_sha256'][:32]}"
    return f"organism:{organism_dir.name}"


def organism_prompt_files(organism_dir: Path) -> dict[str, Path]:
    """Probe and evaluation files of an organism, by set name."""
    return {name: Path(organism_dir) / "prompts" / f"{name}.jsonl" for name in FILE_NAMES}
