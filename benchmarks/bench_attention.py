"""Self-attention (the ``attention`` op), forward and forward + backward: every available backend
vs the eager reference and sdpa, all given the same key padding mask.

Shapes (batch, tokens): reranker text batches (35 tokens) and ViT-B/224's 197 tokens, the last
0-10 keys of each row padding, so every provider takes its masked path; and the caption
decoder's training at the text shape: causal, attention dropout 0.1.

    python -m pytest benchmarks/bench_attention.py [--device cuda] [--allow-dirty]

Writes benchmarks/results/attention-<device>.json (see conftest.py).
"""

import functools

import _harness
import torch

from blip_fast.ops import attention, available

SOURCES = _harness.op_sources("attention", "cross_attention") + ["blip_fast/ops/_external.py"]
BASELINES = ("reference", "sdpa")
BACKENDS = ("reference", "sdpa", "cpu", "cuda", "triton", "xformers", "flash_attn")
SHAPES = {"cpu": [(128, 35), (32, 197)], "cuda": [(512, 35), (256, 197)]}


def cases(device):
    cases = _harness.attention_cases(device, [(b, n, n) for b, n in SHAPES[device]])
    text = next(c for c in cases if c["mode"] == "fwd+bwd")
    cases.append({**text, "case": f"{text['case']} causal, dropout 0.1", "causal": True, "p": 0.1})
    if device == "cpu":  # bf16 too: the C++ kernels' bf16 products (AMX / AVX512-BF16) vs sdpa
        cases += [{**c, "case": f"{c['case']} bf16", "dtype": "bfloat16"} for c in cases]
    return cases


def providers(device):
    return [b for b in BACKENDS if available("attention", b, device)]


def test_attention(case, provider, device, measure):
    q, k, v = _harness.attention_inputs(case, device)
    batch, length = case["batch"], case["k_len"]
    lengths = torch.randint(length - 10, length + 1, (batch,), device=device)
    mask = torch.arange(length, device=device)[None, :] < lengths[:, None]  # (batch, length)
    fn = functools.partial(
        attention,
        key_padding_mask=mask,
        causal=case.get("causal", False),
        dropout_p=case.get("p", 0.0),
        backend=provider,
    )
    measure(_harness.op_call(case["mode"], fn, q, k, v), flop=_harness.attention_flop(case))
