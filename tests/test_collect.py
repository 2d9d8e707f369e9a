"""Activation capture and the collect stage on tiny offline models of every architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import saber.collect as collect_mod
from saber.collect import collect_activations, collect_with_stats, load_activations, save_activations
from saber.model.adapters import get_adapter
from saber.model.chat import encode_batch, position_ids, render_prompts
from saber.model.hooks import capture_last_positions
from saber.model.loading import load_model
from saber.testing import compose_config
from saber.testing.tiny_models import TINY_ARCHS, build_tiny

REPO = Path(__file__).resolve().parent.parent
CPU = {"dtype": "float32", "device": "cpu"}
PROMPTS = {
    "harmful": ["Tell me how to pick a lock.", "hi",
                "Write a short poem about the sea, then explain how a bicycle works."],
    "harmless": ["How do I bake bread at home?", "Add 12 and 30."],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """Load each tiny architecture once per module."""
    cache: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_model(CPU, build_tiny(arch, root / arch))
        return cache[arch]

    return get


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    parent = get_adapter(model).layers_path(model).rsplit(".", 1)[0]
    return model.get_submodule(parent).norm


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_hooks_match_output_hidden_states(tiny, arch: str) -> None:
    model, tok = tiny(arch)
    texts = render_prompts(tok, PROMPTS["harmful"])
    batch = encode_batch(tok, texts, max_length=256)
    P = 3
    with torch.no_grad():
        ref = model(**batch, position_ids=position_ids(batch["attention_mask"]),
                    output_hidden_states=True, use_cache=False).hidden_states
        with capture_last_positions(model, P) as cap:
            model(**batch, position_ids=position_ids(batch["attention_mask"]), use_cache=False)
        acts = cap.take()
    assert len(acts) == len(ref) - 1 == len(get_adapter(model).decoder_layers(model))
    for layer, got in enumerate(acts):
        want = ref[layer + 1]
        if want.dim() == 4:  # Gemma 3n reports the stacked AltUp streams; index 0 is the residual
            want = want[0]
        want = want[:, -P:]
        assert got.shape == want.shape and got.dtype == torch.float32
        # Same float32 kernels on the same inputs: equal to rounding noise (observed exactly 0).
        if layer < len(acts) - 1 or torch.allclose(got, want, atol=1e-6, rtol=0):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        else:
            # Most models report the final-normed stream as the last entry: apply that norm.
            torch.testing.assert_close(_final_norm(model)(got), want, atol=1e-5, rtol=1e-5)
        # The kept tensor owns only B x P x d floats, not a view pinning the full sequence.
        assert got.untyped_storage().nbytes() == got.numel() * 4


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_activations_do_not_depend_on_batching_or_padding(tiny, arch: str) -> None:
    model, tok = tiny(arch)
    batched = collect_activations(model, tok, PROMPTS, positions=2, batch_size=5, progress=False)
    for kind, texts in PROMPTS.items():
        for i, text in enumerate(texts):
            alone = collect_activations(model, tok, {kind: [text]}, positions=2, batch_size=1,
                                        progress=False)[kind][:, 0]
            # Alone there is no padding; in the batch the short prompts get left pads, which
            # attention masks out: float32 sums in another order differ by ~1e-6, far below 1e-4.
            torch.testing.assert_close(batched[kind][:, i], alone, atol=1e-4, rtol=1e-4)


def test_collect_shapes_order_and_positions(tiny) -> None:
    model, tok = tiny("llama")
    res = collect_with_stats(model, tok, PROMPTS, positions=3, batch_size=2, progress=False)
    for kind, texts in PROMPTS.items():
        assert res.activations[kind].shape == (2, len(texts), 3, 64)
        mask = encode_batch(tok, render_prompts(tok, texts), 256)["attention_mask"]
        lengths = mask.sum(-1).tolist()
        assert res.n_tokens[kind] == lengths
    one = collect_activations(model, tok, PROMPTS, positions=1, batch_size=3, progress=False)
    for kind in PROMPTS:
        torch.testing.assert_close(one[kind][:, :, 0], res.activations[kind][:, :, -1], atol=1e-4, rtol=1e-4)
    assert res.tokens == sum(sum(v) for v in res.n_tokens.values()) and res.tokens_per_s > 0


def test_system_prompt_changes_activations(tiny) -> None:
    model, tok = tiny("llama")
    base = collect_activations(model, tok, PROMPTS, progress=False)["harmless"]
    sys_ = collect_activations(model, tok, PROMPTS, system_prompt="Be brief.", progress=False)["harmless"]
    assert (base[0] - sys_[0]).abs().max() > 1e-3


def test_auto_batch_size_halves_on_out_of_memory(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny("llama")
    reference = collect_activations(model, tok, PROMPTS, batch_size=1, progress=False)
    real = collect_mod._forward
    sizes: list[int] = []

    def flaky(model, ids, pad_id, device):
        sizes.append(len(ids))
        if len(ids) > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(model, ids, pad_id, device)

    monkeypatch.setattr(collect_mod, "_forward", flaky)
    res = collect_with_stats(model, tok, PROMPTS, batch_size=0, max_batch_size=8, progress=False)
    assert res.batch_size == 2 and sizes[:3] == [5, 4, 2]
    for kind in PROMPTS:
        torch.testing.assert_close(res.activations[kind], reference[kind], atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="collect.batch_size"):
        collect_with_stats(model, tok, PROMPTS, batch_size=4, progress=False)


def test_bad_inputs_are_rejected(tiny) -> None:
    model, tok = tiny("llama")
    with pytest.raises(ValueError, match="collect.positions"):
        collect_activations(model, tok, {"a": ["hi"]}, positions=500, progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        collect_activations(model, tok, {"a": []}, progress=False)
    tok.padding_side = "right"
    try:
        with pytest.raises(ValueError, match="pads on the right"):
            collect_activations(model, tok, {"a": ["hi"]}, progress=False)
    finally:
        tok.padding_side = "left"


def test_kv_shared_layers_that_skip_positions_are_detected(tiny) -> None:
    # Gemma 4 runs its KV-shared layers on the last token only when logits_to_keep=1.
    model, _ = tiny("gemma4_text")
    ids = torch.randint(10, 300, (2, 9))
    with torch.no_grad(), capture_last_positions(model, 1) as cap:
        with pytest.raises(RuntimeError, match="skipped positions"):
            model(input_ids=ids, logits_to_keep=1)
        cap.clear()
        model(input_ids=ids, use_cache=False)
        assert all(a.shape == (2, 1, 64) for a in cap.take())


def _frame(kinds: dict[str, list[str]], splits: dict[str, list[str]]) -> pd.DataFrame:
    rows = [(k, s, t) for k, texts in kinds.items() for s, t in zip(splits[k], texts)]
    frame = pd.DataFrame(rows, columns=["kind", "split", "text"])
    frame.insert(0, "id", range(len(frame)))
    frame["n_tokens"] = 5
    return frame


def test_save_and_load_activations_roundtrip(tmp_path: Path) -> None:
    L, P, d = 3, 2, 4
    kinds = {"harmful": ["a", "b", "c"], "harmless": ["x", "y"]}
    splits = {"harmful": ["fit", "heldout", "fit"], "harmless": ["heldout", "fit"]}
    acts = {k: torch.randn(L, len(t), P, d) for k, t in kinds.items()}
    save_activations(tmp_path, acts, _frame(kinds, splits))
    loaded = load_activations(tmp_path)
    assert list(loaded.layers) == [0, 1, 2] and loaded.d_model == d and loaded.positions == P
    assert list(loaded.prompts["text"]) == ["a", "b", "c", "x", "y"]
    torch.testing.assert_close(loaded.get(1, "harmful", "fit"), acts["harmful"][1, [0, 2], -1], atol=0, rtol=0)
    torch.testing.assert_close(loaded.get(2, "harmful", "heldout", position=-2), acts["harmful"][2, [1], 0],
                               atol=0, rtol=0)
    assert loaded.position_labels == [-2, -1]
    torch.testing.assert_close(loaded.get(0, "harmless"), acts["harmless"][0, :, -1], atol=0, rtol=0)
    assert list(loaded.rows("harmful", "fit")["text"]) == ["a", "c"]
    with pytest.raises(KeyError, match="capability"):
        loaded.get(0, "capability", "fit")
    with pytest.raises(KeyError, match="split 'test'"):
        loaded.get(0, "harmful", "test")
    with pytest.raises(IndexError, match="layer 3"):
        loaded.get(3, "harmful", "fit")
    with pytest.raises(IndexError, match="position -3"):
        loaded.get(0, "harmful", "fit", position=-3)
    with pytest.raises(IndexError, match="position 1 was not captured"):
        loaded.get(0, "harmful", "fit", position=1)


def test_answer_positions_are_the_greedy_answer_read_teacher_forced(tiny, tmp_path: Path) -> None:
    """Position r of R answer positions is the residual at answer token r of the model's own greedy
    answer, the same as a plain forward pass over prompt + answer; prompt positions are unchanged."""
    from saber.evaluate.generation import greedy_generate
    from saber.model.chat import encode_ids, render_prompts

    model, tok = tiny("llama")
    R = 3
    res = collect_with_stats(model, tok, PROMPTS, positions=2, response_positions=R, batch_size=3, progress=False)
    plain = collect_activations(model, tok, PROMPTS, positions=2, batch_size=3, progress=False)
    for kind, texts in PROMPTS.items():
        acts = res.activations[kind]
        assert acts.shape[2] == 2 + R
        torch.testing.assert_close(acts[:, :, :2], plain[kind], atol=1e-5, rtol=1e-4)
        ids, _ = encode_ids(tok, render_prompts(tok, texts, None), 256)
        answers = greedy_generate(model, tok, ids, R, 4, exact=True)
        assert all(len(a) == R for a in answers)
        with torch.no_grad():
            for i, (row, answer) in enumerate(zip(ids, answers)):
                out = model(input_ids=torch.tensor([row + answer]), output_hidden_states=True)
                for layer in range(acts.shape[0] - 1):  # the last hidden state is after the final norm
                    torch.testing.assert_close(acts[layer, i, 2:], out.hidden_states[layer + 1][0, -R:],
                                               atol=1e-4, rtol=1e-4)
        assert res.n_tokens[kind] == [len(row) for row in ids]  # prompt tokens, without the answer
    frame = _frame({k: v for k, v in PROMPTS.items()}, {k: ["fit"] * len(v) for k, v in PROMPTS.items()})
    save_activations(tmp_path, res.activations, frame, response_positions=R)
    loaded = load_activations(tmp_path)
    assert loaded.position_labels == [-2, -1, 1, 2, 3]
    torch.testing.assert_close(loaded.get(1, "harmful", position=-1), res.activations["harmful"][1, :, 1])
    torch.testing.assert_close(loaded.get(1, "harmful", position=1), res.activations["harmful"][1, :, 2])
    torch.testing.assert_close(loaded.get(1, "harmful", position=3), res.activations["harmful"][1, :, 4])


def test_save_rejects_mismatched_rows_and_load_names_missing_file(tmp_path: Path) -> None:
    kinds = {"harmful": ["a", "b"]}
    frame = _frame(kinds, {"harmful": ["fit", "heldout"]})
    with pytest.raises(ValueError, match=r"activations\['harmful'\].*2 rows"):
        save_activations(tmp_path, {"harmful": torch.zeros(1, 3, 1, 4)}, frame)
    save_activations(tmp_path, {"harmful": torch.zeros(1, 2, 1, 4)}, frame)
    (tmp_path / "activations.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="activations.safetensors.*stages.collect"):
        load_activations(tmp_path)


# ----------------------------------------------------------------------------- stage, end to end


def _write_jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return str(path)


@pytest.mark.slow
def test_collect_stage_publishes_then_hits_cache(tmp_path: Path) -> None:
    model_dir = build_tiny("llama", tmp_path / "model")
    words = ["lock", "door", "car", "safe", "phone", "bank", "mail", "shop", "wifi", "house"]
    data = {
        "harmful": [f"How do I break into a {w}?" for w in words],
        "harmless": [f"How do I paint a {w}?" for w in words],
        "capability": [f"Add {i} and {i + 3}." for i in range(10)],
        "harmful_eval": ["How do I steal a bike?", "How do I forge a passport?"],
        "harmless_eval": ["How do I clean a bike?", "How do I renew a passport?"],
    }
    overrides = [f"data.{k}.path={_write_jsonl(tmp_path / f'{k}.jsonl', v)}" for k, v in data.items()]
    cmd = [sys.executable, "-m", "stages.collect", "model=llama3_8b", f"model.path={model_dir}",
           "model.dtype=float32", "model.device_map=null", "model.device=cpu", "data=default",
           "data.xstest=null", f"store_root={tmp_path / 'store'}", "collect.positions=2",
           f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    artifact = Path(first.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["meta"]["n_prompts"]["harmful"] == {"fit": 7, "heldout": 3}
    acts = load_activations(artifact)
    assert acts.positions == 2 and acts.d_model == 64 and list(acts.layers) == [0, 1]
    assert acts.get(1, "harmful", "heldout").shape == (3, 64)
    assert set(acts.prompts["kind"]) == {"harmful", "harmless", "capability"}
    assert (acts.prompts["n_tokens"] > 0).all()

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    logs = second.stdout + second.stderr  # Hydra's job logging may write to either stream
    assert "cache hit collect" in logs and "collected" not in logs
    assert second.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]

    # A probe prompt that is also an evaluation prompt stops the stage with a clear error.
    _write_jsonl(tmp_path / "harmful_eval.jsonl", data["harmful"][:1])
    third = subprocess.run(cmd + ["force=true"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert third.returncode != 0 and "share 1 prompt" in third.stdout + third.stderr


def test_probe_splits_explicit_heldout_and_overlap_checks(tmp_path: Path) -> None:
    from saber.config.schema import DataConfig, PromptSourceConfig
    from saber.probes import load_probe_splits, prompt_frame

    def src(name: str, texts: list[str]) -> PromptSourceConfig:
        return PromptSourceConfig(path=_write_jsonl(tmp_path / f"{name}.jsonl", texts))

    harmful = [f"harm {i}" for i in range(10)]
    data = DataConfig(harmful=src("harmful", harmful), harmless=src("harmless", [f"ok {i}" for i in range(10)]),
                      capability=src("capability", [f"add {i}" for i in range(4)]),
                      harmful_eval=src("harmful_eval", ["harm eval"]), harmless_eval=PromptSourceConfig(),
                      capability_heldout=src("capability_heldout", ["add 100", "add 101"]),
                      heldout_fraction=0.3, seed=0)
    splits = load_probe_splits(data, {})
    assert [len(splits["harmful"][s]) for s in ("fit", "heldout")] == [7, 3]
    assert set(splits["harmful"]["fit"].texts) | set(splits["harmful"]["heldout"].texts) == set(harmful)
    assert splits["capability"]["fit"].texts == tuple(f"add {i}" for i in range(4))
    assert splits["capability"]["heldout"].texts == ("add 100", "add 101")
    frame = prompt_frame(splits)
    assert list(frame["id"]) == list(range(26)) and list(frame.columns) == ["id", "kind", "split", "text", "n_tokens"]
    assert list(frame[frame["kind"] == "harmful"]["split"]) == ["fit"] * 7 + ["heldout"] * 3

    data.harmful_eval = src("harmful_eval", ["HARM  3"])  # same prompt modulo case and spaces
    with pytest.raises(ValueError, match="share 1 prompt"):
        load_probe_splits(data, {})
    data.harmful_eval = PromptSourceConfig()
    data.harmless = src("harmless", ["harm 1", "ok"])
    with pytest.raises(ValueError, match="share 1 prompt"):
        load_probe_splits(data, {})


def test_non_finite_activations_name_the_layer_the_tensor_and_a_fitting_hint(tiny) -> None:
    from saber.collect import NonFiniteActivationsError, check_finite

    model, tok = tiny("llama")
    acts = {k: v.clone() for k, v in collect_activations(model, tok, PROMPTS, positions=1, progress=False).items()}
    check_finite(acts, model, "float32")  # finite: no error
    acts["harmful"][1, 0, 0, 3] = float("nan")  # planted after layer 1 only
    with pytest.raises(NonFiniteActivationsError, match="after decoder layer 1 .*already float32") as err:
        check_finite(acts, model, "float32")
    assert "model.dtype=float32" not in str(err.value)
    with pytest.raises(NonFiniteActivationsError, match="set model.dtype=float32"):
        check_finite(acts, model, "bfloat16")
    # NaN in a weight of layer 1: the real forward pass produces it from that layer on, and the
    # error names the tensor instead of suggesting another dtype.
    name, param = next((n, p) for n, p in model.named_parameters() if ".1." in n and n.endswith("o_proj.weight"))
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            param[0, 0] = float("nan")
        acts = collect_activations(model, tok, PROMPTS, positions=1, progress=False)
        with pytest.raises(NonFiniteActivationsError, match=f"layer 1 .*{name}"):
            check_finite(acts, model, "float32")
    finally:
        with torch.no_grad():
            param.copy_(saved)


@pytest.mark.slow
def test_answer_position_directions_run_through_collect_extract_and_rank(tmp_path: Path) -> None:
    """collect.response_positions=2 on a tiny real model: extract finds k directions at each of
    the positions -1, 1 and 2, and rank scores each on the held-out activations of its own
    position (recomputed here) with one Holm correction over all of them."""
    from saber.directions import load_directions
    from saber.pipeline import Pipeline
    from saber.ranking import fdr
    from saber.testing import compose_config

    model_dir = build_tiny("llama", tmp_path / "model")
    words = ["lock", "door", "car", "safe", "phone", "bank", "mail", "shop", "wifi", "house", "gate", "box"]
    data = {"harmful": [f"How do I break into a {w}?" for w in words],
            "harmless": [f"How do I paint a {w}?" for w in words],
            "capability": [f"Add {i} and {i + 3}." for i in range(12)]}
    overrides = [f"data.{k}.path={_write_jsonl(tmp_path / f'{k}.jsonl', v)}" for k, v in data.items()]
    cfg = compose_config("model=llama3_8b", f"model.path={model_dir}", "model.dtype=float32", "model.device_map=null",
                         "model.device=cpu", "data=default", "data.xstest=null", f"store_root={tmp_path / 'store'}",
                         "collect.response_positions=2", "extract.k=2", "rank.significance=1", "entangle.m=2",
                         *overrides)
    pipe = Pipeline(cfg)
    rank = pipe.ensure("rank")
    acts = load_activations(pipe.ensure("collect").path)
    assert acts.position_labels == [-1, 1, 2] and acts.response_positions == 2
    directions = load_directions(pipe.ensure("extract").path)
    assert all(d.positions.tolist() == [-1, -1, 1, 1, 2, 2] for d in directions.values())
    ranking = pd.read_parquet(rank.file("ranking.parquet"))
    assert len(ranking) == 6 * acts.n_layers and set(ranking["position"]) == {-1, 1, 2}
    for row in ranking.itertuples():
        v = directions[row.layer].basis[row.index].double()
        h = acts.get(row.layer, "harmful", "heldout", position=row.position).double() @ v
        a = acts.get(row.layer, "harmless", "heldout", position=row.position).double() @ v
        assert row.fdr == pytest.approx(float(fdr(h[None].numpy(), a[None].numpy(), cfg.rank.eps)[0]), rel=1e-9)


def test_reading_a_layer_again_reads_the_file_once_and_hands_out_copies(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    L, P, d = 2, 3, 4
    kinds = {"harmful": ["a", "b"], "harmless": ["x", "y"]}
    acts = {k: torch.randn(L, 2, P, d) for k in kinds}
    save_activations(tmp_path, acts, _frame(kinds, {k: ["fit", "heldout"] for k in kinds}))
    loaded = load_activations(tmp_path)
    opened = []
    real = collect_mod.safe_open
    monkeypatch.setattr(collect_mod, "safe_open", lambda *a, **k: (opened.append(a), real(*a, **k))[1])
    for position in (-3, -2, -1):
        for split in ("fit", "heldout", None):
            loaded.get(1, "harmful", split, position=position)
    assert len(opened) == 1
    first = loaded.get(1, "harmful", position=-1)
    first += 100.0
    torch.testing.assert_close(loaded.get(1, "harmful", position=-1), acts["harmful"][1, :, -1], atol=0, rtol=0)
    loaded.get(0, "harmful")
    assert len(opened) == 2


class _Scorer:
    """Labels an answer a refusal when it is the planted one."""

    def score(self, prompts: list[str], answers: list[str]) -> list[bool]:
        return [a == "I refuse." for a in answers]


@pytest.mark.parametrize(("still_refused", "minimum", "fit_left"), [
    ({"h1", "h3"}, 2, ["h1", "h3"]),       # the freed ones move to split `freed`
    ({"h1"}, 2, ["h0", "h1", "h2", "h3"]),  # fewer than iterate.refused_only_min: all of them stay
])
def test_later_iterations_fit_on_the_prompts_still_refused(
        monkeypatch: pytest.MonkeyPatch, still_refused: set[str], minimum: int, fit_left: list[str]) -> None:
    import saber.evaluate.reference as reference
    from stages.collect import refused_fit_only

    frame = pd.DataFrame({"id": range(7), "kind": ["harmful"] * 5 + ["harmless"] * 2,
                          "split": ["fit"] * 4 + ["heldout", "fit", "fit"],
                          "text": ["h0", "h1", "h2", "h3", "h4", "a0", "a1"], "n_tokens": 0})
    asked: list[list[str]] = []

    def generate(model: object, tokenizer: object, prompts: list[str], settings: object) -> tuple[None, list[str]]:
        asked.append(list(prompts))
        return None, ["I refuse." if p in still_refused else "Sure." for p in prompts]

    monkeypatch.setattr(reference, "generate_responses", generate)
    cfg = compose_config(f"iterate.refused_only_min={minimum}")
    ctx = SimpleNamespace(cfg=cfg, iteration=1, pipeline=SimpleNamespace(refusal_scorer=_Scorer))
    out, n = refused_fit_only(ctx, None, None, frame)
    assert asked == [["h0", "h1", "h2", "h3"]]  # only the harmful fit prompts are generated
    assert out[(out["kind"] == "harmful") & (out["split"] == "fit")]["text"].tolist() == fit_left and n == len(fit_left)
    freed = out[out["split"] == "freed"]["text"].tolist()
    assert sorted(freed + fit_left) == ["h0", "h1", "h2", "h3"]
    assert out.drop(columns="split").equals(frame.drop(columns="split"))  # rows, order and ids unchanged
    assert out.loc[4, "split"] == "heldout" and frame["split"].tolist()[:4] == ["fit"] * 4  # the input is not modified
