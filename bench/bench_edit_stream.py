"""Streaming edit at 8B scale: memory and time of `export_edited` on a Llama-3-8B-shaped checkpoint.

`python -m bench edit_stream [--scale=full|small|tiny] [--workdir=DIR] [--keep] [--no-drop-caches]
[--baseline-layers=N] [--no-write]`

The benchmark writes its own checkpoint: random bf16 tensors with the exact Hugging Face Llama
names and shapes, ~5 GB shards plus `model.safetensors.index.json`, one shard in memory at a
time (never committed, deleted at the end unless --keep). It then runs, each phase in its own
subprocess so that the peak resident set (the process's VmHWM: anonymous and file-backed pages,
memory-mapped source shards included) belongs to that phase alone:

- copy: `shutil.copyfile` of every file of the checkpoint (the throughput floor), run before and
  after the streaming export so that both sides see the same cache state;
- stream: `export_edited` with a 14-direction plan, scope "all", default roles;
- baseline: `from_pretrained(dtype=bfloat16)`, the same edit in memory (`apply_plan` with
  keep_originals=False, no revert copies: the leanest load-edit-save), `save_pretrained`.

Every phase ends with an fsync of each output file inside its timed section, so a time is the
time to durable output. The page cache is dropped before each phase when the process may do so (root);
otherwise phases run with a warm cache and the report says so. Each output directory is deleted
right after its phase. When the machine lacks memory for the full baseline (checkpoint size +
5 GiB available), the baseline and a second streaming run use a reduced checkpoint (fewer
layers) and the stream/baseline ratios are reported at that scale. A parent watchdog kills any
phase when available system memory falls under 1 GiB. Results at --scale full replace the section
"Streaming edit at 8B scale" of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from bench.report import cpu_name, update_section

if TYPE_CHECKING:  # torch is imported where used: the copy phase's child stays a bare interpreter
    import torch

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "BENCHMARKS.md"
TITLE = "Streaming edit at 8B scale"
INDEX_NAME = "model.safetensors.index.json"
GIB = 1 << 30
GB = 1e9
GUARD_BYTES = 1 * GIB  # kill a phase when the machine's available memory drops below this
BASELINE_MARGIN = 5 * GIB  # headroom over the checkpoint size needed to load it whole
DISK_MARGIN = 5 * GB
POLL_S = 0.05
PLAN_ROWS = 14

_COMMON = dict(max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
SCALES: dict[str, dict[str, Any]] = {
    # Llama-3-8B
    "full": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=128256,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "small": dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=3584, vocab_size=32000,
                  num_attention_heads=16, num_key_value_heads=4),
    "tiny": dict(hidden_size=64, num_hidden_layers=4, intermediate_size=160, vocab_size=512,
                 num_attention_heads=4, num_key_value_heads=2),
}
SHARD_BYTES = {"full": 5_000_000_000, "small": 100_000_000, "tiny": 128_000}


# ---------------------------------------------------------------------------------------------
# synthetic checkpoint


def llama_config(scale: str, layers: int | None = None) -> Any:
    import torch

    from transformers import LlamaConfig

    kwargs = {**_COMMON, **SCALES[scale]}
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    config = LlamaConfig(**kwargs)
    config.dtype = torch.bfloat16
    return config


def tensor_shapes(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every saved tensor, in the model's order, from a weightless model."""
    import torch

    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def assign_shards(shapes: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[str]]:
    """Greedy split in model order: a shard closes before the tensor that would overflow it."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes:
        n = 2 * _numel(shape)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _fill(shape: tuple[int, ...], pool: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A bf16 tensor filled from random offsets of a random pool (fast; quality is irrelevant)."""
    import torch

    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    chunk = pool.numel() // 2
    for start in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - start)
        offset = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=gen))
        flat[start:start + n].copy_(pool[offset:offset + n])
    return out


