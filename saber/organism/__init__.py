"""The built-in model organism: a small chat model with real, ablatable refusal and a skill.

It is trained on the CPU by the project itself (deterministic, cached in the artifact store by
recipe fingerprint), so tests, benchmarks and the demo run offline. See docs/ORGANISM.md.
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
