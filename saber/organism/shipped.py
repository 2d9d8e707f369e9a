"""The organisms shipped with the package: trained once, so every machine sees the same weights.

Training is bit-identical only on one machine: another CPU (or BLAS kernel) gives other weights
and so other geometry. The project therefore ships the trained default, hard, deep and novel organisms as
16-bit safetensors shards under ``saber/organism/weights/<preset>/`` together with
``organism.json``: the recipe they were trained from, the weight hash and their health table.
Loading verifies the hash; training from the recipe still works and reports whether it
reproduced the shipped weights.

Weight hash: sha256 over every tensor in name order (name, dtype, shape, raw bytes), after the
cast to the shipping dtype, so it is independent of sharding and file metadata.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from saber.organism.recipe import OrganismRecipe

WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"
CARD = "organism.json"
SHIP_DTYPE = torch.float16  # 10 mantissa bits; the organism's weights are far inside its range
MAX_SHARD = "4MB"  # repository-friendly shards (each file stays under 5 MB)

_verified: dict[Path, str] = {}  # directories already hashed in this process


class OrganismIntegrityError(RuntimeError):
    """A shipped organism's weights do not match the hash recorded beside them."""


def shipped_presets() -> dict[str, Path]:
    """Shipped organism directories by preset name."""
    if not WEIGHTS_ROOT.is_dir():
        return {}
    return {p.name: p for p in sorted(WEIGHTS_ROOT.iterdir()) if (p / CARD).is_file()}


def read_card(organism_dir: Path) -> dict[str, Any]:
    return json.loads((Path(organism_dir) / CARD).read_text(encoding="utf-8"))


def find_shipped(recipe: OrganismRecipe) -> Path | None:
    """The shipped organism trained from exactly this recipe, if there is one."""
    wanted = recipe.to_dict()
    for path in shipped_presets().values():
        if read_card(path)["recipe"] == wanted:
            return path
    return None


def weights_sha256(model_dir: Path, dtype: torch.dtype = SHIP_DTYPE) -> str:
    """Content hash of a model directory's safetensors weights, cast to `dtype` first."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].to(dtype).contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def verify(organism_dir: Path) -> str:
    """Check a shipped organism's weights against its card; returns the hash (cached per process)."""
    organism_dir = Path(organism_dir).resolve()
    if organism_dir in _verified:
        return _verified[organism_dir]
    card = read_card(organism_dir)
    try:
        actual = weights_sha256(organism_dir / "model")
    except Exception as exc:  # a truncated or missing shard: name it, do not leak a raw traceback
        raise OrganismIntegrityError(
            f"shipped organism {organism_dir.name}: cannot read its weights under "
            f"{organism_dir / 'model'} ({exc}); reinstall the package (pip install --force-reinstall) "
            "or restore the files with git checkout") from exc
    if actual != card["weight_sha256"]:
        raise OrganismIntegrityError(
            f"shipped organism {organism_dir.name}: weights under {organism_dir / 'model'} hash to "
            f"{actual[:16]}… but {CARD} records {card['weight_sha256'][:16]}…; the files were changed. "
            "Reinstall the package or restore them with git checkout")
    _verified[organism_dir] = actual
    return actual


def export_shipped(trained_dir: Path, out_dir: Path, recipe: OrganismRecipe,
                   train_log: dict[str, Any]) -> dict[str, Any]:
    """Write a trained organism in shipped form (16-bit shards, prompts, card) into a new out_dir.

    The card returned (and written) has no health yet: the caller measures it on the 16-bit copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"--export {out_dir}: the directory exists; choose a new one")
    trained_dir = Path(trained_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_dir / "model", dtype=torch.float32)
    model.to(SHIP_DTYPE).save_pretrained(out_dir / "model", max_shard_size=MAX_SHARD)
    AutoTokenizer.from_pretrained(trained_dir / "model").save_pretrained(out_dir / "model")
    shutil.copytree(trained_dir / "prompts", out_dir / "prompts")
    shutil.copy2(trained_dir / "train_log.json", out_dir / "train_log.json")
    card = {"recipe": recipe.to_dict(), "weight_sha256": weights_sha256(out_dir / "model"),
            "dtype": str(SHIP_DTYPE).removeprefix("torch."), "torch": torch.__version__,
            "train_seconds": train_log.get("train_seconds")}
    (out_dir / CARD).write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    return card
