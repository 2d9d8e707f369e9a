"""PNG plots of the analysis stages (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fdr_heatmap(ranking: pd.DataFrame, path: Path,
                title: str = "FDR (held-out) per layer and direction") -> Path:
    """Layer x direction heat map of FDR, selected pairs outlined, corrected p-values written in
    (grey: not significant); written to `path`."""
    plt = _pyplot()
    layers = sorted(ranking["layer"].unique())
    k = int(ranking["index"].max()) + 1
    grid = np.full((len(layers), k), np.nan)
    row_of = {layer: i for i, layer in enumerate(layers)}
    for rec in ranking.to_dict("records"):
        grid[row_of[rec["layer"]], int(rec["index"])] = rec["fdr"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.35 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    for rec in ranking[ranking["selected"]].to_dict("records"):
        ax.add_patch(plt.Rectangle((int(rec["index"]) - 0.5, row_of[rec["layer"]] - 0.5), 1, 1,
                                   fill=False, edgecolor="red", linewidth=1.5))
    if "p_adjusted" in ranking:  # corrected permutation p-value in every cell
        for rec in ranking.to_dict("records"):
            ax.text(int(rec["index"]), row_of[rec["layer"]], f"p={rec['p_adjusted']:.2g}", ha="center", va="center",
                    fontsize=6, color="white" if rec.get("significant", True) else "0.6")
    ax.set_xticks(range(k))
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_xlabel("direction index")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="FDR")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def entanglement_scatter(table: pd.DataFrame, tau: float, path: Path,
                         title: str = "Refusal separation against capability overlap") -> Path:
    """FDR against rho per selected direction, coloured by class, with the tau line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    colours = {"refusal": "tab:blue", "entangled": "tab:orange"}
    for cls, colour in colours.items():
        part = table[table["class"] == cls]
        ax.scatter(part["rho"], part["fdr"], c=colour, label=f"{cls} ({len(part)})", s=22)
    for rec in table.to_dict("records"):
        ax.annotate(f"L{rec['layer']}.{rec['index']}", (rec["rho"], rec["fdr"]), fontsize=6,
                    xytext=(2, 2), textcoords="offset points")
    ax.axvline(tau, color="grey", linestyle="--", label=f"tau = {tau:g}")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("rho = ||C^T v||^2 (capability overlap)")
    ax.set_ylabel("FDR (held-out)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
