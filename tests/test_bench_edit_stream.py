"""Smoke test of the streaming-edit benchmark at a tiny scale (the full run is `python -m bench edit_stream`)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from bench.bench_edit_stream import (
    GIB,
    INDEX_NAME,
    assign_shards,
    checkpoint_sizes,
    llama_config,
    render,
    run,
    run_phase,
    tensor_shapes,
    update_section,
    write_checkpoint,
)


def test_synthetic_checkpoint_has_hf_names_shapes_and_shards(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_checkpoint(src, "tiny", shard_bytes=128_000)
    index = json.loads((src / INDEX_NAME).read_text())
    expected = dict(tensor_shapes(llama_config("tiny")))
    assert set(index["weight_map"]) == set(expected)
    total, largest, n_shards = checkpoint_sizes("tiny", 128_000)
    assert index["metadata"]["total_size"] == total
    files = sorted(src.glob("*.safetensors"))
    assert len(files) == n_shards > 1
    assert max(f.stat().st_size for f in files) >= largest  # file = tensors + a small header
    with safe_open(str(src / index["weight_map"]["model.layers.1.mlp.down_proj.weight"]), framework="pt") as f:
        t = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert tuple(t.shape) == expected["model.layers.1.mlp.down_proj.weight"]
    assert t.float().std() > 0  # random, not all zeros


def test_shards_close_before_overflow() -> None:
    shapes = [("a", (10,)), ("b", (10,)), ("c", (30,)), ("d", (5,))]  # bf16: 20, 20, 60, 10 bytes
    assert assign_shards(shapes, 45) == [["a", "b"], ["c"], ["d"]]


def test_isolated_phase_reports_its_own_peak_rss(tmp_path: Path) -> None:
    """The copy phase runs in a child without torch: its peak must not inherit this process's."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "blob.bin").write_bytes(b"x" * 1000)
    result = run_phase("copy", tmp_path, src=src, out=tmp_path / "out")
    assert (tmp_path / "out" / "blob.bin").read_bytes() == b"x" * 1000
    assert result.extra["bytes"] == 1000
    # a bare interpreter is ~10-30 MiB; this process (torch loaded) is far above 0.2 GiB
    assert 0 < result.peak_rss < 0.2 * GIB


def test_tiny_run_reports_ratios_and_bit_exact_sample(tmp_path: Path) -> None:
    report = run("tiny", tmp_path / "work", drop=False, isolate=False)
    assert set(report["phases"]) == {"copy (before stream)", "stream export_edited", "copy (after stream)",
                                     "baseline load + edit + save_pretrained"}
    for phase in report["phases"].values():
        assert phase["seconds"] > 0 and phase["peak_rss_gib"] > 0
    assert set(report["ratios"]) == {"stream_over_copy_time", "stream_over_baseline_time",
                                     "stream_over_baseline_peak_rss"}
    assert all(v > 0 for v in report["ratios"].values())
    check = report["correctness"]
    assert check["bit_exact"] and check["max_abs_diff"] == 0.0
    assert check["edited_changed"] and check["untouched_equal"]
    assert report["n_shards"] > 1
    # the synthetic source and every output are gone unless --keep
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["plan", "report.json"]
    body = render(report, "python -m bench edit_stream --scale=tiny")
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Other\n\nkeep me\n")
    update_section(doc, "Streaming edit at 8B scale", body)
    update_section(doc, "Streaming edit at 8B scale", body)  # replaced, not appended twice
    text = doc.read_text()
    assert text.startswith("# Benchmarks") and "keep me" in text
    assert text.count("## Streaming edit at 8B scale") == 1 and "bit-identical" in text


def test_reduced_baseline_compares_at_the_reduced_depth(tmp_path: Path) -> None:
    """When the whole model does not fit, stream and baseline are compared on a shallower copy."""
    report = run("tiny", tmp_path / "work", drop=False, isolate=False, baseline_layers=2)
    assert report["baseline_layers"] == 2
    assert "stream export_edited (2 layers)" in report["phases"]
    assert "baseline load + edit + save_pretrained (2 layers)" in report["phases"]
    assert report["correctness"]["bit_exact"]
    assert "model.layers.1.self_attn.o_proj.weight" in report["correctness"]["keys"]  # last of 2 layers
    assert "both at 2 layers" in render(report, "cmd")
