"""Extraction recovers planted refusal subspaces and fails loudly on unusable activations."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles

from planted import harmful_harmless, make_planted
from saber.config import ConfigError, ExtractConfig
from saber.directions import (ActivationError, directions_frame, extract_layer, join_positions, load_directions,
                              save_directions)


def max_angle_deg(basis: torch.Tensor, u: torch.Tensor) -> float:
    """Largest principal angle between span(basis rows) and span(u columns), in degrees."""
    return float(np.degrees(subspace_angles(basis.double().T.numpy(), u.numpy()).max()))


def test_svd_recovers_planted_subspace() -> None:
    p = make_planted(d=64, k=4)
    h, a = harmful_harmless(p, 1500, 1500, seed=0)
    ld = extract_layer(h, a, ExtractConfig(method="svd", k=4), layer=5)
    # Perturbation bound ~ sqrt(d / n) * noise / gap gives about 2.5 degrees here; 5 leaves room
    # for the seed.
    assert max_angle_deg(ld.basis, p.u) <= 5.0


def test_recovery_degrades_with_fewer_samples() -> None:
    p = make_planted(d=64, k=4)
    sizes = [10, 30, 100, 300, 1000]
    mean_angle = []
    for n in sizes:
        angles = [max_angle_deg(extract_layer(*harmful_harmless(p, n, n, seed=s), ExtractConfig()).basis, p.u)
                  for s in range(4)]
        mean_angle.append(float(np.mean(angles)))
    # Averaged over 4 seeds the error shrinks roughly like 1/sqrt(n): each step of ~3x samples
    # must not make it worse (10% slack for seed noise), and the ends differ by far more.
    for small, large in zip(mean_angle, mean_angle[1:]):
        assert large <= 1.1 * small, mean_angle
    assert mean_angle[0] > 5 * mean_angle[-1], mean_angle


@pytest.mark.parametrize("method, k", [("svd", 4), ("svd", 2), ("mean_diff", 1), ("lda", 1)])
def test_basis_orthonormal_oriented_with_energy(method: str, k: int) -> None:
    p = make_planted()
    h, a = harmful_harmless(p, 300, 300, seed=1)
    ld = extract_layer(h, a, ExtractConfig(method=method, k=k))
    b = ld.basis.double()
    assert b.shape == (k, 64)
    # float32 storage: orthonormal to ~1e-6.
    assert torch.allclose(b @ b.T, torch.eye(k, dtype=torch.float64), atol=1e-5)
    assert bool((ld.mean_proj_harmful > ld.mean_proj_harmless).all())
    d = h.double() - a.double().mean(0)
    expected_sv = torch.linalg.vector_norm(d @ b.T, dim=0)
    assert torch.allclose(ld.singular_values.double(), expected_sv, rtol=1e-5)
    assert torch.allclose(ld.energy_share.double(), expected_sv**2 / (d**2).sum(), rtol=1e-4)
    assert float(ld.energy_share.sum()) <= 1.0 + 1e-6
    if method == "svd":
        s = torch.linalg.svdvals(d)[:k]
        assert torch.allclose(ld.singular_values.double(), s, rtol=1e-5)


def test_mean_diff_is_the_normalised_mean_difference() -> None:
    p = make_planted()
    h, a = harmful_harmless(p, 200, 150, seed=2)
    r = h.double().mean(0) - a.double().mean(0)
    ld = extract_layer(h, a, ExtractConfig(method="mean_diff", k=1))
    assert torch.allclose(ld.basis[0].double(), r / r.norm(), atol=1e-6)


def test_svd_does_not_depend_on_row_pairing() -> None:
    """D = H - mean(A): permuting either set (any pairing) gives the same subspace."""
    p = make_planted()
    h, a = harmful_harmless(p, 120, 120, seed=3)
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    b1 = extract_layer(h, a, ExtractConfig()).basis
    b2 = extract_layer(h, a[perm], ExtractConfig()).basis
    assert max_angle_deg(b1, b2.double().T) < 1e-2


@pytest.mark.parametrize("method, k", [("svd", 4), ("mean_diff", 1), ("lda", 1)])
def test_projected_removes_harmless_mean(method: str, k: int) -> None:
    p = make_planted()
    h, a = harmful_harmless(p, 300, 300, seed=4)
    m = a.double().mean(0)
    m = m / m.norm()
    plain = extract_layer(h, a, ExtractConfig(method=method, k=k, projected=False)).basis.double()
    proj = extract_layer(h, a, ExtractConfig(method=method, k=k, projected=True)).basis.double()
    assert float((plain @ m).abs().max()) > 1e-3  # the knob has something to remove here
    assert float((proj @ m).abs().max()) < 1e-5
    assert torch.allclose(proj @ proj.T, torch.eye(k, dtype=torch.float64), atol=1e-5)


def _anisotropic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean difference e0 + e1, noise 10x larger along e1: the discriminant is near e0."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.ones(16, dtype=torch.float64)
    scale[1] = 10.0
    h = torch.randn(n, 16, generator=gen, dtype=torch.float64) * scale
    a = torch.randn(n, 16, generator=gen, dtype=torch.float64) * scale
    h[:, 0] += 1.0
    h[:, 1] += 1.0
    return h.float(), a.float()


def test_lda_finds_the_discriminant_that_mean_diff_misses() -> None:
    h, a = _anisotropic(2000, 0)
    lda = extract_layer(h, a, ExtractConfig(method="lda", k=1)).basis[0]
    md = extract_layer(h, a, ExtractConfig(method="mean_diff", k=1)).basis[0]
    # Sigma^-1 (e0 + e1) = e0 + e1/100: cos with e0 is 0.99995; mean_diff sits near 45 degrees.
    assert float(lda[0]) > 0.97
    assert float(md[0]) < 0.85


def test_extract_knobs_change_output() -> None:
    h, a = _anisotropic(60, 1)
    base = ExtractConfig(method="lda", k=1, lda_shrinkage=None, lda_solver="lsqr")
    ref = extract_layer(h, a, base).basis
    for changed in (replace(base, lda_shrinkage=0.9), replace(base, projected=True),
                    replace(base, method="mean_diff")):
        assert not torch.allclose(extract_layer(h, a, changed).basis, ref, atol=1e-4), changed
    # eigen and lsqr solve the same shrunk problem: same direction up to round-off.
    eigen = extract_layer(h, a, replace(base, lda_solver="eigen")).basis
    assert abs(float(eigen[0] @ ref[0])) > 0.999
    p = make_planted()
    h, a = harmful_harmless(p, 100, 100, seed=0)
    assert extract_layer(h, a, ExtractConfig(k=3)).k == 3
    assert extract_layer(h, a, ExtractConfig(k=5)).k == 5


def test_rank_one_methods_reject_k_above_one() -> None:
    with pytest.raises(ConfigError, match="extract.k"):
        ExtractConfig(method="mean_diff", k=4)
    with pytest.raises(ConfigError, match="extract.lda_solver"):
        ExtractConfig(method="lda", k=1, lda_solver="svd")


def test_fewer_prompts_than_k_names_layer_and_split() -> None:
    p = make_planted()
    h, a = harmful_harmless(p, 3, 50, seed=0)
    with pytest.raises(ActivationError, match=r"layer 7, split 'fit'.*3 harmful prompts.*extract.k = 4"):
        extract_layer(h, a, ExtractConfig(k=4), layer=7, split="fit")


def test_constant_activations_are_rejected() -> None:
    x = torch.ones(20, 16)
    with pytest.raises(ActivationError, match=r"layer 2, split 'fit'.*constant"):
        extract_layer(x, x.clone(), ExtractConfig(), layer=2)
    # harmful constant but harmless varying: D has rank 1 < k
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ActivationError, match=r"layer 2, split 'fit'.*rank 1 < extract.k = 4"):
        extract_layer(x, torch.randn(20, 16, generator=gen), ExtractConfig(), layer=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["harmful", "harmless"])
def test_non_finite_activations_are_rejected(bad: float, kind: str) -> None:
    p = make_planted()
    h, a = harmful_harmless(p, 30, 30, seed=0)
    (h if kind == "harmful" else a)[4, 3] = bad
    where = re.escape(f"layer 9, kind '{kind}', split 'fit'")
    with pytest.raises(ActivationError, match=where + r".*NaN or Inf.*\[4\]"):
        extract_layer(h, a, ExtractConfig(), layer=9)


def test_save_load_round_trip(tmp_path) -> None:
    p = make_planted()
    layers = {l: extract_layer(*harmful_harmless(p, 50, 50, seed=l), ExtractConfig(), layer=l)
              for l in range(3)}
    save_directions(layers, tmp_path)
    back = load_directions(tmp_path)
    assert sorted(back) == [0, 1, 2]
    for l in range(3):
        assert torch.equal(back[l].basis, layers[l].basis)
        assert torch.equal(back[l].singular_values, layers[l].singular_values)
    table = directions_frame(layers)
    assert list(table.columns) == ["layer", "index", "position", "singular_value", "energy_share",
                                   "mean_proj_harmful", "mean_proj_harmless"]
    assert len(table) == 12 and set(table["position"]) == {-1}


def test_directions_from_several_positions_keep_where_they_were_found(tmp_path) -> None:
    """Each position gets its own orthonormal basis; the joined layer lists them in position order
    and the position of every row survives the round trip."""
    p = make_planted()
    parts = {pos: extract_layer(*harmful_harmless(p, 50, 50, seed=pos + 10), ExtractConfig(k=3), layer=2)
             for pos in (2, -1, 1)}
    joined = join_positions(parts)
    assert joined.positions.tolist() == [-1] * 3 + [1] * 3 + [2] * 3
    for pos, start in ((-1, 0), (1, 3), (2, 6)):
        assert torch.equal(joined.basis[start:start + 3], parts[pos].basis)
        gram = joined.basis[start:start + 3] @ joined.basis[start:start + 3].T
        torch.testing.assert_close(gram, torch.eye(3), atol=1e-5, rtol=0)
    save_directions({2: joined}, tmp_path)
    back = load_directions(tmp_path)[2]
    assert back.positions.tolist() == joined.positions.tolist() and torch.equal(back.basis, joined.basis)
