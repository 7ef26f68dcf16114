"""LM head + label-smoothed cross-entropy (the ``lm_head_loss`` op), forward + backward to the
hidden states, weight and bias: every available backend vs the reference (Linear, then
F.cross_entropy on the fp32 logits), at a BLIP caption batch: 64 captions x 35 tokens, hidden
768, BLIP's 30524-token vocabulary, label smoothing 0.1; fp32 on the CPU, bf16 on CUDA.

    python -m pytest benchmarks/bench_lm_head_loss.py [--device cuda] [--allow-dirty]

Labels: caption c gets a length drawn uniformly from 8..35 tokens and the positions after it
are padding (-100), as train/objectives.decoder_labels makes them. GFLOP/s counts the useful
matmul work of the reference's three GEMMs (logits, d_hidden, d_weight) on the non-ignored rows
only, 6 · rows_kept · V · H, for every provider.

Writes benchmarks/results/lm_head_loss-<device>.json (see conftest.py) with each row's peak
memory: the extra memory one fwd + bwd step needs beyond its inputs, on CUDA
torch.cuda.max_memory_allocated, on the CPU the peak resident set of the step in a fresh process
per provider, this file run as a script (_harness.peak_extra_mib_in_fresh_process).
"""

import sys

import _harness
import torch

from blip_fast.ops import available, lm_head_loss

SOURCES = _harness.op_sources("lm_head_loss")
BASELINES = ("reference",)
BACKENDS = ("reference", "cpu", "triton")
BATCH, TOKENS, HIDDEN, VOCAB, SMOOTHING = 64, 35, 768, 30524, 0.1
MIN_CAPTION = 8
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def make_labels(device):
    """(BATCH * TOKENS,) labels, the same in every process (their own generator)."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(MIN_CAPTION, TOKENS + 1, (BATCH, 1), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=gen)
    return labels.masked_fill(torch.arange(TOKENS) >= lengths, -100).flatten().to(device)


def cases(device):
    rows_kept = int((make_labels("cpu") != -100).sum())
    return [
        {
            "case": f"fwd+bwd {BATCH}x{TOKENS} tokens H={HIDDEN} V={VOCAB}",
            "batch": BATCH,
            "tokens": TOKENS,
            "hidden": HIDDEN,
            "vocab": VOCAB,
            "rows_kept": rows_kept,
            "dtype": str(DTYPE[device]).removeprefix("torch."),
        }
    ]


def providers(device):
    return [b for b in BACKENDS if available("lm_head_loss", b, device)]


def step(provider, device):
    """One forward + backward of the loss to hidden, weight and bias on fresh inputs."""
    labels = make_labels(device)
    dtype = DTYPE[device]
    hidden = torch.randn(BATCH * TOKENS, HIDDEN, device=device, dtype=dtype)
    weight = 0.02 * torch.randn(VOCAB, HIDDEN, device=device, dtype=dtype)  # BERT's init
    bias = torch.zeros(VOCAB, device=device, dtype=dtype)
    return _harness.forward_backward(
        lambda h, w, b: lm_head_loss(h, w, b, labels, SMOOTHING, backend=provider),
        hidden,
        weight,
        bias,
    )


def test_lm_head_loss(case, provider, device, measure):
    fn = step(provider, device)
    memory = (
        _harness.peak_extra_mib_in_fresh_process(__file__, provider)
        if device == "cpu"
        else _harness.peak_extra_mib(fn, device)
    )
    measure(fn, flop=6 * case["rows_kept"] * VOCAB * HIDDEN, peak_extra_mib=memory)


if __name__ == "__main__":  # one CPU memory measurement: bench_lm_head_loss.py PROVIDER
    print(_harness.peak_extra_mib(step(sys.argv[1], "cpu"), "cpu"))
