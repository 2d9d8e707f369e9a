"""Score (layer, direction) pairs by how well they separate harmful from harmless, and select.

FDR(v) = (mean(H.v) - mean(A.v))^2 / (var(H.v) + var(A.v) + eps): a squared distance over a
squared spread, dimensionless, computed in float64 with unbiased (n - 1) variances. Directions
are fitted on the fit split, so scores are computed on the held-out split: a direction that
separates the fit prompts by chance (many dimensions, few prompts) scores near 0 there.
ROC AUC (probability that a random harmful prompt projects higher than a random harmless one)
is reported next to FDR; it ignores scale and is robust to outliers.

Significance: with many (layer, direction) pairs and ~100 held-out prompts, noise directions
reach small positive FDRs. Each pair's held-out FDR is compared with its permutation null
(harmful/harmless labels shuffled among the held-out projections): p = (1 + #{FDR_perm >=
FDR}) / (1 + n_perm), then Holm-corrected over every pair tested. Only pairs with corrected
p <= rank.significance are eligible for selection; rank.top_k is an upper bound, applied to
prompt-position and answer-position directions separately.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Mapping, Optional

import numpy as np
import pandas as pd
import torch

from saber.directions import ActivationError, check_activations

if TYPE_CHECKING:
    from saber.config import RankConfig

log = logging.getLogger("saber.ranking")
RANKING_TABLE = "ranking.parquet"
SCORE_COLUMNS = ["layer", "index", "position", "fdr", "auc", "p_value"]
_POSITION_SEED = 104729  # seed stride between the positions of one layer
_PERM_CHUNK = 256  # permutations evaluated per vectorised step, count


def permutation_pvalues(hp: np.ndarray, ap: np.ndarray, eps: float, n_perm: int, seed: int) -> np.ndarray:
    """Per row of the projections [k, n_h] and [k, n_a]: p-value of its FDR under shuffled labels."""
    pooled = np.concatenate([hp, ap], axis=1).astype(np.float64)
    n_h, n = hp.shape[1], pooled.shape[1]
    observed = fdr(hp, ap, eps)
    rng = np.random.default_rng(seed)
    exceed = np.zeros(pooled.shape[0])
    for start in range(0, n_perm, _PERM_CHUNK):
        m = min(_PERM_CHUNK, n_perm - start)
        order = np.argsort(rng.random((m, n)), axis=1)  # m label shuffles
        perm = pooled[:, order]  # [k, m, n]
        null = fdr(perm[..., :n_h], perm[..., n_h:], eps)  # [k, m]
        exceed += (null >= observed[:, None] * (1 - 1e-12)).sum(axis=1)
    return (1.0 + exceed) / (1.0 + n_perm)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (family-wise error over every pair tested)."""
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def permutations_needed(n_pairs: int, significance: float, floor: int) -> int:
    """At least `floor` shuffles, and enough that the best possible corrected p-value is at most
    half the level (no raise when the test is off, significance 1)."""
    return max(floor, int(np.ceil(2.0 * n_pairs / significance)) - 1) if significance < 1.0 else floor


def fdr(h_proj: np.ndarray, a_proj: np.ndarray, eps: float) -> np.ndarray:
    """Fisher discriminant ratio along the last axis of two projection arrays [..., n]."""
    h = np.asarray(h_proj, dtype=np.float64)
    a = np.asarray(a_proj, dtype=np.float64)
    gap = h.mean(-1) - a.mean(-1)
    return gap**2 / (h.var(-1, ddof=1) + a.var(-1, ddof=1) + eps)


