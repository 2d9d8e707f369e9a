"""The least-squares edit (edit.method=lsq): planted answers for the closed form, then the same
update on a tiny model, in memory, streamed to disk and as a LoRA adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from saber.edit import EditConfig, EditPlan, PlanRow, apply_plan, export_edited, load_plan
from saber.edit.config import LsqConfig
from saber.edit.lsq import build_editor, input_map, low_rank_delta, writer_input_moments
from saber.edit.plan import PLAN_DELTAS, save_plan
from saber.testing.tiny_models import HIDDEN, build_tiny, load_tiny

D, M = 16, 24  # residual width, writer input width of the planted problem


def _planted(seed: int = 0, n_protected: int = 10, n_harmful: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, M, generator=g, dtype=torch.float64)
    x_p = torch.randn(M, n_protected, generator=g, dtype=torch.float64)
    x_h = torch.randn(M, n_harmful, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(D, 2, generator=g, dtype=torch.float64))
    return w, x_p, x_h, q.T  # q: [2, D], orthonormal rows


def _moment(x: torch.Tensor) -> torch.Tensor:
    return x @ x.T / x.shape[1]


def test_update_keeps_protected_outputs_and_removes_the_target_component() -> None:
    """Protected inputs span 10 of 24 dimensions and 5 harmful inputs leave that span, so the
    exact answer is known: the outputs on protected inputs are unchanged, the harmful outputs lose
    their component along q and keep every other one (tolerance 1e-6, relative; float64)."""
    w, x_p, x_h, q = _planted()
    g = input_map(_moment(x_h), _moment(x_p), null_eps=1e-9, ridge=1e-12)
    left, right = low_rank_delta(w @ g, [(q[0], 1.0), (q[1], 1.0)])
    edited = w - left @ right
    assert (edited @ x_p - w @ x_p).norm() <= 1e-6 * (w @ x_p).norm()
    assert (q @ edited @ x_h).norm() <= 1e-6 * (q @ w @ x_h).norm()
    rest = torch.eye(D, dtype=torch.float64) - q.T @ q
    assert (rest @ (edited - w) @ x_h).norm() <= 1e-9 * (w @ x_h).norm()
    assert torch.linalg.matrix_rank(left @ right).item() == 2  # low rank by construction: one per direction
    # alpha scales the removal linearly: half strength removes half of the component
    half_left, half_right = low_rank_delta(w @ g, [(q[0], 0.5), (q[1], 0.5)])
    half = w - half_left @ half_right
    torch.testing.assert_close(q @ half @ x_h, 0.5 * q @ w @ x_h, rtol=1e-6, atol=1e-9)


def test_weighted_update_solves_its_normal_equations() -> None:
    """With every input direction kept (null_eps = 1) and mu > 0 the update is the minimiser of
    E_h||dW x + A W x||^2 + mu E_p||dW x||^2 + lambda||dW||^2: its gradient vanishes (1e-9, relative),
    and a larger mu changes the protected outputs less."""
    w, x_p, x_h, q = _planted(n_protected=40, n_harmful=30)  # both full rank: no exact null space
    k_h, k_p = _moment(x_h), _moment(x_p)
    a = q.T @ q
    change = {}
    for mu in (0.1, 10.0):
        left, right = low_rank_delta(w @ input_map(k_h, k_p, 1.0, 1e-3, mu), [(q[0], 1.0), (q[1], 1.0)])
        dw = -left @ right
        lam = 1e-3 * float(torch.trace(k_h)) / M
        gradient = (dw @ x_h + a @ w @ x_h) @ x_h.T / x_h.shape[1] + mu * dw @ k_p + lam * dw
        assert gradient.norm() <= 1e-9 * (a @ w @ k_h).norm()
        change[mu] = float((dw @ x_p).norm())
    assert change[10.0] < change[0.1]


def test_kept_inputs_weigh_as_much_as_the_targets_whatever_mu() -> None:
    """The kept term E_k||dW x||^2 (inputs an earlier plan freed) enters the normal equations with
    weight 1: the update's gradient with it vanishes (1e-9, relative), and at the lowest mu the kept
    outputs change far less than without it, where the targets' span covers them."""
    w, x_p, x_h, q = _planted(n_protected=40, n_harmful=30)
    x_k = x_h[:, :10] + 0.1 * torch.randn(M, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    k_h, k_p, k_k = _moment(x_h), _moment(x_p), _moment(x_k)
    a, mu = q.T @ q, 1e-3
    lam = 1e-3 * float(torch.trace(k_h)) / M
    change = {}
    for kept in (None, k_k):
        left, right = low_rank_delta(w @ input_map(k_h, k_p, 1.0, 1e-3, mu, kept), [(q[0], 1.0), (q[1], 1.0)])
        dw = -left @ right
        gradient = (dw @ x_h + a @ w @ x_h) @ x_h.T / x_h.shape[1] + mu * dw @ k_p + lam * dw
        if kept is not None:
            gradient = gradient + dw @ k_k
        assert gradient.norm() <= 1e-9 * (a @ w @ k_h).norm()
        change[kept is not None] = float((dw @ x_k).norm() / (a @ w @ x_k).norm())
    assert change[True] < 0.5 * change[False], change


def test_the_projection_edit_is_the_unprotected_limit() -> None:
    """With nothing to protect and no ridge, G is the identity on the harmful inputs' span: with
    full-rank harmful inputs the update is the projection edit A W exactly."""
    w, _, x_h, q = _planted(n_harmful=40)
    g = input_map(_moment(x_h), torch.zeros(M, M, dtype=torch.float64), null_eps=1e-9, ridge=1e-12)
    left, right = low_rank_delta(w @ g, [(q[0], 1.0), (q[1], 1.0)])
    torch.testing.assert_close(left @ right, q.T @ q @ w, rtol=1e-6, atol=1e-9)


def test_ridge_bounds_the_update_where_harmful_inputs_barely_leave_the_protected_span() -> None:
    """Harmful inputs inside the protected span up to 1e-6: without the ridge the update
    amplifies that sliver (a large update, which would hit unseen inputs); ridge = 1e-2 keeps it
    below 1% of the weight."""
    w, x_p, _, q = _planted()
    x_h = x_p[:, :5] + 1e-6 * torch.randn(M, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    updates = {}
    for ridge in (1e-12, 1e-2):
        left, right = low_rank_delta(w @ input_map(_moment(x_h), _moment(x_p), 1e-9, ridge), [(q[0], 1.0)])
        updates[ridge] = float((left @ right).norm() / w.norm())
    assert updates[1e-2] < 1e-2 < 0.1 < updates[1e-12], updates


def test_nothing_to_edit_gives_a_zero_update() -> None:
    w, x_p, _, q = _planted()
    g = input_map(torch.zeros(M, M, dtype=torch.float64), _moment(x_p), 1e-9, 1e-2)
    assert torch.count_nonzero(g) == 0
    left, right = low_rank_delta(w @ g, [(q[0], 0.0)])
    assert left.shape == (D, 0) and right.shape == (0, M)


# ---------------------------------------------------------------------------------------------
# a tiny model

LSQ = EditConfig(method="lsq", lsq=LsqConfig(null_eps=1e-6, ridge=1e-9))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("lsq") / "llama")


def _sequences(seed: int, n: int, length: int, low: int, high: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (length,), generator=g).tolist() for _ in range(n)]


