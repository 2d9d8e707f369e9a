"""FDR matches its closed form, is scored on held-out data, and every selection knob bites."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from planted import harmful_harmless, make_planted
from saber.config import ExtractConfig, RankConfig
from saber.directions import ActivationError, extract_layer
from saber.ranking import auc, fdr, score_layer, score_pairs, score_positions, select


def test_fdr_equals_closed_form() -> None:
    rng = np.random.default_rng(0)
    h, a = rng.normal(1.0, 2.0, 37), rng.normal(-0.5, 0.7, 53)
    eps = 1e-3
    expected = (h.mean() - a.mean()) ** 2 / (h.var(ddof=1) + a.var(ddof=1) + eps)
    assert fdr(h, a, eps) == pytest.approx(expected, rel=1e-12)


def test_fdr_estimates_population_value_and_is_scale_free() -> None:
    rng = np.random.default_rng(1)
    n = 200_000
    h, a = rng.normal(3.0, 2.0, n), rng.normal(1.0, 1.0, n)
    # population value (3 - 1)^2 / (4 + 1) = 0.8; the estimate's sd at n = 2e5 is ~0.003
    assert fdr(h, a, 1e-8) == pytest.approx(0.8, rel=0.02)
    # squared distance over squared spread: rescaling the projection changes nothing
    assert fdr(100 * h, 100 * a, 0.0) == pytest.approx(fdr(h, a, 0.0), rel=1e-9)


def test_score_layer_matches_fdr_and_sklearn_auc() -> None:
    p = make_planted()
    n = 20_000
    h, a = harmful_harmless(p, n, n, seed=0)
    basis = p.u.T.float()
    table = score_layer(h, a, basis, eps=1e-8, layer=3)
    assert list(table["layer"]) == [3] * 4 and list(table["index"]) == [0, 1, 2, 3]
    hp, ap = h.double() @ basis.double().T, a.double() @ basis.double().T
    y = np.r_[np.ones(n), np.zeros(n)]
    for i in range(4):
        assert table["fdr"][i] == pytest.approx(fdr(hp[:, i].numpy(), ap[:, i].numpy(), 1e-8), rel=1e-6)
        assert table["auc"][i] == pytest.approx(roc_auc_score(y, np.r_[hp[:, i], ap[:, i]]), abs=1e-12)
    # planted along u_i: shift s_i, harmful sd sqrt(spread_i^2 + 1), harmless sd 1, so the
    # population FDR is s_i^2 / (spread_i^2 + 2); relative sd of the estimate <= 8% at this n.
    population = np.array([3.0, 2.0, 1.5, 1.0]) ** 2 / (np.array([8.0, 7.0, 6.0, 5.0]) ** 2 + 2)
    assert np.allclose(table["fdr"].to_numpy(), population, rtol=0.25)
    assert auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0


def _overfit_case(d: int = 400, n_fit: int = 6, n_heldout: int = 300):
    """A genuine direction u (shift 2) and a chance direction w that separates the fit split."""
    gen = torch.Generator().manual_seed(0)
    u = torch.zeros(d, dtype=torch.float64)
    u[0] = 1.0

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.randn(n, d, generator=gen, dtype=torch.float64)
        h[:, 0] += 2.0
        return h.float(), torch.randn(n, d, generator=gen, dtype=torch.float64).float()

    fit, heldout = draw(n_fit), draw(n_heldout)
    w = fit[0].double().mean(0) - fit[1].double().mean(0)
    w[0] = 0.0
    w = w / w.norm()
    return fit, heldout, torch.stack([u, w]).float()


def test_heldout_ranking_differs_from_overfitted_fit_ranking() -> None:
    fit, heldout, basis = _overfit_case()
    cfg = RankConfig(strategy="global_topk", top_k=1)
    on_fit = select(score_layer(*fit, basis, eps=1e-8, layer=0, split="fit"), cfg, n_layers=1)
    on_heldout = select(score_layer(*heldout, basis, eps=1e-8, layer=0), cfg, n_layers=1)
    # fit: the chance direction's gap is ~sqrt(2 d / n) = 11.5 sd, FDR ~ 60; u has FDR ~ 2
    assert on_fit.loc[on_fit["selected"], "index"].tolist() == [1]
    assert on_fit["fdr"][1] > 10 * on_fit["fdr"][0]
    # held out: w separates nothing (FDR ~ 1/n), u keeps its population FDR 2
    assert on_heldout.loc[on_heldout["selected"], "index"].tolist() == [0]
    assert on_heldout["fdr"][1] < 0.1 < 1.0 < on_heldout["fdr"][0]


def test_fit_fdr_overstates_svd_directions_from_few_samples() -> None:
    fit, heldout, _ = _overfit_case(d=200, n_fit=10)
    ld = extract_layer(*fit, ExtractConfig(k=4))
    on_fit = score_layer(*fit, ld.basis, eps=1e-8, split="fit")["fdr"]
    on_heldout = score_layer(*heldout, ld.basis, eps=1e-8)["fdr"]
    assert float(on_fit.mean()) > 5 * float(on_heldout.mean())


def _table(n_layers: int = 5, k: int = 3, seed: int = 0) -> pd.DataFrame:
    """A score table with distinct FDR values 0.5 .. n_layers * k - 0.5 in random places."""
    rng = np.random.default_rng(seed)
    pairs = [(l, i) for l in range(n_layers) for i in range(k)]
    return pd.DataFrame({"layer": [l for l, _ in pairs], "index": [i for _, i in pairs],
                         "fdr": rng.permutation(len(pairs)) + 0.5, "auc": 0.5})


def _chosen(out: pd.DataFrame) -> set[tuple[int, int]]:
    return set(map(tuple, out.loc[out["selected"], ["layer", "index"]].to_numpy().tolist()))


def test_global_topk_selects_best_pairs_and_ranks_all() -> None:
    t = _table()
    out = select(t, RankConfig(strategy="global_topk", top_k=4), n_layers=5)
    best4 = t.sort_values("fdr", ascending=False).head(4)
    assert _chosen(out) == set(map(tuple, best4[["layer", "index"]].to_numpy().tolist()))
    assert sorted(out["rank"]) == list(range(1, 16))
    assert (out.sort_values("rank")["score"].diff().dropna() <= 0).all()
    assert list(out.columns) == ["layer", "index", "fdr", "auc", "p_value", "p_adjusted", "significant", "score",
                                 "rank", "selected"]

def test_global_topk_keeps_top_k_of_each_position_side() -> None:
    """Answer-position directions that all outscore the prompt-position ones still leave the best
    top_k prompt-position pairs selected: each side has its own budget."""
    prompt = _table(n_layers=5, k=3, seed=1).assign(position=-1)
    answer = _table(n_layers=5, k=3, seed=2).assign(position=2, fdr=lambda t: t["fdr"] + 100.0)
    answer["index"] += 3
    t = pd.concat([prompt, answer], ignore_index=True)
    out = select(t, RankConfig(strategy="global_topk", top_k=4), n_layers=5)
    picked = out[out["selected"]]
    assert len(picked) == 8
    for side, part in ((-1, prompt), (2, answer)):
        best4 = part.sort_values("fdr", ascending=False).head(4)
        got = picked[picked["position"] == side]
        assert set(map(tuple, got[["layer", "index"]].to_numpy().tolist())) == \
            set(map(tuple, best4[["layer", "index"]].to_numpy().tolist()))
    # several prompt positions share one budget
    t2 = t.assign(position=np.where(t["position"] > 0, -2, -1))
    assert int(select(t2, RankConfig(strategy="global_topk", top_k=4), n_layers=5)["selected"].sum()) == 4



def test_layer_topk_keeps_all_directions_of_best_layers() -> None:
    t = _table()
    out = select(t, RankConfig(strategy="layer_topk", layer_top_k=2), n_layers=5)
    best_layers = t.groupby("layer")["fdr"].max().sort_values(ascending=False).index[:2]
    assert _chosen(out) == {(l, i) for l in best_layers for i in range(3)}


def test_threshold_and_all_and_depth_window() -> None:
    t = _table()
    out = select(t, RankConfig(strategy="threshold", threshold=10.0), n_layers=5)
    assert _chosen(out) == set(map(tuple, t.loc[t["fdr"] >= 10.0, ["layer", "index"]].to_numpy().tolist()))
    out = select(t, RankConfig(strategy="all"), n_layers=5)
    assert out["selected"].all()
    # relative depth l / 4: the window [0.5, 0.75] admits layers 2 and 3 only
    out = select(t, RankConfig(strategy="all", depth_min=0.5, depth_max=0.75), n_layers=5)
    assert {l for l, _ in _chosen(out)} == {2, 3}
    with pytest.raises(ValueError, match="depth"):
        select(t[t["layer"] == 0], RankConfig(strategy="all", depth_min=0.5), n_layers=5)


def test_fdr_purity_demotes_entangled_pair() -> None:
    t = _table()
    top = int(t["fdr"].idxmax())
    purity = pd.Series(1.0, index=t.index)
    purity[top] = 0.01
    out = select(t, RankConfig(strategy="global_topk", top_k=1, score="fdr_purity"), 5, purity)
    assert not out["selected"][top]
    assert out["score"][top] == pytest.approx(t["fdr"][top] * 0.01)
    with pytest.raises(ValueError, match="fdr_purity"):
        select(t, RankConfig(score="fdr_purity"), 5, None)


@pytest.mark.parametrize("base, knob, value", [
    ({"strategy": "global_topk"}, "top_k", 2),
    ({"strategy": "global_topk"}, "strategy", "layer_topk"),
    ({"strategy": "global_topk", "top_k": 4}, "score", "fdr_purity"),
    ({"strategy": "layer_topk"}, "layer_top_k", 1),
    ({"strategy": "threshold"}, "threshold", 12.0),
    ({"strategy": "all"}, "depth_min", 0.3),
    ({"strategy": "all"}, "depth_max", 0.7),
])
def test_every_selection_knob_changes_the_selection(base: dict, knob: str, value: object) -> None:
    t = _table()
    purity = pd.Series(np.linspace(0.05, 1.0, len(t)), index=t.index)
    cfg = RankConfig(**base)
    before = select(t, cfg, 5, purity)
    after = select(t, replace(cfg, **{knob: value}), 5, purity)
    assert _chosen(before) != _chosen(after)


def test_eps_knob_enters_the_denominator() -> None:
    p = make_planted()
    h, a = harmful_harmless(p, 50, 50, seed=0)
    small = score_layer(h, a, p.u.T.float(), eps=1e-8)["fdr"]
    big = score_layer(h, a, p.u.T.float(), eps=100.0)["fdr"]
    assert (big < 0.9 * small).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_heldout_names_layer_and_split(bad: float) -> None:
    p = make_planted()
    h, a = harmful_harmless(p, 20, 20, seed=0)
    a[3, 0] = bad
    with pytest.raises(ActivationError, match=r"layer 6, kind 'harmless', split 'heldout'.*NaN or Inf"):
        score_pairs({6: (h, a)}, {6: p.u.T.float()}, eps=1e-8)


def test_degenerate_heldout_sets() -> None:
    p = make_planted()
    h, a = harmful_harmless(p, 20, 20, seed=0)
    with pytest.raises(ActivationError, match=r"layer 1, kind 'harmful', split 'heldout'.*need at least 2"):
        score_layer(h[:1], a, p.u.T.float(), eps=1e-8, layer=1)
    const = torch.ones(10, 64)
    with pytest.raises(ActivationError, match=r"layer 1, split 'heldout'.*constant"):
        score_layer(const, const.clone(), p.u.T.float(), eps=1e-8, layer=1)
    with pytest.raises(ActivationError, match=r"no heldout activations for layers \[4\]"):
        score_pairs({1: (h, a)}, {1: p.u.T.float(), 4: p.u.T.float()}, eps=1e-8)


# ---- significance -------------------------------------------------------------------------------
def test_planted_direction_beats_the_permutation_null_and_noise_does_not() -> None:
    rng = np.random.default_rng(5)
    n, d = 96, 32
    shift = np.zeros(d)
    shift[0] = 1.0  # harmful prompts sit one noise sd further along axis 0, nowhere else
    h = torch.tensor(rng.normal(size=(n, d)) + shift)
    a = torch.tensor(rng.normal(size=(n, d)))
    basis = torch.eye(d)[:8]  # direction 0 is the planted one, 1..7 are pure noise
    table = score_pairs({3: (h, a)}, {3: basis}, eps=1e-8, significance=0.05, n_permutations=1000, seed=0)
    assert table.attrs["n_permutations"] >= 1000
    out = select(table, RankConfig(strategy="global_topk", top_k=8, significance=0.05), n_layers=4)
    assert out.loc[out["index"] == 0, "significant"].item() and out.loc[out["index"] == 0, "selected"].item()
    # noise: FDR around 1/n, corrected p far above 5%; top_k = 8 is only an upper bound
    assert not out.loc[out["index"] > 0, "significant"].any()
    assert int(out["selected"].sum()) == 1


def test_null_p_values_are_uniform() -> None:
    """Under no effect, about 5% of uncorrected p-values fall at or below 0.05.

    400 pure-noise directions: the count at or below 0.05 is Binomial(400, 0.05), mean 20, sd 4.4;
    the bounds 8..34 hold with probability > 0.998.
    """
    from saber.ranking import permutation_pvalues

    rng = np.random.default_rng(7)
    hp, ap = rng.normal(size=(400, 40)), rng.normal(size=(400, 50))
    p = permutation_pvalues(hp, ap, 1e-8, 499, seed=1)
    assert p.min() >= 1 / 500 and p.max() <= 1.0
    assert 8 <= int((p <= 0.05).sum()) <= 34


def test_holm_matches_hand_computed_values() -> None:
    from saber.ranking import holm

    p = np.array([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])


def test_enough_permutations_for_many_pairs_and_fallback_to_the_best_pair(caplog: pytest.LogCaptureFixture) -> None:
    from saber.ranking import permutations_needed

    # 128 pairs at 5%: the smallest corrected p is 128 / (n + 1), so n must reach 2 * 128 / 0.05 - 1
    assert permutations_needed(128, 0.05, 2000) == 5119 and permutations_needed(4, 0.05, 2000) == 2000
    assert permutations_needed(10, 1.0, 2000) == 2000  # test off: p-values still reported, no raise
    rng = np.random.default_rng(3)
    h, a = torch.tensor(rng.normal(size=(40, 8))), torch.tensor(rng.normal(size=(40, 8)))
    table = score_pairs({0: (h, a)}, {0: torch.eye(8)[:4]}, eps=1e-8, significance=0.05, n_permutations=200)
    with caplog.at_level("WARNING"):
        out = select(table, RankConfig(strategy="global_topk", top_k=3, significance=0.05), n_layers=1)
    assert "no (layer, direction) pair beats its permutation null" in caplog.text
    assert int(out["selected"].sum()) == 1 and out.loc[out["rank"] == 1, "selected"].item()


def test_each_direction_is_scored_at_the_position_it_was_found_at() -> None:
    """Planted: direction e0 separates harmful from harmless only at answer position 1, e1 only at the
    last prompt token. Scored at their own positions both separate; the same rows scored all at -1
    (score_pairs) would leave e0 at chance. The last-token rows keep score_pairs' numbers exactly."""
    gen = torch.Generator().manual_seed(0)
    d, n = 8, 60
    e = torch.eye(d)

    def acts(shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.randn(n, d, generator=gen) + 3.0 * shift
        return h, torch.randn(n, d, generator=gen)

    at = {-1: acts(e[1]), 1: acts(e[0])}
    basis = torch.stack([e[1], e[0]])
    positions = torch.tensor([-1, 1])
    scored = score_positions(lambda l, p: at[p], {0: basis}, {0: positions}, eps=1e-8, n_permutations=200, seed=3)
    assert scored["position"].tolist() == [-1, 1] and scored["index"].tolist() == [0, 1]
    assert (scored["auc"] > 0.95).all()
    last_only = score_pairs({0: at[-1]}, {0: basis}, eps=1e-8, n_permutations=200, seed=3)
    assert last_only["auc"].iloc[1] < 0.7  # e0 read at the wrong position carries nothing
    # the same statistic and shuffles (to float64 rounding: a one-row projection is a different matmul)
    assert scored.iloc[0][["fdr", "auc", "p_value"]].tolist() == pytest.approx(
        last_only.iloc[0][["fdr", "auc", "p_value"]].tolist(), rel=1e-12)
