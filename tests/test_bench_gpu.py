"""The prepared GPU benchmark runs end to end (on tiny shapes, on whatever device CI has)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_gpu_benchmark_script_runs_every_stage_on_a_tiny_shape(capsys: pytest.CaptureFixture) -> None:
    from bench import bench_gpu

    bench_gpu.main(["--tiny", "--shapes=llama8b", "--no-write"])
    out = capsys.readouterr().out
    record = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert set(bench_gpu.ORDER) <= set(record["seconds"]) and "reference" in record["seconds"]
    assert record["collect_batch_size"] >= 1 and record["collect_tokens_per_s"] > 0
    assert record["generation_tokens_per_s"] > 0 and "| llama8b |" in out
