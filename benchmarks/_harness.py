"""Shared benchmark harness: one timer per device kind and self-describing result files.

Timing: ``torch.utils.benchmark.Timer`` on CPU (adaptive repeat count, torch's thread setting),
``triton.testing.do_bench`` on CUDA (L2 flushed between runs). Results go to
``benchmarks/results/<name>-<device>.json`` with the device name, torch / CUDA versions, git
commit and date, plus an optional PNG bar chart next to it.
"""

import datetime
import json
import os
import platform
import statistics
import subprocess

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_ms(fn, device: str, min_run_time: float = 1.0) -> dict:
    """Median and 20th / 80th percentile wall time of ``fn()`` in milliseconds."""
    if device == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
    from torch.utils.benchmark import Timer

    fn()  # warm-up: first-call allocations and lazy initialisation stay out of the numbers
    measurement = Timer(
        "fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
    ).blocked_autorange(min_run_time=min_run_time)
    times = [t * 1e3 for t in measurement.times]
    median = statistics.median(times)
    if len(times) < 2:  # one block of a slow function: no spread to report
        return {"median_ms": median, "p20_ms": median, "p80_ms": median}
    quintiles = statistics.quantiles(times, n=5)
    return {"median_ms": median, "p20_ms": quintiles[0], "p80_ms": quintiles[3]}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:  # model name, then family / model and the widest SIMD: MKL's code path depends on them
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = dict(
                line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line
            )
        info = {k.strip(): v.strip() for k, v in info.items()}
        simd = (
            "AVX-512"
            if "avx512f" in info["flags"].split()
            else "AVX2"
            if "avx2" in info["flags"].split()
            else "no AVX2"
        )
        model = f"{info['model name']} (family {info['cpu family']} model {info['model']}, {simd})"
    except (OSError, KeyError):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def git_commit() -> str | None:
    """HEAD of the checkout the benchmark runs from, with "-dirty" for uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def metadata(device: str) -> dict:
    return {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(name: str, device: str, rows: list[dict], plot: bool = True) -> str:
    """Write ``rows`` (one dict per measurement, each with ``case``, ``provider`` and
    ``median_ms``) to results/<name>-<device>.json, and a PNG chart when matplotlib is there."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}-{device}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"meta": metadata(device), "rows": rows}, f, indent=1)
        f.write("\n")
    if plot:
        _plot(path[: -len(".json")] + ".png", name, device, rows)
    return path


def _plot(path: str, name: str, device: str, rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return
    cases = list(dict.fromkeys(r["case"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    ms = {(r["case"], r["provider"]): r["median_ms"] for r in rows}
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cases)), 4.5))
    for i, provider in enumerate(providers):
        xs = [c + i * width for c in range(len(cases))]
        ax.bar(xs, [ms.get((case, provider), 0.0) for case in cases], width, label=provider)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("median time (ms), lower is better")
    ax.set_title(f"{name} on {device_name(device)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
