"""Write the "Results on the default organism" section of docs/ANALYSIS.md.

    python scripts/analysis_results.py [hydra overrides]

Runs (or reuses from the store) collect, extract, rank and entangle with the given overrides,
then renders the per-layer FDR table, the selected plan and both plots into the docs.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

from saber.config import register_configs, validate
from saber.config.paths import CONF_DIR
from saber.run import run_pipeline

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ANALYSIS.md"
IMG = ROOT / "docs" / "img"
HEADING = "## 4. Results on the default organism"


def markdown_table(frame: pd.DataFrame) -> str:
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def main(overrides: list[str]) -> None:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = validate(compose("config", overrides=["stages=[collect,extract,rank,entangle]", *overrides]))
    art = run_pipeline(cfg).artifacts
    ranking = pd.read_parquet(art["rank"] / "ranking.parquet")
    directions = pd.read_parquet(art["extract"] / "directions.parquet")
    table = pd.read_parquet(art["entangle"] / "entanglement.parquet")
    plan = pd.read_parquet(art["entangle"] / "plan.parquet")

    per_layer = ranking.merge(directions[["layer", "index", "energy_share"]], on=["layer", "index"])
    per_layer = per_layer.sort_values(["layer", "index"])[["layer", "index", "fdr", "auc", "energy_share", "rank",
                                                           "selected"]]
    IMG.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(art["rank"] / "fdr_heatmap.png", IMG / "organism_fdr_heatmap.png")
    shutil.copyfile(art["entangle"] / "entanglement.png", IMG / "organism_entanglement.png")
    command = "python scripts/analysis_results.py " + " ".join(overrides)
    body = "\n\n".join([
        HEADING,
        f"Produced by `{command.strip()}` (default config: svd k = {cfg.extract.k}, global top-k "
        f"{cfg.rank.top_k}, m = {cfg.entangle.m}, tau = {cfg.entangle.tau}, alpha_base "
        f"{cfg.entangle.alpha_base}, alpha_entangled {cfg.entangle.alpha_entangled}) on the default organism.",
        "Per (layer, direction): held-out FDR and AUC, energy share of the SVD, global rank, selection.",
        markdown_table(per_layer),
        "Entanglement of the selected directions and their strengths:",
        markdown_table(table.sort_values("rank")[["layer", "index", "fdr", "rho", "rho_var", "purity", "class",
                                                  "alpha"]]),
        "The edit plan (order of application, strength, part):",
        markdown_table(plan[["rank", "layer", "index", "alpha", "part"]]),
        "![FDR heat map](img/organism_fdr_heatmap.png)",
        "![Entanglement scatter](img/organism_entanglement.png)",
    ])
    text = DOC.read_text()
    start = text.index(HEADING)
    end = text.find("\n## ", start + len(HEADING))
    DOC.write_text(text[:start] + body + "\n" + ("" if end < 0 else text[end:]))
    print(f"updated {DOC}")


if __name__ == "__main__":
    main(sys.argv[1:])
