"""The built-in model organism: a small chat model with real, ablatable refusal and a skill.

The project trains it on the CPU and ships the trained default, hard, deep and novel organisms
with the package (16-bit weights, hash-verified), so tests, benchmarks and the demo see the same
model on every machine, offline. Any other recipe is trained into the artifact store. See docs/ORGANISM.md.
"""

from saber.organism.build import build_organism, organism_prompt_files
from saber.organism.health import health_check
from saber.organism.language import ALL_REFUSALS, is_refusal
from saber.organism.recipe import OrganismRecipe, load_preset

__all__ = [
    "ALL_REFUSALS",
    "OrganismRecipe",
    "build_organism",
    "health_check",
    "is_refusal",
    "load_preset",
    "organism_prompt_files",
]
