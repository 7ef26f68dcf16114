"""Inference linear layers (the ``linear`` op): ``F.linear`` (the reference: MKL's SGEMM in torch's
x86 CPU wheels) vs ``PackedLinear`` (oneDNN, weight prepacked once), fp32, no grad, on the GEMM
shapes of ITM reranking: 128 pairs x 23 text tokens through the text layers of
``blip_small_demo`` (hidden 256, FFN 1024) and of BERT-base (768, 3072).

A CPU benchmark: on CUDA both would be cuBLAS, so it has no CUDA cases.

    python -m pytest benchmarks/bench_linear.py [--allow-dirty]

Writes benchmarks/results/linear-cpu.json (see conftest.py).
"""

import _harness
import torch
from torch import nn

from blip_fast.ops import PackedLinear, available

SOURCES = _harness.op_sources("linear")
BASELINES = ("reference",)
ROWS = 128 * 23  # the reranker's batch of 128 pairs x 23 tokens (synthetic captions)
# (in_features, out_features, activation): attention / cross-attention projections, FFN up
# (its GELU fused into the packed GEMM) and FFN down.
LAYERS = {
    "blip_small_demo": [(256, 256, None), (256, 1024, "gelu"), (1024, 256, None)],
    "bert_base": [(768, 768, None), (768, 3072, "gelu"), (3072, 768, None)],
}


def cases(device):
    if device != "cpu":
        return []
    return [
        {
            "case": f"{model} {ROWS}x{n_in}->{n_out}" + (f" +{act}" if act else ""),
            "rows": ROWS,
            "in_features": n_in,
            "out_features": n_out,
            "activation": act,
        }
        for model, layers in LAYERS.items()
        for n_in, n_out, act in layers
    ]


def providers(device):
    return ["reference", *(["onednn"] if available("linear", "onednn", device) else [])]


def test_linear(case, provider, measure):
    linear = nn.Linear(case["in_features"], case["out_features"])
    x = torch.randn(case["rows"], case["in_features"])
    if provider == "onednn":
        layer = PackedLinear(linear, case["activation"])
    elif case["activation"] == "gelu":
        layer = nn.Sequential(linear, nn.GELU())
    else:
        layer = linear

    @torch.no_grad()
    def fn():
        return layer(x)

    measure(fn, flop=2 * case["rows"] * case["in_features"] * case["out_features"])
