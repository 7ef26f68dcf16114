"""Gathered cross-attention (the ``gathered_cross_attention`` op): pairs read their image's
cached K / V by index, in ITM reranking (forward) and in training, where the ITM / LM rows read
K / V projected once per image (forward + backward, dK / dV summed per image). Every available
backend vs the eager reference and stock PyTorch's way, copying each pair's K / V
(``k_cache[index]``) then sdpa.

Shapes (pairs, images, image tokens), 35 text queries: a reranking batch whose candidates come
from fewer images, each image's K / V cached once.

    python -m pytest benchmarks/bench_gathered_cross_attention.py [--device cuda] [--allow-dirty]

Writes benchmarks/results/gathered_cross_attention-<device>.json (see conftest.py).
"""

import _harness
import torch
import torch.nn.functional as F

from blip_fast.ops import available, gathered_cross_attention

SOURCES = _harness.op_sources("gathered_cross_attention", "cross_attention")
BASELINES = ("reference", "copy+sdpa")
BACKENDS = ("reference", "cpu", "cuda", "triton")
Q_LEN = 35  # BLIP's retrieval text length
SHAPES = {"cpu": [(64, 16, 577)], "cuda": [(512, 64, 577), (512, 64, 197)]}


def cases(device):
    shapes = SHAPES[device]
    images = {p: n for p, n, _ in shapes}
    both = _harness.attention_cases(device, [(p, Q_LEN, k) for p, _, k in shapes])
    cases = [
        {**case, "case": f"{case['case']} ({images[case['batch']]} images)"}
        | {"images": images[case["batch"]]}
        for case in both
    ]
    if device == "cpu":  # bf16 forward too: the C++ kernels' bf16 products (AMX / AVX512-BF16)
        cases += [
            {**c, "case": f"{c['case']} bf16", "dtype": "bfloat16"}
            for c in cases
            if c["mode"] == "fwd"
        ]
    return cases


def providers(device):
    fused = [b for b in BACKENDS if available("gathered_cross_attention", b, device)]
    return ["copy+sdpa", *fused]


def test_gathered_cross_attention(case, provider, device, measure):
    q, _, _ = _harness.attention_inputs(case, device)
    k_cache, v_cache = _harness.attention_inputs({**case, "batch": case["images"]}, device)[1:]
    index = torch.randint(0, case["images"], (case["batch"],), device=device)

    def fn(q, k_cache, v_cache):
        if provider == "copy+sdpa":
            return F.scaled_dot_product_attention(q, k_cache[index], v_cache[index])
        return gathered_cross_attention(q, k_cache, v_cache, index, backend=provider)

    call = _harness.op_call(case["mode"], fn, q, k_cache, v_cache)
    if case["mode"] == "fwd":
        call = torch.no_grad()(call)
    measure(call, flop=_harness.attention_flop(case))
