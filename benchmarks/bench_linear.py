"""Inference linear layers (the ``linear`` op): ``F.linear`` (the reference: MKL's SGEMM in torch's
x86 CPU wheels) vs ``PackedLinear`` (oneDNN, weight prepacked once), no grad, on the GEMM shapes
of ITM reranking: 128 pairs x 23 text tokens through the text layers of ``blip_small_demo``
(hidden 256, FFN 1024) and of BERT-base (768, 3072).

fp32, and on a CPU with native bf16 (AMX or AVX512-BF16) bf16 too: ``F.linear bf16`` (bf16
input and weight, what autocast runs, a baseline) and ``onednn bf16`` (``PackedLinear`` under
bf16 autocast). ``F.linear bf16``'s ratio to the reference is this machine's own bf16 / fp32
GEMM ratio, the ceiling of a bf16 evaluation.

A CPU benchmark: on CUDA both would be cuBLAS, so it has no CUDA cases.

    python -m pytest benchmarks/bench_linear.py [--allow-dirty]

Writes benchmarks/results/linear-cpu.json (see conftest.py).
"""

import _harness
import torch
from torch import nn

from blip_fast.ops import PackedLinear, available
from blip_fast.ops.linear import native_bf16

SOURCES = _harness.op_sources("linear")
BASELINES = ("reference", "F.linear bf16")
ROWS = 128 * 23  # the reranker's batch of 128 pairs x 23 tokens (synthetic captions)
# (in_features, out_features, activation): attention / cross-attention projections, FFN up
# (its GELU fused into the packed GEMM) and FFN down; "residual": FFN down + the residual sum,
# inside the packed GEMM (BertOutput of an inference copy), after F.linear.
LAYERS = {
    "blip_small_demo": [(256, 256, None), (256, 1024, "gelu"), (1024, 256, None)],
    "bert_base": [(768, 768, None), (768, 3072, "gelu"), (3072, 768, None)]
    + [(3072, 768, "residual")],
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
    if not available("linear", "onednn", device):
        return ["reference"]
    return ["reference", "onednn", *(["F.linear bf16", "onednn bf16"] if native_bf16() else [])]


def test_linear(case, provider, measure):
    linear = nn.Linear(case["in_features"], case["out_features"])
    x = torch.randn(case["rows"], case["in_features"])
    bf16 = provider.endswith("bf16")
    act = case["activation"]
    # the residual in the GEMM's dtype, as the reranker's all-bf16 copy holds it
    residual = torch.randn(case["rows"], case["out_features"])
    residual = residual.bfloat16() if bf16 else residual
    if provider.startswith("onednn"):
        packed = PackedLinear(linear, "gelu" if act == "gelu" else None)
        layer = (lambda t: packed(t, residual=residual)) if act == "residual" else packed
    else:
        if bf16:
            linear, x = linear.bfloat16(), x.bfloat16()
        layer = {
            "gelu": nn.Sequential(linear, nn.GELU()),
            "residual": lambda t: linear(t) + residual,
        }.get(act, linear)

    @torch.no_grad()
    @torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    def fn():
        return layer(x)

    measure(
        fn,
        flop=2 * case["rows"] * case["in_features"] * case["out_features"],
        dtype="bf16" if bf16 else "fp32",
    )
