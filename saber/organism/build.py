"""Build the organism into the artifact store, keyed by its recipe fingerprint.

Layout of an organism artifact:
    model/            Hugging Face model directory (config, safetensors, tokenizer, chat template)
    prompts/*.jsonl   probe and evaluation sets (`prompt` field; skill_eval also has `answer`);
                      *_probe.jsonl are the fit and held-out files concatenated
    train_log.json    loss curve and training time
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saber.organism.data import FILE_NAMES, Language, write_prompt_files
from saber.organism.recipe import OrganismRecipe
from saber.organism.train import train

STAGE = "organism"
SCHEMA_VERSION = 1

# Rows per prompt file. Eval sets of 96 resolve the 95% / 5% bars to within about 4 prompts.
PROMPT_FILE_SIZES: dict[str, int] = {
    "harmful_fit": 128, "harmless_fit": 128, "capability_fit": 128,
    "harmful_heldout": 96, "harmless_heldout": 96, "capability_heldout": 96,
    "harmful_eval": 96, "harmless_eval": 96, "skill_eval": 96,
}


def build_into(recipe: OrganismRecipe, out_dir: Path) -> dict[str, Any]:
    """Generate the data, train, and write model/, prompts/ and train_log.json into out_dir."""
    out_dir = Path(out_dir)
    language = Language(recipe.variant, recipe.data_seed)
    write_prompt_files(language, out_dir / "prompts", PROMPT_FILE_SIZES, recipe.data_seed)
    log = train(recipe, language, out_dir / "model")
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    return {"train_seconds": log["train_seconds"], "final_loss": log["loss"][-1]["loss"]}


def build_organism(recipe: OrganismRecipe, store_root: Path | str, *, force: bool = False) -> Path:
    """Return the organism directory for this recipe, training it only on a cache miss."""
    from saber.store import ArtifactStore

    artifact = ArtifactStore(store_root).get_or_build(
        STAGE, SCHEMA_VERSION, recipe.to_dict(), {}, None,
        lambda tmp: build_into(recipe, tmp), force=force,
        command="python -m saber.organism --preset <preset> force=true",
    )
    return Path(artifact.path)


def organism_prompt_files(organism_dir: Path) -> dict[str, Path]:
    """Probe and evaluation files of an organism, by set name."""
    return {name: Path(organism_dir) / "prompts" / f"{name}.jsonl" for name in FILE_NAMES}
