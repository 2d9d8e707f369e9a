"""Collect residual-stream activations of probe prompts, and the on-disk activations layout.

`collect_activations` renders prompts with the chat template, sorts them by length (less
padding), runs batched full forward passes with `capture_last_positions` hooks and returns, per
prompt kind, float32 [L, n, P + R, d] in the caller's prompt order: the last P prompt positions,
then, with `response_positions` R > 0, the first R positions of the model's own greedy answer
(teacher-forced: the answer is generated first, then read in the same pass as the prompt), where
a refusal and a helpful answer part ways. Only those positions are kept. Layout on disk (see
docs/ARCHITECTURE.md, "Activations layout"): `prompts.parquet` with one row per prompt and
`activations.safetensors` with key `layer{l}.{kind}` -> float32 [n_kind, P, d], rows in the
order of that kind's rows in `prompts.parquet`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from saber.model.chat import encode_ids, pad_left, position_ids, render_prompts
from saber.model.hooks import StopForward, capture_last_positions
from saber.model.loading import input_device
from saber.tensorfile import save_tensors

log = logging.getLogger("saber.collect")

PROMPTS_FILE = "prompts.parquet"
ACTIVATIONS_FILE = "activations.safetensors"
PROMPT_COLUMNS = ("id", "kind", "split", "text", "n_tokens")
CPU_MAX_BATCH = 32
FREED_SPLIT = "freed"  # harmful fit prompts an earlier plan freed from refusal (stages/collect.py)
REGENERATE = "python -m stages.collect <same overrides> force=true"


@dataclass
class CollectResult:
    """Activations per kind plus what the run measured."""

    activations: dict[str, torch.Tensor]
    n_tokens: dict[str, list[int]]
    batch_size: int
    seconds: float
    truncated: int = 0
    tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def _initial_batch_size(device: torch.device, batch_size: int, max_batch_size: int) -> int:
    if batch_size > 0:
        return batch_size
    if device.type == "cuda":
        return max_batch_size
    return min(max_batch_size, CPU_MAX_BATCH)


def _forward(model: torch.nn.Module, ids: list[list[int]], pad_id: int, device: torch.device) -> None:
    batch = pad_left(ids, pad_id, device)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=position_ids(batch["attention_mask"]), use_cache=False)
    except StopForward:
        pass


def collect_with_stats(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Mapping[str, Sequence[str]],
    *,
    positions: int = 1,
    response_positions: int = 0,
    batch_size: int = 0,
    max_batch_size: int = 64,
    max_length: int = 256,
    system_prompt: str | None = None,
    progress: bool = True,
) -> CollectResult:
    """`collect_activations` that also reports token counts, the batch size used and the time.

    batch_size 0 picks it automatically: on CUDA start at max_batch_size and halve on
    out-of-memory (the failed batch is retried); on the CPU use min(max_batch_size, 32).
    """
    if positions < 1 or response_positions < 0:
        raise ValueError(f"collect.positions = {positions}, collect.response_positions = {response_positions}: "
                         "expected an integer >= 1 and one >= 0")
    if batch_size < 0 or max_batch_size < 1:
        raise ValueError(f"collect.batch_size = {batch_size}, collect.max_batch_size = "
                         f"{max_batch_size}: expected batch_size >= 0 and max_batch_size >= 1")
    kinds = [k for k in prompts]
    for kind in kinds:
        if isinstance(prompts[kind], str) or len(prompts[kind]) == 0:
            raise ValueError(f"prompt kind {kind!r} must be a non-empty sequence of texts")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; load it with saber.model.loading.load_tokenizer")
    if tokenizer.padding_side != "left":
        raise ValueError("tokenizer pads on the right; position -1 would read pad tokens. "
                         "Load it with saber.model.loading.load_tokenizer (left padding)")

    # One flat list over all kinds, so batches mix kinds and padding stays small.
    owners: list[tuple[str, int]] = [(k, i) for k in kinds for i in range(len(prompts[k]))]
    texts = [t for k in kinds for t in render_prompts(tokenizer, list(prompts[k]), system_prompt)]
    ids, truncated = encode_ids(tokenizer, texts, max_length)
    if truncated:
        log.warning("%d of %d prompts are longer than collect.max_length=%d tokens and were "
                    "truncated on the left", truncated, len(ids), max_length)
    for (kind, i), row in zip(owners, ids):
        if len(row) < positions:
            raise ValueError(f"prompt {i} of kind {kind!r} has {len(row)} tokens, fewer than "
                             f"collect.positions={positions}; lower collect.positions")
    n_prompt_tokens = [len(row) for row in ids]
    device = input_device(model)
    size = _initial_batch_size(device, batch_size, max_batch_size)
    pad_id = tokenizer.pad_token_id
    started = time.perf_counter()
    if response_positions:
        from saber.evaluate.generation import greedy_generate

        answers = greedy_generate(model, tokenizer, ids, response_positions, size, exact=True)
        ids = [row + answer for row, answer in zip(ids, answers)]
    captured = positions + response_positions
    order = sorted(range(len(ids)), key=lambda j: len(ids[j]), reverse=True)
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode(), capture_last_positions(model, captured, stop_after_last=True) as cap:
        bar = tqdm(total=len(order), desc="collect", unit="prompt", disable=not progress)
        start = 0
        while start < len(order):
            chunk = order[start:start + size]
            try:
                _forward(model, [ids[j] for j in chunk], pad_id, device)
            except torch.cuda.OutOfMemoryError:
                cap.clear()
                torch.cuda.empty_cache()
                if batch_size > 0 or size == 1:
                    raise RuntimeError(
                        f"out of GPU memory at batch size {size} (max {len(ids[chunk[0]])} tokens); "
                        "lower collect.batch_size or collect.max_length, or set collect.batch_size=0 "
                        "for automatic halving") from None
                size = max(1, size // 2)
                log.warning("out of GPU memory; retrying with batch size %d", size)
                continue
            layers = cap.take()
            if not out:
                n_layers, d = len(layers), layers[0].shape[-1]
                out = {k: torch.empty(n_layers, len(prompts[k]), captured, d) for k in kinds}
            stacked = torch.stack(layers)  # [L, B, P, d]
            for kind in kinds:
                pairs = [(row, owners[j][1]) for row, j in enumerate(chunk) if owners[j][0] == kind]
                if pairs:
                    src, dst = (torch.tensor(p, dtype=torch.long) for p in zip(*pairs))
                    out[kind][:, dst] = stacked[:, src]
            start += len(chunk)
            bar.update(len(chunk))
        bar.close()
    seconds = time.perf_counter() - started
    n_tokens: dict[str, list[int]] = {k: [] for k in kinds}
    for (kind, _), n in zip(owners, n_prompt_tokens):
        n_tokens[kind].append(n)
    total = sum(len(row) for row in ids)
    result = CollectResult(out, n_tokens, size, seconds, truncated, total)
    log.info("collected %d prompts x %d layers in %.1f s (%.0f tokens/s, batch size %d)",
             len(ids), len(next(iter(out.values()))), seconds, result.tokens_per_s, size)
    return result


def collect_activations(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Mapping[str, Sequence[str]],
    *,
    positions: int = 1,
    response_positions: int = 0,
    batch_size: int = 0,
    max_batch_size: int = 64,
    max_length: int = 256,
    system_prompt: str | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per kind, float32 [L, n, P + R, d]: residual stream after each decoder layer at the last P
    prompt positions (P = `positions`; index P - 1 is the last token of the generation prompt),
    then at the first R = `response_positions` positions of the model's greedy answer."""
    return collect_with_stats(
        model, tokenizer, prompts, positions=positions, response_positions=response_positions,
        batch_size=batch_size,
        max_batch_size=max_batch_size, max_length=max_length, system_prompt=system_prompt,
        progress=progress,
    ).activations


