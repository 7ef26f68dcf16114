"""Shared benchmark harness: clean-tree guard, provenance, ratios, and the one writer of results.

A result file, benchmarks/results/<name>-<device>.json, is

    {"benchmark": name, "provenance": {...}, "reference": ..., "baselines": [...],
     "time_key": "median_ms", "rows": [...]}

``provenance``: the git commit measured, whether the tree was dirty, whether this was a dry run,
the UTC date, device, torch / CUDA versions, torch threads, the command line, and ``sources``:
git pathspecs of the code the benchmark measures (op files in every layer, the benchmark
itself, this harness). ``benchmarks/tables.py`` refuses a dry run, a result measured on a dirty
tree, and one that a later commit touching any of its sources made stale.

``rows``: one dict per (case, provider) with its time under ``time_key`` (``median_ms``;
``best_s`` for long end-to-end runs). For benchmarks that declare baselines (implementations
that are not blip-fast's, the reference first) every row also gets ``speedup_vs_reference`` and
``speedup_vs_best_baseline``, against the fastest baseline of its case (``best_baseline``).

Benchmarks refuse to run on a dirty tree; ``--allow-dirty`` makes the run a dry run whose result
is written to a temporary folder, never to benchmarks/results/.
"""

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import torch
from _git import REPO, RESULTS_SUBDIR, head, uncommitted

RESULTS_DIR = os.path.join(REPO, RESULTS_SUBDIR)
DRY_RUN_DIR = os.path.join(tempfile.gettempdir(), "blip_fast_bench_dry_run")
ALLOW_DIRTY_HELP = (
    "dry run, allowed on an uncommitted tree: the result goes to a temporary folder, not "
    "benchmarks/results/"
)
HARNESS_SOURCES = ["benchmarks/_harness.py", "benchmarks/_git.py"]
# What an end-to-end benchmark measures: the package, its kernels and the training loops.
PACKAGE_SOURCES = ["blip_fast", "train", "csrc", "kernels", *HARNESS_SOURCES]
# Shared by every op: dispatch, the reference oracle, the library handle, C++ registration and
# SIMD helpers.
_OP_COMMON_SOURCES = [
    "blip_fast/ops/_backend.py",
    "blip_fast/ops/_library.py",
    "blip_fast/ops/reference.py",
    "csrc/core",
    "csrc/ops.h",
    "csrc/torch_bindings.cpp",
    "csrc/cpu/vec.h",
]


def op_sources(*stems: str) -> list[str]:
    """Pathspecs of the ops ``stems`` in every layer (one op, one stem: blip_fast/ops,
    csrc/{ops,cpu,cuda}, kernels), the code they share, and this harness."""
    layers = ["blip_fast/ops/{}.py", "csrc/ops/{}.*", "csrc/cpu/{}.*", "csrc/cuda/{}.*"]
    layers.append("kernels/{}.*")
    return [p.format(s) for s in stems for p in layers] + _OP_COMMON_SOURCES + HARNESS_SOURCES


def dirty_tree_message(allow_dirty: bool) -> str | None:
    """Why this run must not start (the uncommitted paths), or None: the tree is clean or this
    is a dry run."""
    dirty = uncommitted()
    if not dirty or allow_dirty:
        return None
    listed = "\n  ".join(dirty[:20]) + ("\n  ..." if len(dirty) > 20 else "")
    return (
        f"refusing to benchmark an uncommitted tree ({len(dirty)} paths):\n  {listed}\n"
        f"commit first, or pass --allow-dirty for a dry run (written under {DRY_RUN_DIR})"
    )


def require_clean(allow_dirty: bool) -> str:
    """HEAD's commit, or exit with ``dirty_tree_message``."""
    message = dirty_tree_message(allow_dirty)
    if message:
        sys.exit(message)
    return head()


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_extra_mib(fn, device: str) -> float:
    """Extra memory one call of ``fn`` needs beyond what exists before it, in MiB: on CUDA
    torch.cuda.max_memory_allocated after reset_peak_memory_stats; on the CPU the peak resident
    set (VmHWM, reset to the current one by writing "5" to /proc/self/clear_refs) minus VmRSS,
    which is only meaningful in ``peak_extra_mib_in_fresh_process``'s setting."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def peak_extra_mib_in_fresh_process(script: str, *args: str) -> float:
    """The CPU ``peak_extra_mib`` of one call, measured by ``python script *args`` in a fresh
    process that prints it as its last line. tracemalloc does not see torch's allocations, so
    the resident set is what is measured; MALLOC_MMAP_THRESHOLD_=131072 makes every buffer above
    128 KiB its own mmap, returned to the OS when freed, so no heap reuse hides a provider's
    allocations behind an earlier one's."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(
        [sys.executable, os.path.abspath(script), *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:  # model name, then family / model and the widest SIMD: MKL's code path depends on them
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = dict(
                line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line
            )
        info = {k.strip(): v.strip() for k, v in info.items()}
        flags = info["flags"].split()
        simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        model = f"{info['model name']} (family {info['cpu family']} model {info['model']}, {simd})"
    except (OSError, KeyError):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def summarize(seconds: list[float]) -> dict:
    """Median and quartiles in ms of per-call times in seconds (at least 5, so that a median
    means something)."""
    if len(seconds) < 5:
        raise ValueError(f"need at least 5 timed calls for a median, got {len(seconds)}")
    q1, median, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
    return {"median_ms": median * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "rounds": len(seconds)}


def add_ratios(rows: list[dict], baselines: tuple[str, ...], time_key: str = "median_ms") -> None:
    """Per case, each row's speed-up (ratio of ``time_key`` values) over ``baselines[0]`` (the
    reference) and over the fastest of ``baselines`` measured in that case (< 1: slower)."""
    by_case: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["provider"]] = row
    for case, providers in by_case.items():
        if baselines[0] not in providers:
            raise ValueError(f"case {case!r}: the reference {baselines[0]!r} was not measured")
        measured = [b for b in baselines if b in providers]
        best = min(measured, key=lambda b: providers[b][time_key])
        for row in providers.values():
            row["speedup_vs_reference"] = providers[baselines[0]][time_key] / row[time_key]
            row["best_baseline"] = best
            row["speedup_vs_best_baseline"] = providers[best][time_key] / row[time_key]


