"""Triton launcher of kernels/gathered_cross_attention.py called directly: on CPU tensors under
TRITON_INTERPRET=1 at small sizes, natively at BLIP's reranking size on a GPU. The output is
pre-filled with NaN, so an element the kernel never writes fails."""

import pytest
import torch
from _utils import TOL, assert_close_verbose, assert_lowp_close

from blip_fast.kernels import gathered_cross_attention as gathered_kernels
from blip_fast.ops import reference

HEADS = 2


def make_inputs(pairs, images, lq, lk, d, *, device="cpu", dtype=torch.float32):
    q = torch.randn(pairs, HEADS, lq, d, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(images, HEADS, lk, d, device=device, dtype=dtype) for _ in "kv")
    return q, k_cache, v_cache


def run(q, k_cache, v_cache, index):
    out = torch.full(q.shape, float("nan"), device=q.device, dtype=q.dtype)
    return gathered_kernels.gathered_cross_attention_fwd(
        q, k_cache, v_cache, index, q.shape[-1] ** -0.5, out=out
    )


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("lq, lk, d", [(35, 197, 64), (7, 13, 40), (1, 70, 64)])
def test_matches_reference(lq, lk, d, dtype):
    q, k_cache, v_cache = make_inputs(5, 3, lq, lk, d, dtype=dtype)
    index = torch.tensor([2, 0, 2, 1, 0])  # repeated and out of order
    got = run(q, k_cache, v_cache, index)
    if dtype == torch.float32:
        expected = reference.gathered_cross_attention(q, k_cache, v_cache, index)
        assert_close_verbose(got, expected, **TOL[torch.float32], name="out")
        return
    # FlashAttention's rule: err vs fp64 <= 2 · err(reference in fp16) + eps (a few fp16 ulps)
    exact = reference.gathered_cross_attention(
        q.double(), k_cache.double(), v_cache.double(), index
    )
    low = reference.gathered_cross_attention(q, k_cache, v_cache, index)
    assert got.dtype == dtype
    assert_lowp_close("out", got, exact, low, eps=1e-4)


def test_strided_caches_and_one_image():
    """Caches as slices of a larger buffer (a per-layer view of a stacked cache) and every pair
    on the same image."""
    q = torch.randn(3, HEADS, 7, 40)
    stacked = torch.randn(2, 4, HEADS, 13, 40)  # (kv, images, H, Lk, D)
    k_cache, v_cache = stacked[0, 1:2], stacked[1, 1:2]
    index = torch.zeros(3, dtype=torch.long)
    assert_close_verbose(
        run(q, k_cache, v_cache, index),
        reference.gathered_cross_attention(q, k_cache, v_cache, index),
        **TOL[torch.float32],
        name="out",
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_gpu_matches_reference(dtype):
    q, k_cache, v_cache = make_inputs(512, 128, 35, 577, 64, device="cuda", dtype=dtype)
    index = torch.randint(0, 128, (512,), device="cuda")
    got = run(q, k_cache, v_cache, index)
    expected = reference.gathered_cross_attention(
        q.float(), k_cache.float(), v_cache.float(), index
    )
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_close_verbose(got.float(), expected, **tol, name="out")