def _plan(seed: int = 7) -> EditPlan:
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
    return EditPlan([PlanRow(layer=0, index=0, rank=1, alpha=1.0, vector_key="v")], {"v": v / v.norm()})


def _logits(model: torch.nn.Module, sequences: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(sequences)).logits


# 3 protected sequences of 10 tokens: 30 < 64 input dimensions, so their null space is exact;
# the harmful sequences use other tokens, 2 x 8 = 16 tokens inside its 34 remaining dimensions.
PROTECTED = _sequences(0, 3, 10, 10, 150)
HARMFUL = _sequences(1, 2, 8, 150, 300)


def test_hooks_measure_each_writers_input_second_moment(tiny_llama: Path) -> None:
    model = load_tiny(tiny_llama)
    param = "model.layers.0.self_attn.o_proj.weight"
    seen: list[torch.Tensor] = []
    handle = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    moments = writer_input_moments(model, [param], PROTECTED, batch_size=2, pad_id=0)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    torch.testing.assert_close(moments[param], x.T @ x / x.shape[0], rtol=1e-10, atol=1e-12)


def test_focus_weights_each_token_by_what_the_writer_writes_along_the_directions(tiny_llama: Path) -> None:
    """edit.lsq.focus: K_h = sum_t w_t x_t x_t^T / sum_t w_t with w_t = ||M x_t||^2; a token whose
    input M annihilates drops out (planted: M reads input coordinate 0 only)."""
    model = load_tiny(tiny_llama)
    param = "model.layers.0.self_attn.o_proj.weight"
    seen: list[torch.Tensor] = []
    handle = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    m = torch.zeros(2, HIDDEN, dtype=torch.float64)
    m[0, 0], m[1, 0] = 3.0, 4.0  # ||M x||^2 = 25 x_0^2
    moments = writer_input_moments(model, [param], PROTECTED, batch_size=2, pad_id=0, focus={param: m})
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    w = 25.0 * x[:, 0] ** 2
    torch.testing.assert_close(moments[param], (x * w[:, None]).T @ x / w.sum(), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(moments[param], x.T @ x / x.shape[0])


def test_lsq_edit_leaves_protected_prompts_unchanged_and_changes_harmful_ones(tiny_llama: Path) -> None:
    """The whole model: every writer's output on the protected sequences is unchanged, so their
    logits are too (float32 arithmetic: 1e-4 absolute); the harmful sequences' logits move, and
    the layer-0 attention output loses most of its component along the direction."""
    model = load_tiny(tiny_llama)
    before_p, before_h = _logits(model, PROTECTED), _logits(model, HARMFUL)
    plan = _plan()
    editor = build_editor(model, LSQ, plan, HARMFUL, PROTECTED, batch_size=4, pad_id=0)
    lsq_plan = editor.with_deltas(plan)
    assert lsq_plan.method == "lsq" and lsq_plan.deltas
    assert all(left.shape[1] == 1 for left, _ in lsq_plan.deltas.values())  # rank 1: one direction

    def along_v() -> float:
        seen: list[torch.Tensor] = []
        h = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
        _logits(model, HARMFUL)
        h.remove()
        return float((seen[0] @ plan.vectors["v"]).abs().mean())

    base_along = along_v()
    with apply_plan(model, lsq_plan, LSQ):
        assert (_logits(model, PROTECTED) - before_p).abs().max().item() < 1e-4
        assert (_logits(model, HARMFUL) - before_h).abs().max().item() > 1e-2
        assert along_v() < 0.1 * base_along
    assert torch.equal(_logits(model, PROTECTED), before_p)  # reverted exactly


def test_kept_sequences_hold_their_outputs_where_the_targets_move_them(tiny_llama: Path) -> None:
    """Kept sequences (harmful prompts an earlier plan freed) that share the harmful tokens: without
    the kept term the layer-0 attention output on them loses its component along the direction
    like the harmful ones (measured: 104% of it); with it, at most half of that change remains (29%)."""
    model = load_tiny(tiny_llama)
    plan = _plan()
    kept = [s[:4] + s[4:][::-1] for s in HARMFUL]  # the same tokens, in another order

    def change(editor: Any) -> float:
        seen: list[torch.Tensor] = []
        h = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
        _logits(model, kept)
        with apply_plan(model, editor.with_deltas(plan), LSQ):
            _logits(model, kept)
        h.remove()
        return float(((seen[1] - seen[0]) @ plan.vectors["v"]).abs().mean())

    without = change(build_editor(model, LSQ, plan, HARMFUL, PROTECTED, 4, 0))
    with_kept = build_editor(model, LSQ, plan, HARMFUL, PROTECTED, 4, 0, kept=kept)
    assert set(with_kept.kept) == set(with_kept.moments)
    assert change(with_kept) <= 0.5 * without and without > 0


def test_lsq_plan_round_trips_and_streams_like_memory(tiny_llama: Path, tmp_path: Path) -> None:
    model = load_tiny(tiny_llama)
    plan = build_editor(model, LSQ, _plan(), HARMFUL, PROTECTED, 4, 0).with_deltas(_plan())
    save_plan(plan, tmp_path / "plan")
    assert (tmp_path / "plan" / PLAN_DELTAS).is_file()
    loaded = load_plan(tmp_path / "plan")
    assert loaded.deltas.keys() == plan.deltas.keys()
    assert all(torch.equal(loaded.deltas[k][i], plan.deltas[k][i]) for k in plan.deltas for i in (0, 1))
    exported = load_tiny(export_edited(tiny_llama, tmp_path / "edited", loaded, LSQ))
    apply_plan(model, loaded, LSQ)
    mem, disk = model.state_dict(), exported.state_dict()
    assert [k for k in mem if not torch.equal(mem[k], disk[k])] == []
    changed = {k for k, v in load_tiny(tiny_llama).state_dict().items() if not torch.equal(v, mem[k])}
    assert changed == set(plan.deltas)  # exactly the weights with deltas (no bias, no embedding)


def test_lsq_lora_adapter_equals_the_full_export(tiny_llama: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from saber.edit.lora import export_lora

    model = load_tiny(tiny_llama)
    plan = build_editor(model, LSQ, _plan(), HARMFUL, PROTECTED, 4, 0).with_deltas(_plan())
    full = load_tiny(export_edited(tiny_llama, tmp_path / "full", plan, LSQ))
    lora = peft.PeftModel.from_pretrained(load_tiny(tiny_llama), export_lora(tiny_llama, tmp_path / "adapter", plan, LSQ))
    assert (_logits(full, HARMFUL) - _logits(lora.eval(), HARMFUL)).abs().max().item() < 1e-4


def test_auto_picks_lsq_unless_only_the_projection_can_run(tiny_llama: Path) -> None:
    from saber.edit.lsq import editor_bytes, resolve_method

    model, plan = load_tiny(tiny_llama), _plan()
    auto = EditConfig()
    assert auto.method == "auto" and resolve_method(model, auto, plan, calibrating=True)[0] == "lsq"
    # 2 layers x (o_proj 64 x 64 inputs, down_proj 128 x 128 inputs): two m x m moments and a d x m copy each
    assert editor_bytes(model, auto, plan) == 2 * 8 * ((2 * 64 * 64 + 64 * 64) + (2 * 128 * 128 + 64 * 128))
    # kept inputs (a later iteration): a third moment per writer
    assert editor_bytes(model, auto, plan, kept=True) == 2 * 8 * ((3 * 64 * 64 + 64 * 64) + (3 * 128 * 128 + 64 * 128))
    for cfg, calibrating, why in [(EditConfig(norm_preserving=True), True, "norm_preserving"),
                                  (EditConfig(), False, "calibrate=false"),
                                  (EditConfig(lsq=LsqConfig(max_memory_gib=1e-6)), True, "GiB")]:
        method, reason = resolve_method(model, cfg, plan, calibrating)
        assert method == "projection" and why in reason
    assert resolve_method(model, EditConfig(lsq=LsqConfig(protect_weight=0.3)), plan, False)[0] == "lsq"
    assert resolve_method(model, EditConfig(method="projection"), plan, True)[0] == "projection"


def test_lsq_refuses_norm_preservation() -> None:
    with pytest.raises(ValueError, match="edit.norm_preserving"):
        EditConfig(method="lsq", norm_preserving=True)