def print_ratios(rows: list[dict], time_key: str = "median_ms") -> None:
    unit = time_key.rsplit("_", 1)[1]
    for r in rows:
        print(
            f"{r['case']:40s} {r['provider']:18s} {r[time_key]:10.2f} {unit}  "
            f"x{r['speedup_vs_reference']:.2f} vs reference, "
            f"x{r['speedup_vs_best_baseline']:.2f} vs {r['best_baseline']}"
        )


def write_results(
    name: str,
    device: str,
    rows: list[dict],
    *,
    sources: list[str],
    commit: str,
    allow_dirty: bool,
    baselines: tuple[str, ...] = (),
    command: str | None = None,
    time_key: str = "median_ms",
) -> str:
    """Write ``rows`` with provenance to results/<name>-<device>.json (a dry run: under
    DRY_RUN_DIR) and return the path. ``commit`` is what ``require_clean`` returned when the
    run started: a run during which HEAD moved or the tree changed is refused. ``command``:
    how the run was started (default: this script and its arguments). ``time_key``: the row
    field the ratios compare."""
    dirty = bool(uncommitted())
    if not allow_dirty and (dirty or head() != commit):
        sys.exit(f"{name}: the tree changed during the run (was {commit}); nothing written")
    if baselines:
        add_ratios(rows, baselines, time_key)
    result = {
        "benchmark": name,
        "provenance": {
            "commit": commit,
            "dirty": dirty,
            "dry_run": allow_dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device,
            "device_name": device_name(device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "threads": torch.get_num_threads(),
            "command": command
            or " ".join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
            "sources": sources,
        },
        "reference": baselines[0] if baselines else None,
        "baselines": list(baselines),
        "time_key": time_key if baselines else None,
        "rows": rows,
    }
    folder = DRY_RUN_DIR if allow_dirty else RESULTS_DIR
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}-{device}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return path


def forward_backward(fn, *inputs):
    """A callable that runs ``fn(*inputs)`` and its backward to every input, against an upstream
    gradient drawn once."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    upstream = []

    def step():
        out = fn(*leaves)
        if not upstream:
            upstream.append(torch.randn_like(out))
        return torch.autograd.grad(out, leaves, upstream[0])

    return step


def op_call(mode: str, fn, *inputs):
    """``fn(*inputs)`` as a callable to time: mode "fwd", or "fwd+bwd" (``forward_backward``)."""
    if mode == "fwd":
        return lambda: fn(*inputs)
    if mode == "fwd+bwd":
        return forward_backward(fn, *inputs)
    raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")


# The attention family (attention, cross_attention, gathered_cross_attention): BERT-base heads
# and head size (768 / 12); fp32 on the CPU, bf16 (the training / inference default) on CUDA.
HEADS, HEAD_DIM = 12, 64
ATTENTION_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def attention_cases(
    device: str, shapes: list[tuple[int, int, int]], modes=("fwd", "fwd+bwd")
) -> list[dict]:
    """Cases of (batch, q_len, k_len) ``shapes`` in each mode, mode by mode."""
    dtype = str(ATTENTION_DTYPE[device]).removeprefix("torch.")
    return [
        {
            "case": f"{mode} {batch}x{HEADS}x{q_len}x{k_len}",
            "mode": mode,
            "batch": batch,
            "heads": HEADS,
            "q_len": q_len,
            "k_len": k_len,
            "head_dim": HEAD_DIM,
            "dtype": dtype,
        }
        for mode in modes
        for batch, q_len, k_len in shapes
    ]


def attention_inputs(case: dict, device: str):
    """Random q (batch, heads, q_len, head_dim), k, v (batch, heads, k_len, head_dim)."""
    shape = (case["batch"], HEADS)
    dtype = getattr(torch, case["dtype"])
    q = torch.randn(*shape, case["q_len"], HEAD_DIM, device=device, dtype=dtype)
    k, v = (torch.randn(*shape, case["k_len"], HEAD_DIM, device=device, dtype=dtype) for _ in "kv")
    return q, k, v


def attention_flop(case: dict) -> float:
    """Matmul FLOPs: q kᵀ and p v forward; the backward recomputes p and forms dv, dp, dq, dk
    (2.5x the forward)."""
    forward = 4 * case["batch"] * HEADS * case["q_len"] * case["k_len"] * HEAD_DIM
    return forward if case["mode"] == "fwd" else 3.5 * forward
