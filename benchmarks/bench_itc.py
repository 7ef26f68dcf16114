"""ITC loss (momentum distillation + feature queues): every available backend vs the reference,
forward + backward, on BLIP's queue (Q = 57600, D = 256) for B in {64, 256, 1024, 4096}.

    python benchmarks/bench_itc.py            # all batch sizes this machine can hold
    python benchmarks/bench_itc.py --quick    # B in {64, 256}, one timing round

Writes benchmarks/results/itc-<device>.json (+ .png). Speed-up = reference time / time.

Peak memory is the extra memory one fwd + bwd step needs beyond what exists before it:
on CUDA torch.cuda.max_memory_allocated after reset_peak_memory_stats; on CPU (tracemalloc
does not see torch's allocations) each (provider, B) runs once in a fresh subprocess with
MALLOC_MMAP_THRESHOLD_=131072, so every buffer above 128 KiB is its own mmap that is returned
to the OS when freed (no heap reuse hiding a provider's allocations behind an earlier one's);
the subprocess builds the inputs, resets its peak resident set (writes "5" to
/proc/self/clear_refs), runs one step and reports VmHWM − VmRSS from /proc/self/status.
"""

import argparse
import gc
import os
import subprocess
import sys
import time

import _harness  # benchmarks/ is on sys.path when this file runs as a script
import torch
import torch.nn.functional as F

from blip_fast.ops import _backend, itc_loss

BACKENDS = ("reference", "cpu", "cuda", "triton")
Q, D, ALPHA, TEMP = 57600, 256, 0.4, 0.07  # BLIP's queue, embed dim, alpha, temp init
BATCHES = (64, 256, 1024, 4096)
QUICK_BATCHES = (64, 256)
# On CPU a provider is skipped at a batch size where its extrapolated step time (linear in B
# from the previous batch size) exceeds this, in seconds.
MAX_STEP_S = 60.0


def make_case(B, device, dtype):
    def feat(*shape):
        return F.normalize(torch.randn(*shape, device=device, dtype=dtype), dim=-1)

    return dict(
        image_feat=feat(B, D),
        text_feat=feat(B, D),
        image_feat_m=feat(B, D),
        text_feat_m=feat(B, D),
        image_queue=feat(Q, D).t().contiguous(),
        text_queue=feat(Q, D).t().contiguous(),
        temp=torch.tensor(TEMP, device=device, dtype=dtype),
        idx=torch.randint(0, 4 * B, (B,), device=device),
        idx_queue=torch.randint(0, 4 * B, (1, Q), device=device),
    )


def step_fn(backend, inputs):
    leaves = [
        inputs[k].detach().clone().requires_grad_() for k in ("image_feat", "text_feat", "temp")
    ]
    rest = {k: v for k, v in inputs.items() if k not in ("image_feat", "text_feat", "temp")}

    def step():
        loss = itc_loss(leaves[0], leaves[1], temp=leaves[2], alpha=ALPHA, backend=backend, **rest)
        return torch.autograd.grad(loss, leaves)

    return step


def _status_kib(field):
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_extra_mib(fn, device):
    """Extra memory of one call of fn beyond what was resident before it (see module doc)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def peak_extra_mib_subprocess(backend, B):
    """peak_extra_mib of one step in a fresh CPU process (see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--memory-of", backend, str(B)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--memory-of", nargs=2, metavar=("BACKEND", "B"), help=argparse.SUPPRESS
    )  # internal: one CPU memory measurement
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="B in {64, 256}, one round")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per CPU timing")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case")
    args = parser.parse_args()
    device = args.device
    if args.memory_of:
        backend, B = args.memory_of[0], int(args.memory_of[1])
        print(peak_extra_mib(step_fn(backend, make_case(B, "cpu", torch.float32)), "cpu"))
        return
    dtype = torch.float32
    rounds = args.rounds or (1 if args.quick or device == "cpu" else 3)
    backends = [b for b in BACKENDS if _backend.available("itc", b, device)]
    batches = QUICK_BATCHES if args.quick else BATCHES
    print(f"{_harness.device_name(device)}; torch {torch.__version__}; backends {backends}")

    rows, last_s, prev_b = [], {}, None
    for B in batches:
        inputs = make_case(B, device, dtype)
        case = f"fwd+bwd B={B} Q={Q} D={D}"
        fns = {}
        for backend in backends:
            if device == "cpu" and backend in last_s and last_s[backend] * B / prev_b > MAX_STEP_S:
                print(f"{case}: skipping {backend} (extrapolated > {MAX_STEP_S:.0f} s per step)")
                continue
            fns[backend] = step_fn(backend, inputs)
        mem = {
            backend: (
                peak_extra_mib_subprocess(backend, B)
                if device == "cpu"
                else peak_extra_mib(fn, device)
            )
            for backend, fn in fns.items()
        }
        best = {}
        for _ in range(rounds):  # providers take turns, each keeps its fastest round
            for backend, fn in fns.items():
                t0 = time.perf_counter()
                timing = _harness.time_ms(fn, device, args.min_run_time)
                last_s[backend] = (time.perf_counter() - t0) / 2  # warm-up + >= 1 timed call
                if backend not in best or timing["median_ms"] < best[backend]["median_ms"]:
                    best[backend] = timing
        prev_b = B
        ref = best.get("reference")
        for backend, timing in best.items():
            row = {
                "case": case,
                "mode": "fwd+bwd",
                "provider": backend,
                "batch": B,
                "queue": Q,
                "dim": D,
                "dtype": str(dtype).removeprefix("torch."),
                **timing,
                "peak_extra_mib": mem[backend],
                "speedup_vs_reference": ref["median_ms"] / timing["median_ms"] if ref else None,
                "memory_vs_reference": mem[backend] / mem["reference"] if ref else None,
            }
            rows.append(row)
            ratio = (
                f"x{row['speedup_vs_reference']:.2f} vs reference, memory "
                f"{100 * row['memory_vs_reference']:.1f}% of reference"
                if ref
                else ""
            )
            print(
                f"{case:30s} {backend:10s} {timing['median_ms']:10.1f} ms "
                f"(p20 {timing['p20_ms']:.1f}, p80 {timing['p80_ms']:.1f})  "
                f"peak +{mem[backend]:8.1f} MiB  {ratio}",
                flush=True,
            )
        del inputs, fns
    name = "itc-quick" if args.quick else "itc"
    print("wrote", _harness.write_results(name, device, rows, plot=not args.no_plot))


if __name__ == "__main__":
    main()
