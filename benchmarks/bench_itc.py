"""ITC loss (momentum distillation + feature queues, the ``itc`` op), forward + backward: every
available backend vs the eager reference, fp32, on BLIP's queue (Q = 57600, D = 256).

    python -m pytest benchmarks/bench_itc.py [--device cuda] [--allow-dirty]

Writes benchmarks/results/itc-<device>.json (see conftest.py), with each row's peak memory.

Peak memory is the extra memory one fwd + bwd step needs beyond what exists before it: on CUDA
torch.cuda.max_memory_allocated after reset_peak_memory_stats; on the CPU (tracemalloc does not
see torch's allocations) each (provider, B) runs once in a fresh process, this file run as a
script, which builds the inputs and measures the peak resident set of one step
(_harness.peak_extra_mib_in_fresh_process).
"""

import functools
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


def test_itc(case, provider, device, measure):
    fn = step(provider, case["batch"], device)
    memory = (
        _harness.peak_extra_mib_in_fresh_process(__file__, provider, str(case["batch"]))
        if device == "cpu"
        else _harness.peak_extra_mib(fn, device)
    )
    measure(fn, peak_extra_mib=memory)


if __name__ == "__main__":  # one CPU memory measurement: bench_itc.py PROVIDER BATCH
    print(_harness.peak_extra_mib(step(sys.argv[1], int(sys.argv[2]), "cpu"), "cpu"))