def write_checkpoint(out_dir: Path, scale: str, shard_bytes: int, layers: int | None = None, seed: int = 0) -> None:
    """config.json + bf16 safetensors shards + index, holding at most one shard in memory."""
    import torch

    from safetensors.torch import save_file

    config = llama_config(scale, layers)
    shapes = dict(tensor_shapes(config))
    shards = assign_shards(list(shapes.items()), shard_bytes)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 22, generator=gen) * 0.02).to(torch.bfloat16)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            t = _fill(shapes[name], pool, gen)
            if name.endswith("norm.weight"):
                t.add_(1.0)
            tensors[name] = t
            weight_map[name] = file
            total += 2 * t.numel()
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def checkpoint_sizes(scale: str, shard_bytes: int, layers: int | None = None) -> tuple[int, int, int]:
    """(total bytes, largest shard bytes, number of shards) of the checkpoint `write_checkpoint` makes."""
    shapes = tensor_shapes(llama_config(scale, layers))
    size = dict((n, 2 * _numel(s)) for n, s in shapes)
    shards = assign_shards(shapes, shard_bytes)
    per_shard = [sum(size[n] for n in names) for names in shards]
    return sum(per_shard), max(per_shard), len(shards)


# ---------------------------------------------------------------------------------------------
# plan and in-memory baseline edit


def bench_plan(hidden: int, layers: int, seed: int = 0) -> Any:
    """A SABER-like plan: 14 random unit directions over the middle layers (25 % to 70 % of
    depth), several per layer, alpha 0.825 with every fifth direction entangled (alpha 0.03)."""
    import torch

    from saber.edit import EditPlan, PlanRow

    gen = torch.Generator().manual_seed(seed)
    rows, vectors, per_layer = [], {}, {}
    for i in range(PLAN_ROWS):
        layer = min(layers - 1, int(layers * 0.25 + i * layers * 0.45 / PLAN_ROWS))
        index = per_layer.get(layer, 0)
        per_layer[layer] = index + 1
        v = torch.randn(hidden, generator=gen)
        key = f"L{layer}_d{index}"
        vectors[key] = v / v.norm()
        rows.append(PlanRow(layer=layer, index=index, rank=i, alpha=0.03 if i % 5 == 4 else 0.825, vector_key=key))
    return EditPlan(rows=rows, vectors=vectors)


def edit_in_place(model: torch.nn.Module, plan: Any, cfg: Any) -> int:
    """The library's `apply_plan` without the originals it keeps for revert (a load-edit-save
    never reverts). Returns tensors edited."""
    from saber.edit import apply_plan

    return len(apply_plan(model, plan, cfg, keep_originals=False).edited_params)


# ---------------------------------------------------------------------------------------------
# phases (each runs in its own subprocess)


def phase_write(a: argparse.Namespace) -> dict[str, Any]:
    write_checkpoint(Path(a.out), a.scale, a.shard_bytes, a.layers)
    return {}


def phase_copy(a: argparse.Namespace) -> dict[str, Any]:
    src, out = Path(a.src), Path(a.out)
    out.mkdir(parents=True)
    n = 0
    for item in sorted(src.iterdir()):
        shutil.copyfile(item, out / item.name)
        n += item.stat().st_size
    return {"bytes": n}


def phase_stream(a: argparse.Namespace) -> dict[str, Any]:
    from saber.edit import EditConfig, export_edited, load_plan

    timings: dict[str, float] = {}
    export_edited(Path(a.src), Path(a.out), load_plan(Path(a.plan)), EditConfig(), timings=timings)
    return {"timings": timings}


