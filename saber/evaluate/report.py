"""Evaluation outputs: summary.json, parquet tables, report.md, the KL profile plot, a model card."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from saber.evaluate.core import EvalResult

SUMMARY = "summary.json"
GENERATIONS = "generations.parquet"
DIVERGENCE = "divergence.parquet"
REPORT = "report.md"
KL_PLOT = "kl_profile.png"


def _json_safe(value: Any) -> Any:
    """NaN/inf become None so summary.json is strict JSON (readers need not special-case NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return _json_safe(value.item())
    return value


def write_outputs(result: EvalResult, out_dir: Path, *, extra: Mapping[str, Any] | None = None,
                  plots: bool = True) -> list[str]:
    """Write every evaluation file into out_dir; returns the file names written."""
    out_dir = Path(out_dir)
    summary = dict(result.summary)
    if extra:
        summary.update(extra)
    (out_dir / SUMMARY).write_text(json.dumps(_json_safe(summary), indent=1, allow_nan=False) + "\n",
                                   encoding="utf-8")
    result.generations.to_parquet(out_dir / GENERATIONS, index=False)
    result.divergence.to_parquet(out_dir / DIVERGENCE, index=False)
    (out_dir / REPORT).write_text(report_markdown(summary), encoding="utf-8")
    written = [SUMMARY, GENERATIONS, DIVERGENCE, REPORT]
    if plots and summary["kl"]["profile"]:
        plot_kl_profile(summary, out_dir / KL_PLOT)
        written.append(KL_PLOT)
    return written


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _rate(r: Mapping[str, Any]) -> str:
    return f"{_fmt(r['rate'], 3)} [{_fmt(r['lo'], 3)}, {_fmt(r['hi'], 3)}] (n={r['n']})"


def evaluation_table(summary: Mapping[str, Any]) -> str:
    """The headline table (Markdown): refusal, drift and capability, base against edited."""
    lines = ["| metric | base | edited | delta |", "|---|---|---|---|"]
    names = {"harmful": "refusal rate, harmful (95% Wilson)", "harmless": "over-refusal, harmless",
             "xstest": "over-refusal, XSTest safe"}
    for key, label in names.items():
        r = summary["refusal"].get(key)
        if r:
            lines.append(f"| {label} | {_rate(r['base'])} | {_rate(r['edited'])} | {_fmt(r['delta'], 3)} |")
        if r and "fragments" in r:
            lines.append(f"| {label.split(' (')[0]}: refusal phrase anywhere (fragments) | | "
                         f"{_rate(r['fragments'])} | |")
    kl = summary["kl"]
    lines.append(f"| first-token KL, mean (nats) | 0 | {_fmt(kl['first_token']['mean'])} | |")
    tf = kl["teacher_forced"]
    for stat in ("mean", "rmse", "p95", "max"):
        lines.append(f"| teacher-forced KL, {stat} (nats) | 0 | {_fmt(tf[stat])} | |")
    lines.append(f"| top-1 agreement on base continuation | 1 | {_fmt(tf['top1_agreement'], 3)} | |")
    for key, p in summary["perplexity"].items():
        lines.append(f"| perplexity, {key.replace('_', ' ')} | {_fmt(p['base'], 3)} | {_fmt(p['edited'], 3)} | "
                     f"{_fmt(p['delta'], 3)} |")
    for key, c in summary["capability"].items():
        lines.append(f"| {key} accuracy ({c['kind'].replace('_', ' ')}) | {_rate(c['base'])} | {_rate(c['edited'])} | "
                     f"{_fmt(c['delta'], 3)} |")
    proxy = summary.get("residual_proxy")
    if proxy:
        lines.append(f"| residual refusal proxy: max FDR along original directions | {_fmt(proxy['base_max_fdr'])} | "
                     f"{_fmt(proxy['edited_max_fdr'])} | |")
    return "\n".join(lines)


def report_markdown(summary: Mapping[str, Any]) -> str:
    s = summary["settings"]
    parts = [
        "# SABER evaluation",
        "",
        evaluation_table(summary),
        "",
        f"Refusal: greedy answers of {s['max_new_tokens']} tokens, scorer `{s['scorer']}`. "
        f"Teacher-forced KL(P_base || P_edit): both models score the base model's greedy continuation "
        f"({s['kl_tokens']} tokens, cut at EOS) of the harmless prompts; statistics over all valid "
        f"(prompt, position) pairs; first-token KL is position 0 of the same pass. Base distributions "
        f"kept as top-{s['kl_topk'] or 'all'} tokens plus a tail bucket (vocabulary {s['vocab']}).",
    ]
    if summary["kl"]["profile"]:
        parts += ["", "Per-position mean KL (nats):", "",
                  "| position | " + " | ".join(str(k) for k in summary["kl"]["profile"]) + " |",
                  "|---|" + "---|" * len(summary["kl"]["profile"]),
                  "| KL | " + " | ".join(_fmt(v, 3) for v in summary["kl"]["profile"].values()) + " |"]
    sig = summary.get("signature")
    if sig:
        parts += ["", f"Learned refusal signature (`auto` scorer; {sig['n_openings']} openings, {sig['n_phrases']} "
                  f"phrases, learned from the base model's answers to the fit probes, where it labels "
                  f"{_fmt(sig['base_harmful_refusal_fit'], 3)} of harmful and {_fmt(sig['base_harmless_refusal_fit'], 3)} "
                  "of harmless answers as refusals):", "",
                  "- openings: " + ", ".join(f"`{o}`" for o in sig["openings"]) if sig["openings"] else "- openings: none",
                  "- phrases: " + ", ".join(f"`{p}`" for p in sig["phrases"]) if sig["phrases"] else "- phrases: none"]
    if summary.get("warnings"):
        parts += ["", "## Warnings", ""] + [f"- {w}" for w in summary["warnings"]]
    return "\n".join(parts) + "\n"


def plot_kl_profile(summary: Mapping[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prof = summary["kl"]["profile"]
    xs = [int(k) for k in prof]
    ys = [v if v is not None else float("nan") for v in prof.values()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, ys, "o-", color="tab:blue", label="mean KL at position")
    tf = summary["kl"]["teacher_forced"]
    if tf["mean"] is not None and math.isfinite(tf["mean"]):
        ax.axhline(tf["mean"], color="tab:red", ls="--", label="mean over positions")
    ax.set_xlabel("response position (token)")
    ax.set_ylabel("KL(P_base || P_edit), nats")
    ax.set_title("Teacher-forced KL along the base continuation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def model_card_text(summary: Mapping[str, Any], *, method: str = "saber", config: Mapping[str, Any] | None = None,
                    base_model: str = "") -> str:
    """Model card section for an exported model: method, config and the evaluation table."""
    parts = ["## Refusal ablation (SABER)", ""]
    parts.append(f"This model was edited with SABER (method `{method}`)" +
                 (f" from `{base_model}`" if base_model else "") +
                 ": weights that write into the residual stream were orthogonalised against refusal "
                 "directions, with strengths reduced for directions entangled with capability.")
    parts += ["", "### Evaluation", "", evaluation_table(summary), ""]
    if config:
        parts += ["### Configuration", "", "```json", json.dumps(_json_safe(dict(config)), indent=1, sort_keys=True),
                  "```", ""]
    return "\n".join(parts)
