"""Entanglement scores, strength modes and the edit plan, on planted capability subspaces."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from planted import capability, make_planted
from saber.config import EntangleConfig, KernelConfig
from saber.directions import ActivationError
from saber.edit.plan import load_plan
from saber.entangle import (capability_subspace, entanglement_table, kernel_weight, null_tau, plan_rows,
                            save_plan_files)

P = make_planted(d=64, k=4, m=6)
# noise 0.05 against capability sd 2..5: the fitted C matches the planted Q to ~1e-3 in rho
CAP = capability(P, 400, seed=0)
SUB = capability_subspace(CAP, 6, layer=0)

TAU = 0.55  # a fixed threshold: these tests plant rho on both sides of it (null_tau has its own test)


def mixed(rho: float, j: int = 0) -> torch.Tensor:
    """Unit direction with planted overlap rho: sqrt(rho) q_j + sqrt(1 - rho) u_0."""
    return (np.sqrt(rho) * P.q[:, j] + np.sqrt(1 - rho) * P.u[:, 0]).float()


def frame(vectors: list[torch.Tensor], layers: list[int] | None = None):
    """selected table + bases + subspaces for one direction per row."""
    layers = layers or [0] * len(vectors)
    bases: dict[int, list[torch.Tensor]] = {}
    rows = []
    for rank, (layer, v) in enumerate(zip(layers, vectors), start=1):
        bases.setdefault(layer, []).append(v)
        rows.append({"layer": layer, "index": len(bases[layer]) - 1, "fdr": 10.0 / rank, "rank": rank})
    return (pd.DataFrame(rows), {l: torch.stack(vs) for l, vs in bases.items()},
            {l: SUB for l in bases})


def table_for(vectors: list[torch.Tensor], cfg: EntangleConfig, layers: list[int] | None = None,
              n_layers: int = 1, decay: float = 1.0) -> pd.DataFrame:
    selected, bases, subs = frame(vectors, layers)
    return entanglement_table(selected, bases, subs, cfg, n_layers, decay)


def test_rho_matches_planted_overlap() -> None:
    for rho in (0.0, 0.25, 0.5, 0.9, 1.0):
        assert SUB.rho(mixed(rho)) == pytest.approx(rho, abs=5e-3)


def test_rho_var_is_variance_ratio() -> None:
    centred = CAP.double() - CAP.double().mean(0)
    cov = centred.T @ centred / (CAP.shape[0] - 1)
    lam = torch.linalg.eigvalsh(cov)[-1]
    for v in (P.q[:, 0], P.q[:, 5], mixed(0.5, 2).double(), P.u[:, 1]):
        v = v / v.norm()
        assert SUB.rho_var(v) == pytest.approx(float(v @ cov @ v / lam), rel=1e-9, abs=1e-12)
    # planted sd 5 along q_0 and 2 along q_5: ratio 4 / 25 up to sampling error (~10% at n = 400)
    assert SUB.rho_var(P.q[:, 5]) == pytest.approx(0.16, rel=0.25)


def test_discrete_mode_entangled_and_pure() -> None:
    cfg = EntangleConfig(mode="discrete", tau=TAU)
    t = table_for([P.q[:, 0].float(), P.u[:, 0].float()], cfg)
    assert t["class"].tolist() == ["entangled", "refusal"]
    assert t["alpha"].tolist() == [cfg.alpha_entangled, cfg.alpha_base]
    assert np.allclose(t["purity"], 1 - t["rho"])
    assert t["rho"][0] > 0.99 and t["rho"][1] < 0.01


def test_ramp_mode_interpolates_between_thresholds() -> None:
    cfg = EntangleConfig(mode="ramp", tau=TAU, ramp_low=0.3, ramp_high=0.7, alpha_base=0.8, alpha_entangled=0.0)
    t = table_for([mixed(0.1), mixed(0.4), mixed(0.5), mixed(0.9)], cfg)
    # 0.1 below the ramp, 0.9 above it, 0.4 a quarter of the way, 0.5 half way (rho within 5e-3)
    assert t["alpha"].tolist() == pytest.approx([0.8, 0.6, 0.4, 0.0], abs=0.02)
    rho = t["rho"].to_numpy()
    frac = np.clip((rho - 0.3) / 0.4, 0, 1)
    assert np.allclose(t["alpha"], 0.8 + (0.0 - 0.8) * frac, atol=1e-12)


def test_split_mode_edits_pure_and_entangled_parts_separately() -> None:
    cfg = EntangleConfig(mode="split", tau=0.55, alpha_base=0.9, alpha_entangled=0.1)
    selected, bases, subs = frame([mixed(0.7), P.u[:, 1].float()])
    t = entanglement_table(selected, bases, subs, cfg, 1)
    rho = t["rho"][0]
    assert t["alpha"][0] == pytest.approx(0.9 * (1 - rho) + 0.1 * rho)  # effective along v
    plan, vectors = plan_rows(t, bases, subs, cfg)
    assert plan["part"].tolist() == ["pure", "entangled", "full"]
    assert plan["alpha"].tolist() == [0.9, 0.1, 0.9]
    assert plan["rank"].tolist() == [1, 2, 3]
    pure, ent = vectors[plan["vector_key"][0]].double(), vectors[plan["vector_key"][1]].double()
    c = SUB.basis
    assert float(torch.linalg.vector_norm(c @ pure)) < 1e-6  # outside C
    assert float(torch.linalg.vector_norm(c @ ent)) == pytest.approx(1.0, abs=1e-6)  # inside C
    assert abs(float(pure @ ent)) < 1e-6
    v = bases[0][0].double()
    v = v / v.norm()
    assert torch.allclose(np.sqrt(1 - rho) * pure + np.sqrt(rho) * ent, v, atol=1e-6)


def test_uniform_mode_ignores_entanglement() -> None:
    cfg = EntangleConfig(mode="uniform", tau=TAU, alpha_base=0.6)
    t = table_for([P.q[:, 0].float(), P.u[:, 0].float()], cfg)
    assert t["alpha"].tolist() == [0.6, 0.6]
    assert t["class"].tolist() == ["entangled", "refusal"]  # still reported


def test_kernel_mode_is_a_tent_over_depth() -> None:
    cfg = EntangleConfig(mode="kernel", tau=TAU, kernel=KernelConfig(peak_position=0.6, peak_weight=1.0,
                                                            min_weight=0.0, distance=0.4))
    layers = list(range(11))  # relative depth 0.0, 0.1, ..., 1.0
    t = table_for([P.u[:, 0].float()] * 11, cfg, layers=layers, n_layers=11)
    expected = [0, 0, 0, 0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0]
    assert t["alpha"].tolist() == pytest.approx(expected, abs=1e-12)
    lifted = KernelConfig(peak_position=0.5, peak_weight=0.8, min_weight=0.2, distance=0.2)
    assert [kernel_weight(x, lifted) for x in (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0)] == \
        pytest.approx([0.2, 0.2, 0.5, 0.8, 0.5, 0.2, 0.2])


@pytest.mark.parametrize("mode", ["discrete", "ramp", "split", "uniform", "kernel"])
def test_decay_scales_every_strength_per_iteration(mode: str) -> None:
    cfg = EntangleConfig(mode=mode, tau=TAU)
    vectors = [mixed(0.8), mixed(0.5), P.u[:, 0].float()]
    layers = [1, 2, 3]
    selected, bases, subs = frame(vectors, layers)
    t0 = entanglement_table(selected, bases, subs, cfg, 5, 1.0)
    decay = 0.7**2  # iteration 2 at alpha_decay 0.7
    t2 = entanglement_table(selected, bases, subs, cfg, 5, decay)
    assert np.allclose(t2["alpha"], t0["alpha"] * decay)
    p0, _ = plan_rows(t0, bases, subs, cfg, 1.0)
    p2, _ = plan_rows(t2, bases, subs, cfg, decay)
    assert np.allclose(p2["alpha"], p0["alpha"] * decay) and (p0["alpha"] > 0).any()


VARIED = [mixed(0.2, 0), mixed(0.4, 3), mixed(0.5, 1), mixed(0.6, 2), mixed(0.8, 5), P.q[:, 4].float()]
VARIED_LAYERS = [0, 2, 4, 6, 8, 10]


@pytest.mark.parametrize("base, knob, value", [
    ({}, "m", 3),
    ({}, "tau", 0.3),
    ({}, "alpha_base", 0.5),
    ({}, "alpha_entangled", 0.2),
    ({}, "mode", "uniform"),
    ({"mode": "ramp"}, "ramp_low", 0.1),
    ({"mode": "ramp"}, "ramp_high", 0.9),
    ({"mode": "split"}, "alpha_entangled", 0.2),
    ({"mode": "kernel"}, "kernel.peak_position", 0.2),
    ({"mode": "kernel"}, "kernel.peak_weight", 0.5),
    ({"mode": "kernel"}, "kernel.min_weight", 0.1),
    ({"mode": "kernel"}, "kernel.distance", 0.9),
])
def test_every_entangle_knob_changes_the_plan(base: dict, knob: str, value: object) -> None:
    cfg = EntangleConfig(**{"mode": "discrete", "tau": TAU, **base})  # the geometric modes (measured needs a model)
    if knob.startswith("kernel."):
        changed = replace(cfg, kernel=replace(cfg.kernel, **{knob.split(".")[1]: value}))
    else:
        changed = replace(cfg, **{knob: value})

    def run(c: EntangleConfig) -> pd.DataFrame:
        selected, bases, _ = frame(VARIED, VARIED_LAYERS)
        sub = capability_subspace(CAP, c.m)  # every layer shares the planted capability data
        subs = {l: sub for l in bases}
        t = entanglement_table(selected, bases, subs, c, 11)
        plan, _ = plan_rows(t, bases, subs, c)
        return plan

    before, after = run(cfg), run(changed)
    same = (len(before) == len(after) and np.allclose(before["alpha"], after["alpha"])
            and before["class"].tolist() == after["class"].tolist()
            and np.allclose(before["rho"], after["rho"]))
    assert not same


def test_plan_files_round_trip_through_edit_loader(tmp_path) -> None:
    cfg = EntangleConfig(mode="split", tau=TAU)
    selected, bases, subs = frame([mixed(0.8), P.u[:, 0].float()], [2, 3])
    t = entanglement_table(selected, bases, subs, cfg, 4)
    plan, vectors = plan_rows(t, bases, subs, cfg)
    save_plan_files(plan, vectors, tmp_path)
    table = pd.read_parquet(tmp_path / "plan.parquet")
    assert list(table.columns) == ["layer", "index", "position", "rank", "alpha", "vector_key", "rho", "class",
                                   "fdr", "part"]
    loaded = load_plan(tmp_path)
    assert [(r.layer, r.index, r.rank, r.alpha, r.vector_key) for r in loaded.ordered()] == \
        [(int(r["layer"]), int(r["index"]), int(r["rank"]), float(r["alpha"]), r["vector_key"])
         for r in plan.to_dict("records")]
    for key, v in vectors.items():
        assert torch.equal(loaded.vectors[key], v.float())
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-6)


def test_degenerate_capability_sets() -> None:
    with pytest.raises(ActivationError, match=r"layer 4, kind 'capability', split 'fit'.*need at least 11"):
        capability_subspace(CAP[:8], 10, layer=4)
    dup = CAP[:3].repeat(10, 1)  # 30 rows, rank 2 after centring: the subspace is those 2 directions
    sub = capability_subspace(dup, 6, layer=4)
    assert sub.basis.shape == (2, CAP.shape[1])
    centred = (dup - dup.mean(0)).double()
    # float32 activations: the projection reproduces them to float32 rounding
    torch.testing.assert_close(centred @ sub.basis.T.double() @ sub.basis.double(), centred, atol=1e-5, rtol=1e-4)
    with pytest.raises(ActivationError, match=r"layer 4, kind 'capability', split 'fit'.*all the same"):
        capability_subspace(CAP[:1].repeat(12, 1), 6, layer=4)
    bad = CAP.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(ActivationError, match=r"layer 4, kind 'capability', split 'fit'.*NaN or Inf"):
        capability_subspace(bad, 6, layer=4)


def test_empty_selection_gives_an_empty_loadable_plan(tmp_path) -> None:
    empty = pd.DataFrame({"layer": [], "index": [], "fdr": [], "rank": []})
    t = entanglement_table(empty, {}, {}, EntangleConfig(tau=TAU), 4)
    plan, vectors = plan_rows(t, {}, {}, EntangleConfig(tau=TAU))
    save_plan_files(plan, vectors, tmp_path)
    assert load_plan(tmp_path).rows == []
    assert pd.read_parquet(tmp_path / "plan.parquet")["alpha"].dtype == np.float64


def test_null_tau_is_a_quantile_of_rho_over_directions_without_refusal_signal() -> None:
    # noise directions with planted rho 0.6..0.9 do not beat their null; the refusal one (rho 0.2) does
    null_rhos = [0.6, 0.7, 0.8, 0.9]
    selected, bases, subs = frame([mixed(0.2), *[mixed(r, j) for j, r in enumerate(null_rhos)]])
    ranking = selected.assign(significant=[True] + [False] * len(null_rhos))
    assert null_tau(ranking, bases, subs, 0.5) == pytest.approx(np.quantile(null_rhos, 0.5), abs=1e-2)
    assert null_tau(ranking, bases, subs, 1.0) == pytest.approx(0.9, abs=1e-2)
    # a direction below the null is a refusal direction under the calibrated tau, above it entangled
    tau = null_tau(ranking, bases, subs, 0.95)
    table = entanglement_table(selected, bases, subs, EntangleConfig(mode="discrete", tau=tau), 1)
    assert table["class"].tolist()[:1] == ["refusal"] and table["class"].iloc[-1] == "entangled"
    # too few null pairs to calibrate on
    assert null_tau(ranking.assign(significant=True), bases, subs, 0.95) is None
    with pytest.raises(ValueError, match="entangle.tau is null"):
        entanglement_table(selected, bases, subs, EntangleConfig(mode="discrete"), 1)