def phase_baseline(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from transformers import AutoModelForCausalLM

    from saber.edit import EditConfig, load_plan

    model = AutoModelForCausalLM.from_pretrained(a.src, dtype=torch.bfloat16)
    edited = edit_in_place(model, load_plan(Path(a.plan)), EditConfig())
    model.save_pretrained(a.out)
    return {"tensors_edited": edited}


PHASES = {"write": phase_write, "copy": phase_copy, "stream": phase_stream, "baseline": phase_baseline}


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` (and the directories) to disk: times are to durable output."""
    for p in [path, *path.rglob("*")]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _warm_imports(phase: str) -> None:
    """Import what a phase needs before its clock starts (transformers imports lazily, seconds)."""
    if phase in ("stream", "baseline"):
        import transformers.models.llama.modeling_llama  # noqa: F401

        import saber.edit  # noqa: F401


def peak_rss_self() -> int:
    """This process image's high-water resident set in bytes (VmHWM: anonymous plus file-backed
    pages, reset by exec, unlike ru_maxrss which keeps the forking parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (the benchmark needs Linux)")


def run_phase_here(a: argparse.Namespace) -> dict[str, Any]:
    """Run one phase in this process: its work time (to durable output) and extras."""
    _warm_imports(a.phase)
    t0 = time.perf_counter()
    extra = PHASES[a.phase](a)
    if a.out:
        fsync_tree(Path(a.out))
    return {"seconds": time.perf_counter() - t0, **extra}


def phase_main(a: argparse.Namespace) -> None:
    """Child side: run one phase and write its work time and own peak RSS."""
    data = run_phase_here(a)
    data["peak_rss"] = peak_rss_self()
    Path(a.result).write_text(json.dumps(data))


@dataclass
class PhaseResult:
    seconds: float  # the phase's work, measured inside the child (excludes interpreter start-up)
    wall_seconds: float  # the whole child process
    peak_rss: int  # bytes, VmHWM of the phase's process
    polled_rss: int  # bytes, highest RSS seen by polling every 50 ms (0 when not isolated)
    extra: dict[str, Any]


class PhaseError(RuntimeError):
    pass


def drop_caches() -> bool:
    """sync + drop the page cache; False when not permitted (then phases run warm)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_phase(phase: str, workdir: Path, isolate: bool = True, **args: Any) -> PhaseResult:
    """Run `phase` in a fresh interpreter (isolate) or in this process (a quick smoke run: the
    peak RSS is then this process's, not the phase's). A watchdog kills an isolated phase if
    the machine runs short of memory; it also polls the child's RSS as a cross-check."""
    if not isolate:
        t0 = time.perf_counter()
        data = run_phase_here(argparse.Namespace(phase=phase, **{k: args.get(k) for k in _PHASE_ARGS}))
        return PhaseResult(data.pop("seconds"), time.perf_counter() - t0, peak_rss_self(), 0, data)
    result = workdir / f".phase-{phase}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.bench_edit_stream", "--phase", phase, "--result", str(result)]
    for key, value in args.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    child = psutil.Process(proc.pid)
    killed = False
    polled = 0
    while proc.poll() is None:
        try:
            polled = max(polled, child.memory_info().rss)
        except psutil.Error:
            pass
        if not killed and psutil.virtual_memory().available < GUARD_BYTES:
            proc.kill()
            killed = True
        time.sleep(POLL_S)
    wall = time.perf_counter() - t0
    if killed:
        raise PhaseError(f"phase {phase} killed: available memory fell below {GUARD_BYTES / GIB:.0f} GiB")
    if proc.returncode != 0 or not result.exists():
        raise PhaseError(f"phase {phase} failed with exit code {proc.returncode} (command: {' '.join(cmd)})")
    data = json.loads(result.read_text())
    result.unlink()
    return PhaseResult(data.pop("seconds"), wall, data.pop("peak_rss"), polled, data)


_PHASE_ARGS = ("src", "out", "plan", "scale", "shard_bytes", "layers")


# ---------------------------------------------------------------------------------------------
# correctness sample


def sample_keys(layers: int) -> tuple[list[str], list[str]]:
    """(edited, untouched) tensor names compared between the streaming and the baseline output."""
    edited = [f"model.layers.0.self_attn.o_proj.weight", f"model.layers.{layers // 2}.mlp.down_proj.weight",
              f"model.layers.{layers - 1}.self_attn.o_proj.weight"]
    return edited, ["model.layers.0.self_attn.q_proj.weight"]


def read_tensors(directory: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Named tensors from any safetensors layout (sharded with or without index, or single file)."""

    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in set(keys) & set(f.keys()):
                out[key] = f.get_tensor(key).clone()
    missing = sorted(set(keys) - set(out))
    if missing:
        raise KeyError(f"tensors {missing} not found in {directory}")
    return out


def compare(source: dict[str, torch.Tensor], stream: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
            edited: list[str], untouched: list[str]) -> dict[str, Any]:
    import torch

    diffs = {k: float((stream[k].float() - base[k].float()).abs().max()) for k in edited + untouched}
    return {
        "keys": edited + untouched,
        "bit_exact": all(torch.equal(stream[k], base[k]) for k in edited + untouched),
        "max_abs_diff": max(diffs.values()),
        "edited_changed": all(not torch.equal(stream[k], source[k]) for k in edited),
        "untouched_equal": all(torch.equal(stream[k], source[k]) for k in untouched),
    }


# ---------------------------------------------------------------------------------------------
# driver


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Runner:
    """Runs phases: drops the page cache first (when allowed), isolated or in this process."""

    workdir: Path
    drop: bool
    isolate: bool

    def __call__(self, phase: str, **args: Any) -> PhaseResult:
        if self.drop:
            drop_caches()
        return run_phase(phase, self.workdir, self.isolate, **args)


def _ensure_source(run_: Runner, name: str, scale: str, shard_bytes: int, layers: int | None
                   ) -> tuple[Path, PhaseResult | None]:
    """The synthetic checkpoint under workdir/name, reused when a kept one has the same spec."""
    workdir = run_.workdir
    src = workdir / name
    spec = {"scale": scale, "shard_bytes": shard_bytes, "layers": layers, "config": SCALES[scale]}
    marker = workdir / f"{name}.spec.json"
    if src.exists() and marker.exists() and json.loads(marker.read_text()) == spec:
        return src, None
    shutil.rmtree(src, ignore_errors=True)
    marker.unlink(missing_ok=True)
    result = run_("write", out=src, scale=scale, shard_bytes=shard_bytes, layers=layers)
    marker.write_text(json.dumps(spec))
    return src, result


def _stream_and_sample(run_: Runner, src: Path, plan_dir: Path, keys: list[str]
                       ) -> tuple[PhaseResult, dict[str, torch.Tensor]]:
    out = run_.workdir / "out-stream"
    shutil.rmtree(out, ignore_errors=True)
    result = run_("stream", src=src, out=out, plan=plan_dir)
    sample = read_tensors(out, keys)
    shutil.rmtree(out)
    return result, sample


def _baseline_and_sample(run_: Runner, src: Path, plan_dir: Path, keys: list[str]
                         ) -> tuple[PhaseResult, dict[str, torch.Tensor]]:
    out = run_.workdir / "out-baseline"
    shutil.rmtree(out, ignore_errors=True)
    try:
        result = run_("baseline", src=src, out=out, plan=plan_dir)
        sample = read_tensors(out, keys)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return result, sample


def _copy(run_: Runner, src: Path) -> PhaseResult:
    out = run_.workdir / "out-copy"
    shutil.rmtree(out, ignore_errors=True)
    try:
        return run_("copy", src=src, out=out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _phase_row(r: PhaseResult, size: int) -> dict[str, Any]:
    row: dict[str, Any] = {"seconds": r.seconds, "wall_seconds": r.wall_seconds, "peak_rss_gib": r.peak_rss / GIB,
                           "polled_rss_gib": r.polled_rss / GIB, "throughput_gb_s": size / GB / r.seconds}
    if "timings" in r.extra:
        row["timings"] = r.extra["timings"]
    return row


def run(scale: str, workdir: Path, *, keep: bool = False, drop: bool = True, baseline_layers: int | None = None,
        shard_bytes: int | None = None, isolate: bool = True) -> dict[str, Any]:
    """Run every phase and return the report (also written to workdir/report.json).

    `isolate=False` runs the phases in this process (a quick smoke run whose peak RSS figures
    are this process's, not per phase)."""
    from saber.edit import save_plan

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    shard_bytes = shard_bytes or SHARD_BYTES[scale]
    full_layers = SCALES[scale]["num_hidden_layers"]
    total, largest, n_shards = checkpoint_sizes(scale, shard_bytes)
    available = psutil.virtual_memory().available
    if baseline_layers is None and available < total + BASELINE_MARGIN:
        # largest layer count whose checkpoint fits, in steps of halving
        baseline_layers = full_layers
        while baseline_layers > 1 and checkpoint_sizes(scale, shard_bytes, baseline_layers)[0] + BASELINE_MARGIN > available:
            baseline_layers //= 2
    reduced = baseline_layers is not None and baseline_layers != full_layers
    reduced_total = checkpoint_sizes(scale, shard_bytes, baseline_layers)[0] if reduced else 0
    kept = workdir / "source"
    have = _dir_bytes(kept) if kept.exists() else 0
    need = (total - have) + total + reduced_total * 2 + DISK_MARGIN
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(f"edit_stream: {workdir} has {free / GB:.1f} GB free, the benchmark needs about "
                         f"{need / GB:.1f} GB (checkpoint {total / GB:.1f} GB + one output at a time + "
                         f"{DISK_MARGIN / GB:.0f} GB margin); pass --workdir on a larger disk or --scale small")

    load_start = os.getloadavg()[0]
    dropped = drop and drop_caches()
    run_ = Runner(workdir, dropped, isolate)
    report: dict[str, Any] = {
        "scale": scale, "config": SCALES[scale], "date": dt.date.today().isoformat(), "machine": machine(),
        "checkpoint_gb": total / GB, "checkpoint_gib": total / GIB, "largest_shard_gib": largest / GIB,
        "n_shards": n_shards, "plan_rows": PLAN_ROWS, "cache": "dropped before each phase" if dropped else "warm",
        "available_memory_gib_at_start": available / GIB,
    }
    hidden = SCALES[scale]["hidden_size"]
    plan_dir = workdir / "plan"
    save_plan(bench_plan(hidden, full_layers), plan_dir)
    src, written = _ensure_source(run_, "source", scale, shard_bytes, None)
    if written is not None:
        report["write"] = _phase_row(written, total)
    edited, untouched = sample_keys(full_layers)
    keys = edited + untouched
    source_sample = read_tensors(src, keys)

    phases: dict[str, dict[str, float]] = {}
    copy1 = _copy(run_, src)
    stream, stream_sample = _stream_and_sample(run_, src, plan_dir, keys)
    copy2 = _copy(run_, src)
    phases["copy (before stream)"] = _phase_row(copy1, total)
    phases["stream export_edited"] = _phase_row(stream, total)
    phases["copy (after stream)"] = _phase_row(copy2, total)
    copy_seconds = (copy1.seconds + copy2.seconds) / 2

    if reduced:
        if not keep:
            shutil.rmtree(src)
            (workdir / "source.spec.json").unlink(missing_ok=True)
        r_plan = workdir / "plan-reduced"
        save_plan(bench_plan(hidden, baseline_layers), r_plan)
        r_src, _ = _ensure_source(run_, "source-reduced", scale, shard_bytes, baseline_layers)
        edited, untouched = sample_keys(baseline_layers)
        keys = edited + untouched
        source_sample = read_tensors(r_src, keys)
        cmp_stream, stream_sample = _stream_and_sample(run_, r_src, r_plan, keys)
        baseline, base_sample = _baseline_and_sample(run_, r_src, r_plan, keys)
        r_total = _dir_bytes(r_src)
        phases[f"stream export_edited ({baseline_layers} layers)"] = _phase_row(cmp_stream, r_total)
        phases[f"baseline load + edit + save_pretrained ({baseline_layers} layers)"] = _phase_row(baseline, r_total)
        if not keep:
            shutil.rmtree(r_src)
            (workdir / "source-reduced.spec.json").unlink(missing_ok=True)
    else:
        cmp_stream = stream
        baseline, base_sample = _baseline_and_sample(run_, src, plan_dir, keys)
        phases["baseline load + edit + save_pretrained"] = _phase_row(baseline, total)
    if not keep:
        shutil.rmtree(workdir / "source", ignore_errors=True)
        (workdir / "source.spec.json").unlink(missing_ok=True)

    bound = 2 * largest + GIB
    report["loadavg"] = f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    report.update({
        "phases": phases,
        "baseline_layers": baseline_layers if reduced else full_layers,
        "rss_bound_gib": bound / GIB,
        "rss_bound_ok": stream.peak_rss <= bound,
        "ratios": {
            "stream_over_copy_time": stream.seconds / copy_seconds,
            "stream_over_baseline_time": cmp_stream.seconds / baseline.seconds,
            "stream_over_baseline_peak_rss": cmp_stream.peak_rss / baseline.peak_rss,
        },
        "correctness": compare(source_sample, stream_sample, base_sample, edited, untouched),
    })
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def machine() -> str:
    import torch

    cpu = cpu_name()
    mem = psutil.virtual_memory().total / GIB
    return f"{os.cpu_count()}-core CPU ({cpu}), {mem:.0f} GiB RAM, torch {torch.__version__}"


def render(r: dict[str, Any], command: str) -> str:
    c, k = r["correctness"], r["ratios"]
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {r['machine']}; disk type unknown  ",
        f"Date: {r['date']}  ",
        f"Checkpoint: synthetic Llama-3-8B shape (hidden {r['config']['hidden_size']}, "
        f"{r['config']['num_hidden_layers']} layers, intermediate {r['config']['intermediate_size']}, vocab "
        f"{r['config']['vocab_size']}, untied), random bf16, {r['checkpoint_gb']:.2f} GB "
        f"({r['checkpoint_gib']:.2f} GiB) in {r['n_shards']} shards, largest shard {r['largest_shard_gib']:.2f} GiB. "
        f"Plan: {r['plan_rows']} directions, scope `all`, default roles. Page cache: {r['cache']}.",
        "",
        "| phase | work s | process s | peak RSS GiB | GB/s |",
        "|---|---|---|---|---|",
    ]
    for name, p in r["phases"].items():
        lines.append(f"| {name} | {p['seconds']:.1f} | {p['wall_seconds']:.1f} | {p['peak_rss_gib']:.2f} | "
                     f"{p['throughput_gb_s']:.3f} |")
    verdict = "holds" if r["rss_bound_ok"] else "FAILS"
    at = "" if r["baseline_layers"] == r["config"]["num_hidden_layers"] else \
        f" (both at {r['baseline_layers']} layers: the full baseline did not fit in available memory)"
    lines += [
        "",
        f"- Streaming peak RSS bound 2 x largest shard + 1 GiB = {r['rss_bound_gib']:.2f} GiB: {verdict}.",
        f"- Time stream / plain copy (mean of the two copies) = {k['stream_over_copy_time']:.2f}.",
        f"- Stream / baseline{at}: time {k['stream_over_baseline_time']:.2f}, peak RSS "
        f"{k['stream_over_baseline_peak_rss']:.2f}.",
        f"- Correctness sample ({', '.join(f'`{x}`' for x in c['keys'])}): streaming output "
        f"{'bit-identical to' if c['bit_exact'] else 'DIFFERS from'} the baseline's (max abs diff "
        f"{c['max_abs_diff']:.3g}); edited tensors changed: {c['edited_changed']}; untouched tensor equal to "
        f"the source: {c['untouched_equal']}.",
        "",
        "Work s is the phase's own work inside its process including an fsync of every output file; "
        "process s adds interpreter and library start-up. Peak RSS is the phase process's VmHWM, "
        "which counts resident file-backed pages of the memory-mapped source shard as well as copies. "
        "The baseline edits in place with the library's arithmetic but keeps no revert copies (the "
        "leanest load-edit-save), so the memory ratio is conservative. Beyond the copy time, both "
        "edit paths spend their time in float32 arithmetic: casting each writer matrix to float32 and "
        "back, and two matrix products per matrix (W - Q^T diag(alpha) Q W for all of its directions "
        "at once).",
    ]
    timings = r["phases"]["stream export_edited"].get("timings")
    if timings:
        lines += ["", "Inside the streaming export (seconds, before the final fsync): " + ", ".join(
            f"{name.removesuffix('_s').replace('_', ' ')} {value:.1f}" for name, value in timings.items()) + ". "
            "Unedited bytes go from file to file in the kernel (copy_file_range); only edited tensors "
            "are read into memory, recomputed and written back at their offsets."]
    if "loadavg" in r:
        lines += ["", f"Load average (1 min, shared machine): {r['loadavg']}."]
    if "write" in r:
        lines += ["", f"Writing the synthetic checkpoint took {r['write']['seconds']:.0f} s "
                     f"(peak RSS {r['write']['peak_rss_gib']:.2f} GiB, one shard in memory)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench edit_stream", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench" / "edit_stream",
                        help="scratch directory (full scale: ~40 GB free on its disk)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full", help="checkpoint shape")
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the synthetic checkpoint")
    parser.add_argument("--no-drop-caches", action="store_true", help="never drop the page cache")
    parser.add_argument("--baseline-layers", type=int, default=None, help="run the baseline at this depth")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    # internal: one phase in a child process
    for name in ("phase", "result", "src", "out", "plan"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--shard-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        phase_main(args)
        return
    report = run(args.scale, args.workdir, keep=args.keep, drop=not args.no_drop_caches,
                 baseline_layers=args.baseline_layers, shard_bytes=args.shard_bytes)
    flags = " ".join(a for a in (argv or []) if a != "--no-write")
    body = render(report, f"python -m bench edit_stream {flags}".strip())
    print(body)
    if args.scale == "full" and not args.no_write:
        update_section(DOC, TITLE, body)
        print(f"updated {DOC.relative_to(REPO)} section '{TITLE}'")


if __name__ == "__main__":
    main(sys.argv[1:])
