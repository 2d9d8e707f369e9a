"""extract, rank and entangle run through the Pipeline on a synthetic collect artifact."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from planted import capability, harmful_harmless, make_planted, write_collect_artifact
from saber.config import SaberConfig, validate
from saber.edit.plan import load_plan
from saber.pipeline import Pipeline, StageSpec
from stages import STAGES

CONF = Path(__file__).resolve().parent.parent / "conf"
N_LAYERS, D = 4, 32


def synthetic_collect(out: Path) -> dict[str, Any]:
    """Planted refusal subspace whose shift grows with depth (layer 3 separates best)."""
    p = make_planted(d=D, k=4, m=6, seed=1)
    layers = {}
    for l in range(N_LAYERS):
        shift = tuple(s * (l + 1) / N_LAYERS for s in (6.0, 4.0, 3.0, 2.0))
        h_fit, a_fit = harmful_harmless(p, 60, 60, seed=10 * l, shift=shift, spread=(2.0, 1.5, 1.2, 1.0))
        h_out, a_out = harmful_harmless(p, 40, 40, seed=10 * l + 1, shift=shift, spread=(2.0, 1.5, 1.2, 1.0))
        layers[l] = {"harmful": {"fit": h_fit, "heldout": h_out},
                     "harmless": {"fit": a_fit, "heldout": a_out},
                     "capability": {"fit": capability(p, 40, seed=10 * l + 2, noise=0.3),
                                    "heldout": capability(p, 10, seed=10 * l + 3, noise=0.3)}}
    write_collect_artifact(out, layers)
    return {"synthetic": True}


def make_cfg(tmp_path: Path, *overrides: str) -> SaberConfig:
    """The schema with this stage group's yaml files merged in, then `overrides` (dotlist)."""
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    cfg = OmegaConf.structured(SaberConfig)
    groups = (("extract", "svd"), ("rank", "default"), ("entangle", "default"), ("iterate", "default"))
    for group, name in groups:
        cfg = OmegaConf.merge(cfg, {group: OmegaConf.load(CONF / group / f"{name}.yaml")})
    # synthetic activations, no model: the geometric strength modes, no measuring, no learned scorer
    no_model = ["entangle.mode=discrete", "entangle.calibrate=false", "evaluate.scorer=keywords"]
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(
        [f"store_root={tmp_path / 'store'}", f"model.path={model_dir}", *no_model, *overrides]))
    return validate(cfg)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Swap in the synthetic collect build and count every build call per stage."""
    counts = {name: 0 for name in ("collect", "extract", "rank", "entangle")}

    def counted(name: str, build: Callable) -> Callable:
        def wrapped(ctx: Any, out: Path) -> Any:
            counts[name] += 1
            return build(ctx, out) if name != "collect" else synthetic_collect(out)
        return wrapped

    collect = StageSpec(name="collect", schema_version=1, config_keys=("collect",), upstream=(),
                        build=lambda ctx, out: None, reads_plans=True)
    for name in counts:
        spec = collect if name == "collect" else STAGES[name]
        monkeypatch.setitem(STAGES, name, replace(spec, build=counted(name, spec.build)))
    return counts


def test_stages_write_their_artifacts_and_rerun_is_a_cache_hit(tmp_path: Path, calls: dict[str, int]) -> None:
    cfg = make_cfg(tmp_path, "rank.top_k=3")
    pipe = Pipeline(cfg)
    ent = pipe.ensure("entangle")
    ext, rank = pipe.ensure("extract"), pipe.ensure("rank")
    assert calls == {"collect": 1, "extract": 1, "rank": 1, "entangle": 1}

    tensors = load_file(str(ext.file("directions.safetensors")))
    for l in range(N_LAYERS):
        basis = tensors[f"layer{l}.basis"].double()
        assert basis.shape == (4, D) and tensors[f"layer{l}.singular_values"].shape == (4,)
        assert torch.allclose(basis @ basis.T, torch.eye(4, dtype=torch.float64), atol=1e-5)
    directions = pd.read_parquet(ext.file("directions.parquet"))
    assert list(directions.columns) == ["layer", "index", "position", "singular_value", "energy_share",
                                        "mean_proj_harmful", "mean_proj_harmless"]
    assert set(directions["position"]) == {-1}  # one captured position: the last prompt token
    assert (directions["mean_proj_harmful"] > directions["mean_proj_harmless"]).all()

    ranking = pd.read_parquet(rank.file("ranking.parquet"))
    assert list(ranking.columns) == ["layer", "index", "position", "fdr", "auc", "p_value", "p_adjusted",
                                     "significant", "score", "rank", "selected"]
    # top_k = 3 is an upper bound: only pairs that beat the permutation null can be selected
    assert len(ranking) == 16 and 1 <= int(ranking["selected"].sum()) <= 3
    assert ranking.loc[ranking["selected"], "significant"].all()
    best = ranking.sort_values("rank").iloc[0]
    assert int(best["layer"]) == N_LAYERS - 1  # the planted shift is largest at the last layer
    assert rank.file("fdr_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = pd.read_parquet(ent.file("entanglement.parquet"))
    assert {"layer", "index", "rho", "rho_var", "purity", "class", "alpha"} <= set(table.columns)
    assert len(table) == 3
    # the planted refusal subspace is orthogonal to the capability subspace
    assert (table["class"] == "refusal").all() and np.allclose(table["alpha"], cfg.entangle.alpha_base)
    plan = load_plan(ent.path)
    assert len(plan.rows) == 3 and {r.alpha for r in plan.rows} == {cfg.entangle.alpha_base}
    assert list(pd.read_parquet(ent.file("plan.parquet")).columns) == [
        "layer", "index", "position", "rank", "alpha", "vector_key", "rho", "class", "fdr", "part"]
    assert ent.file("entanglement.png").read_bytes()[:4] == b"\x89PNG"

    again = Pipeline(cfg).ensure("entangle")
    assert again.fingerprint == ent.fingerprint
    assert calls == {"collect": 1, "extract": 1, "rank": 1, "entangle": 1}  # nothing rebuilt


def test_entangle_knob_reruns_only_entangle_and_decay_applies_per_iteration(
        tmp_path: Path, calls: dict[str, int]) -> None:
    Pipeline(make_cfg(tmp_path)).ensure("entangle")
    cfg = make_cfg(tmp_path, "entangle.alpha_base=0.5", "iterate.alpha_decay=0.5")
    pipe = Pipeline(cfg)
    first = load_plan(pipe.ensure("entangle", 0).path)
    assert calls == {"collect": 1, "extract": 1, "rank": 1, "entangle": 2}
    assert {r.alpha for r in first.rows} == {0.5}
    second = load_plan(pipe.ensure("entangle", 1).path)  # iteration 1: re-collect, alpha x 0.5
    assert {r.alpha for r in second.rows} == {0.25}
    assert calls["collect"] == 2 and calls["entangle"] == 3
