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
    def cell(v: object) -> str:
        if v is None or (isinstance(v, float) and v != v):  # not measured at that point
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[cell(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


# entanglement columns shown; benefit, cost and joined exist in measured / calibrated modes only
TABLE_COLUMNS = ("layer", "index", "fdr", "rho", "rho_var", "purity", "class", "benefit", "cost", "joined", "alpha")


def calibration_section(entangle_dir: Path) -> list[str]:
    """The calibration trace (every point it evaluated on the held-out probes), when it ran."""
    path = entangle_dir / "calibration.parquet"
    if not path.exists():
        return []
    trace = pd.read_parquet(path)
    return ["The calibration on the held-out probes, every point in evaluation order (refusal: harmful "
            "probes, drift: NLL increase of the model's own answers to harmless probes in nats/token; "
            "protection: the least-squares weight mu, empty for the projection; skill drift: the same "
            "on the capability probes, measured in the final comparison of the two methods):",
            markdown_table(trace)]


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
        f"Produced by `{command.strip()}` on the default organism (extract {cfg.extract.method} k = "
        f"{cfg.extract.k}, rank {cfg.rank.strategy} top-k {cfg.rank.top_k}, entangle mode {cfg.entangle.mode}, "
        f"calibrate {str(cfg.entangle.calibrate).lower()}, edit method {cfg.edit.method}: "
        f"{'the conf defaults' if not overrides else 'the conf defaults with the overrides above'}).",
        "Per (layer, direction): held-out FDR and AUC, energy share of the SVD, global rank, selection.",
        markdown_table(per_layer),
        "Entanglement of the selected directions and their strengths:",
        markdown_table(table.sort_values("rank")[[c for c in TABLE_COLUMNS if c in table.columns]]),
        *calibration_section(art["entangle"]),
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