def auc(h_proj: np.ndarray, a_proj: np.ndarray) -> float:
    """ROC AUC of the projection as a harmful-vs-harmless score (scikit-learn)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(h_proj)), np.zeros(len(a_proj))]
    return float(roc_auc_score(y, np.r_[h_proj, a_proj]))


def score_layer(h: torch.Tensor, a: torch.Tensor, basis: torch.Tensor, *, eps: float,
                layer: int = -1, split: str = "heldout", n_permutations: int = 0, seed: int = 0) -> pd.DataFrame:
    """FDR, AUC and permutation p-value (NaN without permutations) of every row of `basis` [k, d]
    on activations H [n_h, d], A [n_a, d]."""
    h64 = check_activations(h, layer=layer, kind="harmful", split=split, min_rows=2)
    a64 = check_activations(a, layer=layer, kind="harmless", split=split, min_rows=2)
    b = basis.detach().to(torch.float64)
    if b.shape[1] != h64.shape[1]:
        raise ActivationError(f"layer {layer}, split '{split}': directions have width {b.shape[1]} "
                              f"but activations {h64.shape[1]}; extract and collect disagree")
    hp = (h64 @ b.T).numpy().T  # [k, n_h]
    ap = (a64 @ b.T).numpy().T
    spread = hp.var(-1, ddof=1) + ap.var(-1, ddof=1)
    if np.any(spread == 0):
        bad = np.flatnonzero(spread == 0).tolist()
        raise ActivationError(f"layer {layer}, split '{split}': harmful and harmless projections "
                              f"on directions {bad} are constant; the activations do not vary "
                              "across prompts, so FDR is undefined")
    scores = fdr(hp, ap, eps)
    p = (permutation_pvalues(hp, ap, eps, n_permutations, seed + 7919 * (layer + 1)) if n_permutations
         else np.full(b.shape[0], np.nan))
    return pd.DataFrame({
        "layer": layer, "index": np.arange(b.shape[0]),
        "fdr": scores, "auc": [auc(hp[i], ap[i]) for i in range(b.shape[0])], "p_value": p,
    })


def score_pairs(heldout: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
                bases: Mapping[int, torch.Tensor], *, eps: float, split: str = "heldout",
                significance: float = 1.0, n_permutations: int = 0, seed: int = 0) -> pd.DataFrame:
    """FDR, AUC and permutation p-values for every (layer, direction); `heldout[layer] = (H, A)`.

    With significance < 1 the shuffles are raised to `permutations_needed` for the number of pairs.
    """
    missing = sorted(set(bases) - set(heldout))
    if missing:
        raise ActivationError(f"no {split} activations for layers {missing} that have directions")
    last = {l: torch.full((int(b.shape[0]),), -1, dtype=torch.long) for l, b in bases.items()}
    return score_positions(lambda l, _p: heldout[l], bases, last, eps=eps, split=split,
                           significance=significance, n_permutations=n_permutations, seed=seed)


def score_positions(heldout_at: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
                    bases: Mapping[int, torch.Tensor], positions: Mapping[int, torch.Tensor], *, eps: float,
                    split: str = "heldout", significance: float = 1.0, n_permutations: int = 0,
                    seed: int = 0) -> pd.DataFrame:
    """`score_pairs` for (layer, position, direction) triples: every row of a layer's basis is
    scored on the held-out activations at the position it was found at (`positions[layer][i]`),
    and the Holm correction later runs over all triples together.
    """
    n_pairs = sum(int(b.shape[0]) for b in bases.values())
    n_perm = permutations_needed(n_pairs, significance, n_permutations)
    frames = []
    for l in sorted(bases):
        labels = positions[l]
        for p in sorted(set(labels.tolist())):
            rows = torch.nonzero(labels == p).flatten()
            offset = 0 if p == -1 else _POSITION_SEED * (1000 + p)  # the last prompt token keeps its shuffles
            frame = score_layer(*heldout_at(l, p), bases[l][rows], eps=eps, layer=l, split=split,
                                n_permutations=n_perm, seed=seed + offset)
            frame["index"] = rows.numpy()
            frame["position"] = p
            frames.append(frame)
    out = pd.concat(frames, ignore_index=True).sort_values(["layer", "index"], ignore_index=True)
    out.attrs["n_permutations"] = n_perm
    return out


def relative_depth(layer: np.ndarray | int, n_layers: int) -> np.ndarray:
    """layer / (L - 1), the position of a layer in [0, 1] (0 for a one-layer model)."""
    return np.asarray(layer, dtype=np.float64) / max(n_layers - 1, 1)


SIDE_NAMES = {-1: "prompt-position", 1: "answer-position"}


def position_sides(table: pd.DataFrame) -> np.ndarray:
    """-1 for a direction found at a prompt position (the default: no `position` column), +1 for one
    found at an answer position. `global_topk` keeps top_k of each side: answer-token directions
    separate far more strongly (10-100x the FDR on the hard organisms) and would otherwise crowd out
    every last-token one."""
    if "position" not in table:
        return np.full(len(table), -1)
    return np.where(table["position"].to_numpy() > 0, 1, -1)


def select(scores: pd.DataFrame, cfg: "RankConfig", n_layers: int,
           purity: Optional[pd.Series] = None) -> pd.DataFrame:
    """Add `score`, `rank` (1 = best over all pairs) and `selected` to a score table.

    score is FDR, or FDR x purity when rank.score = fdr_purity (then `purity` must be aligned
    with the rows). Only layers inside the depth window are eligible for selection.
    """
    out = scores.copy().reset_index(drop=True)
    if cfg.score == "fdr_purity":
        if purity is None:
            raise ValueError("rank.score = fdr_purity needs the purity of every pair "
                             "(capability activations); none were given")
        out["score"] = out["fdr"].to_numpy() * np.asarray(purity, dtype=np.float64)
    else:
        out["score"] = out["fdr"].astype(np.float64)
    order = np.lexsort((out["index"].to_numpy(), out["layer"].to_numpy(), -out["score"].to_numpy()))
    out["rank"] = 0
    out.loc[order, "rank"] = np.arange(1, len(out) + 1)
    depth = relative_depth(out["layer"].to_numpy(), n_layers)
    eligible = (depth >= cfg.depth_min - 1e-12) & (depth <= cfg.depth_max + 1e-12)
    if not eligible.any():
        raise ValueError(f"rank.depth_min = {cfg.depth_min} and rank.depth_max = {cfg.depth_max} "
                         f"leave no layer of {n_layers} eligible; widen the depth window")
    p = out["p_value"].to_numpy(dtype=np.float64) if "p_value" in out else np.full(len(out), np.nan)
    tested = bool(np.isfinite(p).all())  # tables scored without permutations have no p-values
    out["p_value"] = p
    out["p_adjusted"] = holm(p) if tested else p
    out["significant"] = out["p_adjusted"].to_numpy() <= cfg.significance if tested else True
    if cfg.significance < 1.0 and tested:
        if not (eligible & out["significant"].to_numpy()).any():
            best = next(i for i in order if eligible[i])
            log.warning("no (layer, direction) pair beats its permutation null at rank.significance = %g "
                        "(best corrected p %.3g); keeping only the best pair, layer %d direction %d",
                        cfg.significance, float(out["p_adjusted"][eligible].min()),
                        int(out["layer"][best]), int(out["index"][best]))
            out.loc[best, "significant"] = True
        eligible = eligible & out["significant"].to_numpy()
    chosen = np.zeros(len(out), dtype=bool)
    if cfg.strategy == "global_topk":
        sides = position_sides(out)
        for side in sorted(set(sides.tolist())):
            ranked = [i for i in order if eligible[i] and sides[i] == side]
            if len(ranked) < cfg.top_k:
                log.info("rank.top_k = %d is an upper bound: %d %s pairs are eligible (significant, inside the "
                         "depth window); selecting all of them", cfg.top_k, len(ranked), SIDE_NAMES[side])
            chosen[ranked[: cfg.top_k]] = True
    elif cfg.strategy == "layer_topk":
        best = out[eligible].groupby("layer")["score"].max().sort_values(ascending=False, kind="stable")
        keep = set(best.index[: cfg.layer_top_k].tolist())
        chosen = eligible & out["layer"].isin(keep).to_numpy()
    elif cfg.strategy == "threshold":
        chosen = eligible & (out["score"].to_numpy() >= cfg.threshold)
        if not chosen.any():
            log.warning("rank.threshold = %g selects no pair (best score %.4g)", cfg.threshold,
                        float(out["score"][eligible].max()))
    elif cfg.strategy == "all":
        chosen = eligible.copy()
    else:
        raise ValueError(f"rank.strategy = {cfg.strategy!r}; use global_topk, layer_topk, threshold or all")
    out["selected"] = chosen
    where = ["position"] if "position" in out else []
    return out[["layer", "index", *where, "fdr", "auc", "p_value", "p_adjusted", "significant", "score", "rank",
                "selected"]]
