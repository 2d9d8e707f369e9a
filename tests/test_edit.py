"""Weight edit: orthogonalisation math, in-memory application, streaming export."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

import saber.edit.export as export_module
from saber.edit import (
    EditConfig,
    EditPlan,
    ExportPathError,
    PlanRow,
    TiedEmbeddingError,
    apply_plan,
    export_edited,
    gram_schmidt,
    load_plan,
    orthogonalize,
    project_weight,
    save_plan,
)
from saber.edit.config import KNOWN_ROLES
from saber.model.adapters import get_adapter
from saber.testing.tiny_models import HIDDEN, TINY_ARCHS, build_tiny, load_tiny

# ---------------------------------------------------------------------------------------------
# math


def _unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def test_orthogonalize_square_matrix_on_output_side() -> None:
    """A square [d, d] weight: the residual (output) side is axis 0; W^T u must not be used."""
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    u = _unit(16, 1)
    edited = orthogonalize(w, u, 1.0, residual_axis=0)
    a = torch.randn(16, 5)
    # float32 products of O(1) entries: 1e-5 is ~100x rounding
    assert (u @ (edited @ a)).abs().max() < 1e-5
    assert (edited @ u).abs().max() > 1e-2  # the input side was left alone
    # the same weight stored transposed ([m, d], e.g. gpt-oss experts) is edited on axis 1
    edited_t = orthogonalize(w.T.contiguous(), u, 1.0, residual_axis=1)
    torch.testing.assert_close(edited_t, edited.T, rtol=0, atol=1e-6)


def test_orthogonalize_partial_strength_and_bias() -> None:
    w = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    b = torch.randn(8, generator=torch.Generator().manual_seed(3))
    u = _unit(8, 4)
    alpha = 0.3
    expected = w - alpha * torch.outer(u, u @ w)
    torch.testing.assert_close(orthogonalize(w, u, alpha, 0), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(orthogonalize(b, u, alpha, 0), b - alpha * u * (u @ b), rtol=0, atol=1e-6)
    # non-unit input direction is normalised first
    torch.testing.assert_close(orthogonalize(w, 5 * u, alpha, 0), expected, rtol=0, atol=1e-6)


def test_orthogonalize_keeps_dtype_and_rejects_zero_direction() -> None:
    w = torch.randn(8, 4).to(torch.bfloat16)
    assert orthogonalize(w, _unit(8, 0), 1.0, 0).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        orthogonalize(w, torch.zeros(8), 1.0, 0)


def test_fused_expert_stack_each_expert_projected() -> None:
    stack = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(5))  # [experts, inter, hidden]
    u = _unit(8, 6)
    edited = project_weight(stack, [(u, 1.0)], residual_axis=2)
    assert (edited @ u).abs().max() < 1e-5  # float32 rounding headroom
    with pytest.raises(ValueError):
        project_weight(stack, [(u, 1.0)], residual_axis=0)


def test_gram_schmidt_rank_order_and_dependent_vectors() -> None:
    a, b = _unit(6, 0), _unit(6, 1)
    qs = gram_schmidt([a, b, a + b])
    assert qs[2] is None  # spanned by the first two
    torch.testing.assert_close(qs[0], a)
    assert abs(float(qs[0] @ qs[1])) < 1e-6


def test_multi_direction_all_removed() -> None:
    """Gram-Schmidt then alpha = 1 on every vector removes every original direction."""
    w = torch.randn(32, 20, generator=torch.Generator().manual_seed(7))
    vs = [_unit(32, s) for s in range(4)]
    qs = [q for q in gram_schmidt(vs) if q is not None]
    edited = project_weight(w, [(q, 1.0) for q in qs], residual_axis=0)
    for v in vs:
        assert (v @ edited).abs().max() < 1e-5 * edited.norm()


def test_norm_preserving_columns() -> None:
    w = torch.randn(32, 20, generator=torch.Generator().manual_seed(8))
    u = _unit(32, 9)
    edited = orthogonalize(w, u, 1.0, 0, norm_preserving=True)
    # float32 renormalisation: column norms agree to ~1e-7 relative
    torch.testing.assert_close(edited.norm(dim=0), w.norm(dim=0), rtol=1e-6, atol=0)
    assert (u @ edited).abs().max() < 1e-5  # alpha = 1 keeps the direction removed


def test_plan_roundtrip(tmp_path: Path) -> None:
    plan = EditPlan(
        [PlanRow(2, 0, 1, 0.8, "l2_0"), PlanRow(1, 3, 0, 0.03, "l1_3")],
        {"l2_0": _unit(HIDDEN, 0), "l1_3": _unit(HIDDEN, 1)},
    )
    save_plan(plan, tmp_path)
    loaded = load_plan(tmp_path)
    assert loaded.rows == plan.rows
    assert [r.rank for r in loaded.ordered()] == [0, 1]
    for key, vec in plan.vectors.items():
        assert torch.equal(loaded.vectors[key], vec)
    with pytest.raises(ValueError):
        EditPlan([PlanRow(0, 0, 0, 1.0, "missing")], {})


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        EditConfig(scope="everywhere")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        EditConfig(roles=["o_proj"])
    cfg = EditConfig(scope="from_source")
    assert cfg.targets_layer(3, 2) and cfg.targets_layer(3, 3) and not cfg.targets_layer(3, 4)


# ---------------------------------------------------------------------------------------------
# models




def _ids(batch: int = 2, seq: int = 6) -> torch.Tensor:
    return torch.randint(3, 300, (batch, seq), generator=torch.Generator().manual_seed(3))


def _plan(n_layers: int, alphas: tuple[float, ...] = (1.0, 1.0)) -> EditPlan:
    """Random unit directions from two different source layers."""
    rows = [PlanRow(min(i, n_layers - 1), i, i, a, f"v{i}") for i, a in enumerate(alphas)]
    return EditPlan(rows, {f"v{i}": _unit(HIDDEN, 10 + i) for i in range(len(alphas))})


def _n_layers(model: torch.nn.Module) -> int:
    return len(get_adapter(model).decoder_layers(model))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _checksums(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def _write_module(model: torch.nn.Module, writer: Any) -> str:
    """The module whose output is what the writer adds to the residual (outermost norm if any)."""
    if writer.norms:
        return writer.norms[-1].param.rsplit(".", 1)[0]
    return writer.param.rsplit(".", 1)[0]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_alpha_one_removes_directions_from_every_write(arch: str, tiny_dirs: dict[str, Path]) -> None:
    model = load_tiny(tiny_dirs[arch])
    plan = _plan(_n_layers(model))
    cfg = EditConfig(roles=list(KNOWN_ROLES))
    adapter = get_adapter(model)
    writes: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name in {_write_module(model, w) for w in adapter.writers(model)}:
        module = model.get_submodule(name)
        handles.append(
            module.register_forward_hook(
                lambda m, a, out, name=name: writes.setdefault(name, []).append(
                    (out[0] if isinstance(out, tuple) else out).detach()
                )
            )
        )
    with apply_plan(model, plan, cfg), torch.no_grad():
        model(input_ids=_ids())
    for h in handles:
        h.remove()
    assert set(writes) == {_write_module(model, w) for w in adapter.writers(model)}
    for name, outs in writes.items():
        for out in outs:
            for v in plan.vectors.values():
                along = (out @ v).abs()
                # float32: exact removal up to rounding (~1e-7 relative); bound from the contract
                assert (along <= 1e-5 * out.norm(dim=-1) + 1e-12).all(), (name, float(along.max()))


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a.startswith("gemma")])
def test_without_sandwich_correction_gemma_leaks(arch: str, tiny_dirs: dict[str, Path]) -> None:
    """Control for the test above: with post-writer norms, plain u = v leaves v in the write."""
    model = load_tiny(tiny_dirs[arch])
    adapter = get_adapter(model)
    w = next(w for w in adapter.writers(model) if w.norms and w.role in ("attn_out", "mlp_down"))
    out: list[torch.Tensor] = []
    module = model.get_submodule(_write_module(model, w))
    hook = module.register_forward_hook(lambda m, a, o: out.append(o.detach()))
    plan = EditPlan([PlanRow(w.layer, 0, 0, 1.0, "v")], {"v": _unit(HIDDEN, 3)})
    with apply_plan(model, plan, EditConfig(scope="same", sandwich_correction=False)), torch.no_grad():
        model(input_ids=_ids())
    hook.remove()
    along = (out[0] @ plan.vectors["v"]).abs().max()
    assert along > 1e-3 * out[0].norm(dim=-1).max()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_alpha_zero_and_scope_leave_other_tensors_bit_identical(arch: str, tiny_dirs: dict[str, Path]) -> None:
    model = load_tiny(tiny_dirs[arch])
    before = _snapshot(model)
    n = _n_layers(model)
    with apply_plan(model, _plan(n, alphas=(0.0, 0.0)), EditConfig(embedding=True, tied_embeddings="untie")) as h:
        assert h.edited_params == []
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    # scope "same" on the last layer, attention only: nothing else moves
    plan = EditPlan([PlanRow(n - 1, 0, 0, 0.7, "v")], {"v": _unit(HIDDEN, 1)})
    with apply_plan(model, plan, EditConfig(scope="same", roles=["attn_out"])) as h:
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == set(h.edited_params)
        assert changed and all(f".{n - 1}." in k and ("o_proj" in k) for k in changed)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_edit_without_originals_gives_the_same_weights_and_refuses_to_revert(tiny_dirs: dict[str, Path]) -> None:
    """keep_originals=False (what a load-edit-save such as the streaming benchmark's baseline uses)
    changes nothing in the arithmetic: bit-identical weights, and a revert that says it cannot."""
    arch = TINY_ARCHS[0]
    reference, lean = load_tiny(tiny_dirs[arch]), load_tiny(tiny_dirs[arch])
    plan = _plan(_n_layers(reference))
    with apply_plan(reference, plan, EditConfig()) as kept:
        handle = apply_plan(lean, plan, EditConfig(), keep_originals=False)
        assert handle.edited_params == kept.edited_params and handle.originals == {}
        expected = reference.state_dict()
        assert all(torch.equal(expected[k], v) for k, v in lean.state_dict().items())
    with pytest.raises(RuntimeError, match="keep_originals=False"):
        handle.revert()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_revert_restores_bit_identical(arch: str, tiny_dirs: dict[str, Path]) -> None:
    model = load_tiny(tiny_dirs[arch])
    before = _snapshot(model)
    cfg = EditConfig(roles=list(KNOWN_ROLES), embedding=True, tied_embeddings="untie", norm_preserving=True)
    handle = apply_plan(model, _plan(_n_layers(model), alphas=(0.8, 0.4)), cfg)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    handle.revert()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    spec = get_adapter(model).embedding(model)
    assert spec.tied == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_norm_preserving_keeps_residual_columns(arch: str, tiny_dirs: dict[str, Path]) -> None:
    model = load_tiny(tiny_dirs[arch])
    before = _snapshot(model)
    with apply_plan(model, _plan(_n_layers(model), alphas=(1.0, 0.5)), EditConfig(norm_preserving=True)) as h:
        state = model.state_dict()
        for target in h.targets:
            if target.param.endswith("bias"):
                continue
            old, new = before[target.param], state[target.param]
            # float32 renormalisation: ~1e-7 relative error, contract asks 1e-6
            torch.testing.assert_close(
                new.norm(dim=target.residual_axis), old.norm(dim=target.residual_axis), rtol=1e-6, atol=0
            )


@pytest.mark.slow
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_streaming_export_matches_memory_and_generates(arch: str, tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_dirs[arch]
    sums = _checksums(src)
    model = load_tiny(src)
    cfg = EditConfig(roles=list(KNOWN_ROLES), embedding=True, tied_embeddings="untie")
    plan = _plan(_n_layers(model), alphas=(0.9, 0.5))
    out = export_edited(src, tmp_path / "edited", plan, cfg, card_extra="## Evaluation\n\nrefusal 0%")
    handle = apply_plan(model, plan, cfg)
    exported = load_tiny(out)
    mem, disk = model.state_dict(), exported.state_dict()
    assert mem.keys() == disk.keys()
    mismatched = [k for k in mem if not torch.equal(mem[k], disk[k])]
    assert mismatched == []
    ids = _ids(batch=1, seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), exported.generate(ids, **kw))
    card = (out / "README.md").read_text()
    assert "refusal 0%" in card and "| 0 |" in card
    assert {p.name for p in src.iterdir()} <= {p.name for p in out.iterdir()} | {"README.md"}
    assert _checksums(src) == sums
    handle.revert()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2", "gemma3"])
def test_sharded_export_matches_memory(arch: str, tmp_path: Path) -> None:
    """Several shards plus an index: per-expert tensors, untied head added to the index."""
    src = build_tiny(arch, tmp_path / "src", max_shard_size="40KB")
    assert len(list(src.glob("*.safetensors"))) > 2 and (src / "model.safetensors.index.json").exists()
    sums = _checksums(src)
    model = load_tiny(src)
    cfg = EditConfig(embedding=True, tied_embeddings="untie")
    plan = _plan(_n_layers(model))
    out = export_edited(src, tmp_path / "out", plan, cfg)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    apply_plan(model, plan, cfg)
    mem, disk = model.state_dict(), load_tiny(out).state_dict()
    assert [k for k in mem if not torch.equal(mem[k], disk[k])] == []
    assert _checksums(src) == sums


@pytest.mark.slow
def test_iterations_and_hydra_style_config(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A list of plans (iterations) exports like successive apply_plan calls; the config may be
    any object or mapping with the edit fields (extra keys such as `export` are ignored)."""
    src = tiny_dirs["gemma3"]
    model = load_tiny(src)
    n = _n_layers(model)
    plans = [_plan(n, alphas=(0.9, 0.5)), EditPlan([PlanRow(n - 1, 0, 0, 1.0, "w")], {"w": _unit(HIDDEN, 30)})]
    cfg = {"scope": "all", "roles": ["attn_out", "mlp_down"], "embedding": True, "tied_embeddings": "untie",
           "norm_preserving": False, "sandwich_correction": True, "export": True, "out_dir": None}
    out = export_edited(src, tmp_path / "iter", plans, cfg)
    handles = [apply_plan(model, p, cfg) for p in plans]
    mem, disk = model.state_dict(), load_tiny(out).state_dict()
    assert [k for k in mem if not torch.equal(mem[k], disk[k])] == []
    assert "| 1 | 0 |" in (out / "README.md").read_text()
    for h in reversed(handles):
        h.revert()


def test_export_refusals_leave_source_untouched(tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: Any) -> None:
    src = tiny_dirs["qwen3_moe"]
    sums = _checksums(src)
    plan = _plan(3)
    cfg = EditConfig()
    with pytest.raises(ExportPathError):
        export_edited(src, src, plan, cfg)
    with pytest.raises(ExportPathError):
        export_edited(src, src / "sub", plan, cfg)
    with pytest.raises(ExportPathError):
        export_edited(src, src.parent, plan, cfg, overwrite=True)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_edited(src, existing, plan, cfg)
    assert (existing / "keep.txt").read_text() == "x"

    calls = {"n": 0}
    real_write = export_module._patch_copy

    def failing_write(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        real_write(*args, **kwargs)  # a shard lands, then the next write fails
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "_patch_copy", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        export_edited(src, tmp_path / "failed", plan, cfg)
    with pytest.raises(RuntimeError, match="disk full"):
        export_edited(src, existing, plan, cfg, overwrite=True)
    assert calls["n"] == 2
    assert not (tmp_path / "failed").exists()
    assert (existing / "keep.txt").read_text() == "x"  # the old directory survives a failed overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no temporary leftovers
    monkeypatch.undo()
    out = export_edited(src, existing, plan, cfg, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert _checksums(src) == sums


def test_export_without_kernel_range_copy_is_identical(tiny_dirs: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: Any) -> None:
    """Where copy_file_range is missing or refused, plain reads and writes give the same files."""
    import os

    src = tiny_dirs["qwen3"]
    fast = export_edited(src, tmp_path / "fast", _plan(3), EditConfig())
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.setattr(export_module, "_COPY_CHUNK", 1000)  # many short reads
    slow = export_edited(src, tmp_path / "slow", _plan(3), EditConfig())
    for shard in src.glob("*.safetensors"):
        assert (fast / shard.name).read_bytes() == (slow / shard.name).read_bytes()
        assert (fast / shard.name).stat().st_size == shard.stat().st_size


def test_full_disk_is_named_before_and_during_export(tiny_dirs: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: Any) -> None:
    import errno
    import shutil as shutil_module

    src = tiny_dirs["llama"]
    sums = _checksums(src)
    real_usage = shutil_module.disk_usage
    monkeypatch.setattr(export_module.shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=1000))  # 1000 bytes left
    with pytest.raises(export_module.DiskSpaceError, match=r"store_root: .* needs .* GiB .* 0.00 GiB free"):
        export_edited(src, tmp_path / "out", _plan(3), EditConfig(), space_key="store_root")
    monkeypatch.undo()
    real_write = export_module._patch_copy

    def filling_write(*args: Any, **kwargs: Any) -> None:
        real_write(*args, **kwargs)  # a shard lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "_patch_copy", filling_write)
    with pytest.raises(export_module.DiskSpaceError, match="edit.out_dir: the disk .* filled up"):
        export_edited(src, tmp_path / "out", _plan(3), EditConfig())
    assert list(tmp_path.iterdir()) == []  # no partial directory left behind
    assert _checksums(src) == sums


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_tied_embeddings_refuse_or_untie(arch: str, tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = load_tiny(tiny_dirs[arch])
    assert get_adapter(model).embedding(model).tied
    plan = _plan(_n_layers(model))
    before = _snapshot(model)
    with pytest.raises(TiedEmbeddingError, match="untie"):
        apply_plan(model, plan, EditConfig(embedding=True, tied_embeddings="refuse"))
    with pytest.raises(TiedEmbeddingError):
        export_edited(tiny_dirs[arch], tmp_path / "x", plan, EditConfig(embedding=True))
    assert not (tmp_path / "x").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    spec = get_adapter(model).embedding(model)
    head_before = model.get_output_embeddings().weight.detach().clone()
    with apply_plan(model, plan, EditConfig(embedding=True, tied_embeddings="untie")):
        head = model.get_output_embeddings().weight
        embed = model.get_input_embeddings().weight
        assert torch.equal(head, head_before)  # the output head is numerically unchanged
        assert not torch.equal(embed, head_before)  # the embedding was edited
        for v in plan.vectors.values():
            assert (embed @ v).abs().max() < 1e-5 * embed.norm(dim=1).max()
        assert not model.config.get_text_config().tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert spec.tied