class NonFiniteActivationsError(ValueError):
    """Collected activations hold NaN or Inf; publishing them would poison every later stage."""


def check_finite(activations: Mapping[str, torch.Tensor], model: torch.nn.Module | None = None,
                 dtype: str | None = None) -> None:
    """Raise NonFiniteActivationsError naming the first layer with NaN/Inf, and why it may be.

    When the model's weights hold non-finite values the error names the first such tensor; the
    "use float32" hint is given only when the run was not float32 already.
    """
    n_layers = next(iter(activations.values())).shape[0]
    for layer in range(n_layers):
        bad = {kind: int((~torch.isfinite(acts[layer])).any(dim=-1).sum()) for kind, acts in activations.items()}
        bad = {kind: n for kind, n in bad.items() if n}
        if not bad:
            continue
        where = ", ".join(f"{n} {kind} prompt position(s)" for kind, n in bad.items())
        weight = None
        if model is not None:
            weight = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
        if weight is not None:
            hint = (f"the weights themselves hold NaN/Inf (first: tensor {weight!r}); the checkpoint at "
                    "model.path is damaged: restore or re-download it")
        elif dtype in ("float16", "bfloat16", "auto", None):
            hint = f"the weights are finite, so the {dtype or 'model'} forward pass overflows: set model.dtype=float32"
        else:
            hint = ("the weights are finite and the run is already float32: the model itself overflows on these "
                    "prompts; check the checkpoint and lower collect.max_length")
        raise NonFiniteActivationsError(
            f"collect: non-finite activations (NaN/Inf) first appear after decoder layer {layer} ({where}); "
            f"nothing was published. {hint}")


