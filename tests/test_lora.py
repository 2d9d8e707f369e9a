"""The edit as a LoRA adapter: PEFT loads it and reproduces the full export's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saber.edit import EditConfig, EditPlan, PlanRow, export_edited
from saber.edit.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraUnsupportedError, export_lora, lora_factors
from saber.edit.math import gram_schmidt
from saber.model.adapters import get_adapter
from saber.testing.tiny_models import HIDDEN, TINY_ARCHS, load_tiny

peft = pytest.importorskip("peft")

# Tolerance: the full export and the adapter compute the same float32 update in a different
# order (W - Q^T diag(a) Q W against W + (U^T C)(U W)); on logits of size ~1 that leaves
# differences of a few 1e-6, so 1e-4 absolute is a generous bound that a wrong update (any
# missing direction moves logits by ~1e-2 or more) cannot meet.
ATOL = 1e-4


def unit(seed: int, d: int = HIDDEN) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def plan(n_layers: int, alphas: tuple[float, ...], seed: int = 10) -> EditPlan:
    rows = [PlanRow(min(i, n_layers - 1), i, i, a, f"v{i}") for i, a in enumerate(alphas)]
    return EditPlan(rows, {f"v{i}": unit(seed + i) for i in range(len(alphas))})


def test_factors_equal_the_composed_projections() -> None:
    torch.manual_seed(0)
    d, m = 16, 7
    w = torch.randn(d, m, dtype=torch.float64)
    qs1 = [q for q in gram_schmidt([torch.randn(d, dtype=torch.float64) for _ in range(3)]) if q is not None]
    qs2 = [q for q in gram_schmidt([torch.randn(d, dtype=torch.float64) for _ in range(2)]) if q is not None]
    p1, p2 = list(zip(qs1, (0.9, 0.5, 1.0))), list(zip(qs2, (1.0, 0.3)))
    expected = w.clone()
    for directions in (p1, p2):
        for q, a in directions:
            expected = expected - a * torch.outer(q, q @ expected)
    b, a = lora_factors(w, [p1, p2], torch.float64)
    assert b.shape == (d, 5) and a.shape == (5, m)
    torch.testing.assert_close(w + b @ a, expected, atol=1e-12, rtol=0)


def adapter_arches() -> list[str]:
    # fused 3-D expert tensors and writer biases are refused (tested below); the rest must match
    return [a for a in TINY_ARCHS if a not in ("gemma4_moe", "gpt_oss", "qwen3_moe")]


@pytest.mark.slow
@pytest.mark.parametrize("arch", adapter_arches())
def test_adapter_reproduces_the_full_export(arch: str, tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_dirs[arch]
    base = load_tiny(src)
    n = len(get_adapter(base).decoder_layers(base))
    plans = [plan(n, (0.9, 0.5)), plan(n, (1.0,), seed=40)]  # two iterations compose
    cfg = EditConfig()
    full = load_tiny(export_edited(src, tmp_path / "full", plans, cfg))
    adapter_dir = export_lora(src, tmp_path / "adapter", plans, cfg)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    assert config["r"] == config["lora_alpha"] and config["target_modules"]
    lora = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = full(ids).logits
        got = lora(ids).logits
    assert (expected - got).abs().max().item() < ATOL
    with lora.disable_adapter(), torch.no_grad():
        assert (lora(ids).logits - expected).abs().max().item() > 100 * ATOL  # the adapter does something
    size = (adapter_dir / ADAPTER_WEIGHTS).stat().st_size
    assert size < sum(p.stat().st_size for p in src.glob("*.safetensors"))


def test_edits_lora_cannot_express_are_refused_with_the_alternative(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_dirs["llama"]
    p = plan(2, (1.0,))
    with pytest.raises(LoraUnsupportedError, match="norm_preserving.*export_format=full"):
        export_lora(src, tmp_path / "a", p, EditConfig(norm_preserving=True))
    with pytest.raises(LoraUnsupportedError, match="embedding.*export_format=full"):
        export_lora(src, tmp_path / "b", p, EditConfig(embedding=True))
    for arch in ("gemma4_moe", "qwen3_moe"):
        with pytest.raises(LoraUnsupportedError, match="fused 3-D expert"):
            export_lora(tiny_dirs[arch], tmp_path / "c", plan(2, (1.0,)), EditConfig())
    with pytest.raises(LoraUnsupportedError, match="bias .*o_proj.bias"):
        export_lora(tiny_dirs["gpt_oss"], tmp_path / "d", plan(2, (1.0,)), EditConfig())
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.slow
def test_runner_exports_and_evaluates_the_adapter_like_the_full_model(organism_store: Path, tmp_path: Path) -> None:
    from saber.testing import compose_config
    from saber.run import run_pipeline

    def run(*overrides: str) -> tuple[dict, Path]:
        result = run_pipeline(compose_config(f"store_root={organism_store}", "+experiment=organism", *overrides))
        return json.loads((result.artifacts["evaluate"] / "summary.json").read_text()), result.artifacts["edit"]

    full, _ = run("edit.export_format=full")
    lora, edit_dir = run("edit.export_format=lora", f"edit.out_dir={tmp_path / 'adapter-out'}")
    assert (edit_dir / "adapter" / ADAPTER_WEIGHTS).is_file() and not (edit_dir / "model").exists()
    assert (tmp_path / "adapter-out" / ADAPTER_CONFIG).is_file()
    for key in ("refusal_rate", "over_refusal_rate", "skill_accuracy"):
        assert lora["headline"][key] == full["headline"][key], key
    # teacher-forced KL of the same edit in two exact forms: float rounding only (see ATOL)
    assert abs(lora["headline"]["kl_tf_mean"] - full["headline"]["kl_tf_mean"]) < 1e-4
    external, _ = run("edit.export=false", f"evaluate.adapter={tmp_path / 'adapter-out'}")
    assert external["headline"]["refusal_rate"] == full["headline"]["refusal_rate"]
    both, edit_dir = run("edit.export_format=both", f"edit.out_dir={tmp_path / 'both-out'}")
    assert (tmp_path / "both-out" / "config.json").is_file() and (tmp_path / "both-out" / "adapter" / ADAPTER_CONFIG).is_file()
