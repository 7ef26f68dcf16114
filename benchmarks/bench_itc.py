"""ITC loss (momentum distillation + feature queues, the ``itc`` op), forward + backward: every
available backend vs the eager reference, fp32, on BLIP's queue (Q = 57600, D = 256).

    python -m pytest benchmarks/bench_itc.py [--device cuda] [--allow-dirty]

Writes benchmarks/results/itc-<device>.json (see conftest.py), with each row's peak memory.

Peak memory is the extra memory one fwd + bwd step needs beyond what exists before it: on CUDA
torch.cuda.max_memory_allocated after reset_peak_memory_stats; on the CPU (tracemalloc does not
see torch's allocations) each (provider, B) runs once in a fresh process, this file run as a
script, with MALLOC_MMAP_THRESHOLD_=131072, so every buffer above 128 KiB is its own mmap that
is returned to the OS when freed (no heap reuse hiding a provider's allocations behind an
earlier one's); the process builds the inputs, resets its peak resident set (writes "5" to
/proc/self/clear_refs), runs one step and prints VmHWM - VmRSS from /proc/self/status.
"""

import functools
import gc
import os
import subprocess
import sys

import _harness
import torch
import torch.nn.functional as F

from blip_fast.ops import available, itc_loss

SOURCES = _harness.op_sources("itc")
BASELINES = ("reference",)
BACKENDS = ("reference", "cpu", "cuda", "triton")
Q, D, ALPHA, TEMP = 57600, 256, 0.4, 0.07  # BLIP's queue, embed dim, alpha, temp init
BATCHES = {"cpu": (64, 256), "cuda": (64, 256, 1024, 4096)}


def cases(device):
    return [
        {"case": f"fwd+bwd B={b} Q={Q} D={D}", "batch": b, "queue": Q, "dim": D, "dtype": "float32"}
        for b in BATCHES[device]
    ]


def providers(device):
    return [b for b in BACKENDS if available("itc", b, device)]


def step(provider, batch, device):
    """One forward + backward of the loss (to the student features and temp) on fresh inputs."""

    def feat(*shape):
        return F.normalize(torch.randn(*shape, device=device), dim=-1)

    queues = dict(image_queue=feat(Q, D).t().contiguous(), text_queue=feat(Q, D).t().contiguous())
    loss = functools.partial(
        itc_loss,
        image_feat_m=feat(batch, D),
        text_feat_m=feat(batch, D),
        alpha=ALPHA,
        idx=torch.randint(0, 4 * batch, (batch,), device=device),
        idx_queue=torch.randint(0, 4 * batch, (1, Q), device=device),
        backend=provider,
        **queues,
    )
    temp = torch.tensor(TEMP, device=device)
    return _harness.forward_backward(
        lambda image_feat, text_feat, temp: loss(image_feat, text_feat, temp=temp),
        feat(batch, D),
        feat(batch, D),
        temp,
    )


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


def peak_extra_mib_in_fresh_process(provider, batch):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), provider, str(batch)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def test_itc(case, provider, device, measure):
    fn = step(provider, case["batch"], device)
    memory = (
        peak_extra_mib_in_fresh_process(provider, case["batch"])
        if device == "cpu"
        else peak_extra_mib(fn, device)
    )
    measure(fn, peak_extra_mib=memory)


if __name__ == "__main__":  # one CPU memory measurement: bench_itc.py PROVIDER BATCH
    print(peak_extra_mib(step(sys.argv[1], int(sys.argv[2]), "cpu"), "cpu"))
