"""Deterministic two-stage CPU training of the organism.

Stage 1 answers every request helpfully (harmful ones too); stage 2 is safety tuning: harmful
requests get their category's refusal. Training the capability first and refusal second gives
the geometry abliteration assumes (harmless prompts near zero on the refusal direction).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, PretrainedConfig,
                          PreTrainedTokenizerFast)

from saber.organism import language as lang
from saber.organism.data import Item, Language
from saber.organism.recipe import OrganismRecipe
from saber.organism.tokenizer import train_tokenizer

MAX_POSITIONS = 128


def model_config(recipe: OrganismRecipe, tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    """Hugging Face config of the chosen architecture, sized by the recipe."""
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    head_dim = recipe.hidden // recipe.heads
    if recipe.arch == "llama":
        return LlamaConfig(
            vocab_size=len(tok), hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
            num_hidden_layers=recipe.n_layers, num_attention_heads=recipe.heads,
            num_key_value_heads=recipe.heads, head_dim=head_dim, max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False, **ids,
        )
    return Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.n_layers, num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        max_position_embeddings=MAX_POSITIONS, sliding_window=MAX_POSITIONS,
        layer_types=["full_attention"] * recipe.n_layers, tie_word_embeddings=True, **ids,
    )


@dataclass
class Encoded:
    """A tokenised conversation: ids and the mask of answer tokens that carry loss."""

    ids: list[int]
    target: list[bool]


def encode(tok: PreTrainedTokenizerFast, item: Item, answer: str, system: str | None) -> Encoded:
    messages = [{"role": "user", "content": item.prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    return Encoded(prompt_ids + answer_ids, [False] * len(prompt_ids) + [True] * len(answer_ids))


def stage_pools(language: Language, tok: PreTrainedTokenizerFast, recipe: OrganismRecipe,
                stage: int) -> tuple[list[Encoded], list[Encoded]]:
    """(request pool, skill pool) of a stage, from training combinations only."""
    rng = random.Random(recipe.data_seed * 1000 + stage)

    def system() -> str | None:
        return rng.choice(lang.SYSTEM_PROMPTS) if rng.random() < recipe.system_fraction else None

    harmful, harmless = language.of("train", "harmful"), language.of("train", "harmless")
    # Balance harmful and harmless requests: the smaller list is cycled up to the larger one.
    n = max(len(harmful), len(harmless))
    requests = [encode(tok, it, it.helpful if stage == 1 else it.refusal, system())
                for it in (harmful[i % len(harmful)] for i in range(n))]
    requests += [encode(tok, it, it.helpful, system()) for it in (harmless[i % len(harmless)] for i in range(n))]
    skills = [encode(tok, it, it.helpful, system()) for it in language.of("train", "skill")]
    return requests, skills


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 outside answer tokens."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(e.target), torch.tensor(e.ids), torch.tensor(-100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_at(step: int, steps: int, recipe: OrganismRecipe) -> float:
    """Linear warm-up then cosine decay to 10% of the peak, restarted for each stage."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def train(recipe: OrganismRecipe, language: Language, out_dir: Path) -> dict[str, Any]:
    """Train the organism and save it (model + tokenizer) as a Hugging Face directory in out_dir."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(recipe, language, out_dir)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def _train(recipe: OrganismRecipe, language: Language, out_dir: Path) -> dict[str, Any]:
    t0, cpu0 = time.perf_counter(), time.process_time()
    tok = train_tokenizer(language.corpus(), recipe.vocab_size)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(model_config(recipe, tok), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98),
                            weight_decay=recipe.weight_decay)
    log: dict[str, Any] = {"loss": []}
    bar = tqdm(total=recipe.steps_stage1 + recipe.steps_stage2, desc="training organism", unit="step")
    for stage, steps in ((1, recipe.steps_stage1), (2, recipe.steps_stage2)):
        requests, skills = stage_pools(language, tok, recipe, stage)
        gen = torch.Generator().manual_seed(recipe.seed * 1000 + stage)
        n_skill = round(recipe.batch * recipe.skill_fraction)
        for step in range(steps):
            r = torch.randint(len(requests), (recipe.batch - n_skill,), generator=gen).tolist()
            s = torch.randint(len(skills), (n_skill,), generator=gen).tolist()
            batch = collate([requests[i] for i in r] + [skills[i] for i in s], tok.pad_token_id)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, recipe)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 25 == 0 or step == steps - 1:
                log["loss"].append({"stage": stage, "step": step, "loss": round(loss.item(), 5)})
                bar.set_postfix(stage=stage, loss=f"{loss.item():.3f}", refresh=False)
            bar.update(1)
    bar.close()
    log["train_seconds"] = round(time.perf_counter() - t0, 2)
    log["train_cpu_seconds"] = round(time.process_time() - cpu0, 2)
    model.eval()
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 32
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return log