# ----------------------------------------------------------------------------- on-disk layout


def save_activations(out_dir: Path | str, activations: Mapping[str, torch.Tensor],
                     prompts: pd.DataFrame, response_positions: int = 0) -> None:
    """Write `prompts.parquet` and `activations.safetensors` into `out_dir`.

    `prompts` has columns id, kind, split, text, n_tokens; `activations[kind]` is [L, n, P + R, d]
    with its rows in the order of that kind's rows in `prompts`; the last R = `response_positions`
    of the position axis are answer positions.
    """
    out_dir = Path(out_dir)
    missing = [c for c in PROMPT_COLUMNS if c not in prompts.columns]
    if missing:
        raise ValueError(f"prompts frame lacks column(s) {missing}; expected {list(PROMPT_COLUMNS)}")
    tensors: dict[str, torch.Tensor] = {}
    shapes = {tuple(a.shape[:1]) + tuple(a.shape[2:]) for a in activations.values()}
    if len(shapes) != 1:
        raise ValueError(f"activations of different kinds disagree on (L, P, d): {sorted(shapes)}")
    for kind, acts in activations.items():
        n_rows = int((prompts["kind"] == kind).sum())
        if acts.dim() != 4 or acts.shape[1] != n_rows:
            raise ValueError(f"activations[{kind!r}] has shape {tuple(acts.shape)}; expected "
                             f"[L, {n_rows}, P, d] ({n_rows} rows of kind {kind!r} in prompts)")
        for layer in range(acts.shape[0]):
            tensors[f"layer{layer}.{kind}"] = acts[layer].to(torch.float32).contiguous()
    extra = sorted(set(prompts["kind"]) - set(activations))
    if extra:
        raise ValueError(f"prompts has kind(s) {extra} without activations")
    n_layers, positions, d_model = next(iter(shapes))
    if not 0 <= response_positions < positions:
        raise ValueError(f"response_positions = {response_positions} must leave at least one of the "
                         f"{positions} captured positions to the prompt")
    frame = prompts.loc[:, list(PROMPT_COLUMNS)].reset_index(drop=True)
    frame.to_parquet(out_dir / PROMPTS_FILE, index=False)
    meta = {"n_layers": str(n_layers), "positions": str(positions), "d_model": str(d_model),
            "response_positions": str(response_positions), "kinds": json.dumps(list(activations))}
    save_tensors(tensors, out_dir / ACTIVATIONS_FILE, metadata=meta)


