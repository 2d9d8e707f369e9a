"""Residual refusal proxy: how well the original refusal directions still separate the edited model.

FDR(v) = (mean(H.v) - mean(A.v))^2 / (var(H.v) + var(A.v) + eps) on held-out harmful (H) and
harmless (A) activations at the last prompt token, per (layer, direction). Reported next to the
generated refusal rate, never instead of it: a direction can stop separating while the model
still refuses through another route, and the reverse.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from saber.model.chat import encode_ids, pad_left, position_ids, render_prompts
from saber.model.hooks import StopForward, capture_last_positions
from saber.ranking import fdr


@torch.no_grad()
def last_token_activations(model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int,
                           system_prompt: str | None = None, max_length: int = 1024) -> list[torch.Tensor]:
    """Residual stream after every decoder layer at the last prompt token: per layer float32 [n, d]."""
    ids, _ = encode_ids(tokenizer, render_prompts(tokenizer, list(prompts), system_prompt), max_length)
    device = model.get_input_embeddings().weight.device
    chunks: list[list[torch.Tensor]] = []
    with capture_last_positions(model, 1, stop_after_last=True) as cap:
        for start in range(0, len(ids), batch_size):
            enc = pad_left(ids[start:start + batch_size], tokenizer.pad_token_id, device)
            try:
                model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False)
            except StopForward:
                pass
            chunks.append([t[:, -1, :] for t in cap.take()])
    return [torch.cat([c[layer] for c in chunks]) for layer in range(len(chunks[0]))]


def fdr_table(harmful: Sequence[torch.Tensor], harmless: Sequence[torch.Tensor],
              directions: Mapping[int, torch.Tensor], eps: float) -> pd.DataFrame:
    """FDR per (layer, direction index) of per-layer activations along the given [k, d] bases."""
    rows = []
    for layer, basis in sorted(directions.items()):
        b = basis.double()
        hp = (harmful[layer].double() @ b.T).T.numpy()
        ap = (harmless[layer].double() @ b.T).T.numpy()
        for index, value in enumerate(fdr(hp, ap, eps)):
            rows.append({"layer": int(layer), "index": index, "fdr": float(value)})
    return pd.DataFrame(rows, columns=["layer", "index", "fdr"])


def residual_refusal_proxy(model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                           directions: Mapping[int, torch.Tensor], *, eps: float = 1e-8, batch_size: int = 16,
                           system_prompt: str | None = None, max_length: int = 1024) -> pd.DataFrame:
    """FDR of `model`'s activations along `directions` (layer -> [k, d]) on held-out prompts."""
    h = last_token_activations(model, tokenizer, harmful, batch_size, system_prompt, max_length)
    a = last_token_activations(model, tokenizer, harmless, batch_size, system_prompt, max_length)
    return fdr_table(h, a, directions, eps)


def proxy_before_after(acts: Any, directions: Mapping[int, torch.Tensor], model: Any, tokenizer: Any, *,
                       eps: float, batch_size: int, system_prompt: str | None,
                       max_length: int) -> tuple[dict[str, Any], pd.DataFrame]:
    """Held-out FDR along `directions` before the edit (from the collect activations `acts`) and
    after it (a new capture on the edited `model`): a summary and the per-(layer, index) table.
    At iteration 0 these are the original directions."""
    layers = sorted(directions)
    base = fdr_table([acts.get(l, "harmful", "heldout") if l in directions else None for l in acts.layers],
                     [acts.get(l, "harmless", "heldout") if l in directions else None for l in acts.layers],
                     directions, eps)
    edited = residual_refusal_proxy(
        model, tokenizer, list(acts.rows("harmful", "heldout")["text"]), list(acts.rows("harmless", "heldout")["text"]),
        directions, eps=eps, batch_size=batch_size, system_prompt=system_prompt, max_length=max_length)
    table = base.rename(columns={"fdr": "fdr_base"}).merge(edited.rename(columns={"fdr": "fdr_edited"}),
                                                           on=["layer", "index"])
    summary = {"base_max_fdr": float(table["fdr_base"].max()), "edited_max_fdr": float(table["fdr_edited"].max()),
               "base_mean_fdr": float(table["fdr_base"].mean()), "edited_mean_fdr": float(table["fdr_edited"].mean()),
               "layers": layers}
    return summary, table
