"""Cross-attention (text queries over image tokens, the ``cross_attention`` op), forward and
forward + backward: every available backend vs the eager reference and sdpa, all given the same
key padding mask (BLIP's image mask: every token attended).

Shapes (batch of (image, text) pairs, image tokens), 35 text queries: ViT-B at 384 px (577
tokens) and at 224 px (197).

    python -m pytest benchmarks/bench_cross_attention.py [--device cuda] [--allow-dirty]

Writes benchmarks/results/cross_attention-<device>.json (see conftest.py).
"""

import functools

import _harness
import torch

from blip_fast.ops import available, cross_attention

SOURCES = _harness.op_sources("cross_attention") + ["blip_fast/ops/_external.py"]
BASELINES = ("reference", "sdpa")
BACKENDS = ("reference", "sdpa", "cpu", "cuda", "triton", "xformers", "flash_attn")
Q_LEN = 35  # BLIP's retrieval text length
SHAPES = {"cpu": [(64, 577), (64, 197)], "cuda": [(512, 577), (512, 197)]}


def cases(device):
    cases = _harness.attention_cases(device, [(b, Q_LEN, n) for b, n in SHAPES[device]])
    if device == "cpu":  # bf16 too: the C++ kernels' bf16 products (AMX / AVX512-BF16) vs sdpa
        cases += [{**c, "case": f"{c['case']} bf16", "dtype": "bfloat16"} for c in cases]
    return cases


def providers(device):
    return [b for b in BACKENDS if available("cross_attention", b, device)]


def test_cross_attention(case, provider, device, measure):
    q, k, v = _harness.attention_inputs(case, device)
    mask = torch.ones(case["batch"], case["k_len"], device=device, dtype=torch.bool)
    fn = functools.partial(cross_attention, key_padding_mask=mask, backend=provider)
    measure(_harness.op_call(case["mode"], fn, q, k, v), flop=_harness.attention_flop(case))