class Activations:
    """Read access to a collect artifact: `get(layer, kind, split) -> [n, d]` float32."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.prompts_path = self.directory / PROMPTS_FILE
        self.tensors_path = self.directory / ACTIVATIONS_FILE
        for path in (self.prompts_path, self.tensors_path):
            if not path.is_file():
                raise FileNotFoundError(f"collect artifact {self.directory} lacks {path.name}; "
                                        f"regenerate it with: {REGENERATE}")
        self.prompts: pd.DataFrame = pd.read_parquet(self.prompts_path)
        missing = [c for c in PROMPT_COLUMNS if c not in self.prompts.columns]
        if missing:
            raise ValueError(f"{self.prompts_path} lacks column(s) {missing}; regenerate it with: "
                             f"{REGENERATE}")
        with safe_open(str(self.tensors_path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
        try:
            self.n_layers = int(meta["n_layers"])
            self.positions = int(meta["positions"])
            # Artifacts written before answer positions existed hold prompt positions only.
            self.response_positions = int(meta.get("response_positions", "0"))
            self.d_model = int(meta["d_model"])
            self.kinds: tuple[str, ...] = tuple(json.loads(meta["kinds"]))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{self.tensors_path} has no valid layout metadata ({exc}); "
                             f"regenerate it with: {REGENERATE}") from exc
        expected = {f"layer{l}.{k}" for l in range(self.n_layers) for k in self.kinds}
        if expected - keys:
            raise ValueError(f"{self.tensors_path} lacks tensors {sorted(expected - keys)[:4]}; "
                             f"regenerate it with: {REGENERATE}")
        self._rows = {k: self.prompts[self.prompts["kind"] == k].reset_index(drop=True)
                      for k in self.kinds}
        self._layer_cache: dict[str, Any] = {}  # "layer" and kind -> tensor of the layer read last

    @property
    def prompt_positions(self) -> int:
        return self.positions - self.response_positions

    @property
    def position_labels(self) -> list[int]:
        """Every captured position: -P..-1 (trailing prompt tokens), then 1..R (answer tokens)."""
        return [*range(-self.prompt_positions, 0), *range(1, self.response_positions + 1)]

    @property
    def layers(self) -> range:
        return range(self.n_layers)

    def rows(self, kind: str, split: str | None = None) -> pd.DataFrame:
        """The prompts rows of `kind` (and `split`), in the order of the activation rows."""
        frame = self._kind_rows(kind)
        if split is None or split == "all":
            return frame
        if split not in set(frame["split"]):
            raise KeyError(f"no rows of kind {kind!r} with split {split!r} in {self.prompts_path}; "
                           f"splits present: {sorted(set(frame['split']))}")
        return frame[frame["split"] == split]

    def splits(self, kind: str) -> set[str]:
        """The splits the rows of `kind` fall in (fit, heldout and, from the second iteration, freed)."""
        return set(self._kind_rows(kind)["split"])

    def _kind_rows(self, kind: str) -> pd.DataFrame:
        if kind not in self._rows:
            raise KeyError(f"no activations of kind {kind!r} in {self.directory}; kinds: {list(self.kinds)}")
        return self._rows[kind]

    def tensor(self, layer: int, kind: str) -> torch.Tensor:
        """All rows of `kind` at `layer`: float32 [n_kind, P, d].

        The tensors of the layer read last are kept, so reading several positions or splits of
        one layer (extract, rank) reads the file once per layer and kind.
        """
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range: {self.directory} has layers 0..{self.n_layers - 1}")
        self._kind_rows(kind)
        if self._layer_cache.get("layer") != layer:
            self._layer_cache = {"layer": layer}
        if kind not in self._layer_cache:
            with safe_open(str(self.tensors_path), framework="pt") as f:
                self._layer_cache[kind] = f.get_tensor(f"layer{layer}.{kind}")
        return self._layer_cache[kind]

    def get(self, layer: int, kind: str, split: str | None = None, *, position: int = -1) -> torch.Tensor:
        """float32 [n, d] at `layer` for `kind` rows of `split` (None or "all": every row).

        `position` is a label of `position_labels`: -1 (default) is the last prompt token, -2 the
        one before, down to -P; 1..R are the first R answer positions (collect.response_positions).
        """
        if position not in self.position_labels:
            raise IndexError(f"position {position} was not captured in {self.directory}: it holds "
                             f"{self.position_labels} (collect.positions, collect.response_positions)")
        index = self.prompt_positions + position - (1 if position > 0 else 0)
        rows = self.rows(kind, split)
        acts = self.tensor(layer, kind)[:, index, :]
        if len(rows) == acts.shape[0]:
            return acts.clone()  # the layer's tensor stays cached: hand out a copy
        return acts[torch.tensor(rows.index.tolist(), dtype=torch.long)]


def load_activations(directory: Path | str) -> Activations:
    """Open a collect artifact directory (prompts.parquet + activations.safetensors)."""
    return Activations(directory)
