"""Triton launchers of kernels/gathered_cross_attention.py called directly: on CPU tensors under
TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA) at small sizes, natively at BLIP's
sizes on a GPU, against ``reference.gathered_cross_attention_fwd`` / ``_bwd`` (per-pair copies of
K / V, each image's gradient summed over its pairs). Outputs are pre-filled with NaN, so an
element the kernels never write fails."""

import pytest
import torch
from _utils import TOL, assert_close_verbose, assert_lowp_close

from blip_fast.kernels import gathered_cross_attention as gathered_kernels
from blip_fast.ops import reference

HEADS = 2
# Image 2 read three times, 0 twice, 1 once, out of order; image 3 by no pair.
IMAGES = 4
INDEX = (2, 0, 2, 1, 0, 2)
NAMES = ("out", "lse", "dq", "dk_cache", "dv_cache")


def make_inputs(pairs, images, lq, lk, d, *, device="cpu", dtype=torch.float32):
    """q, k_cache, v_cache, dout."""
    q, dout = (torch.randn(pairs, HEADS, lq, d, device=device, dtype=dtype) for _ in "qo")
    k_cache, v_cache = (torch.randn(images, HEADS, lk, d, device=device, dtype=dtype) for _ in "kv")
    return q, k_cache, v_cache, dout


def poisoned(*tensors):
    return tuple(torch.full(t.shape, float("nan"), device=t.device, dtype=t.dtype) for t in tensors)


def run_kernels(q, k_cache, v_cache, dout, index, dropout=(0.0, None)):
    """fwd + bwd through the launchers, every output buffer pre-filled with NaN; ``dropout`` =
    (p, seed)."""
    scale = q.shape[-1] ** -0.5
    out, lse = poisoned(q, q[..., 0].float())
    out, lse = gathered_kernels.gathered_cross_attention_fwd(
        q, k_cache, v_cache, index, scale, *dropout, out=out, lse=lse
    )
    grads = gathered_kernels.gathered_cross_attention_bwd(
        dout,
        q,
        k_cache,
        v_cache,
        index,
        out,
        lse,
        scale,
        *dropout,
        grads=poisoned(q, k_cache, v_cache),
    )
    return (out, lse, *grads)


def run_reference(q, k_cache, v_cache, dout, index, dropout=(0.0, None)):
    scale = q.shape[-1] ** -0.5
    out, lse = reference.gathered_cross_attention_fwd(q, k_cache, v_cache, index, scale, *dropout)
    grads = reference.gathered_cross_attention_bwd(
        dout, q, k_cache, v_cache, index, out, lse, scale, *dropout
    )
    return (out, lse, *grads)


def run_eager_autograd(q, k_cache, v_cache, dout, index):
    """out and autograd gradients of the plain eager attention in the inputs' dtype (fp16
    products and softmax): the error floor of the low-precision rule."""
    leaves = [t.clone().requires_grad_() for t in (q, k_cache, v_cache)]
    out = reference.gathered_cross_attention(*leaves, index, scale=q.shape[-1] ** -0.5)
    return (out, *torch.autograd.grad(out, leaves, dout))


def check(q, k_cache, v_cache, dout, index):
    got = run_kernels(q, k_cache, v_cache, dout, index)
    for name, g in zip(NAMES, got):
        assert not g.isnan().any(), f"{name}: NaN (an element left unwritten)"
    unread = sorted(set(range(k_cache.shape[0])) - set(index.tolist()))
    for name, g in zip(NAMES[3:], got[3:]):
        assert torch.equal(g[unread], torch.zeros_like(g[unread])), f"{name} of unread images"
    if q.dtype == torch.float32:
        want = run_reference(q, k_cache, v_cache, dout, index)
        for name, g, w in zip(NAMES, got, want):
            assert_close_verbose(g, w, **TOL[torch.float32], name=name)
        return
    # FlashAttention's rule: err vs fp64 <= 2 · err(reference in the same dtype) + eps, eps a
    # few fp16 ulps of values near 0.1; lse is fp32 from exactly representable inputs.
    exact = run_reference(*(t.double() for t in (q, k_cache, v_cache, dout)), index)
    low = run_eager_autograd(q, k_cache, v_cache, dout, index)
    assert_close_verbose(got[1], exact[1], rtol=1e-5, atol=1e-5, name="lse")
    for name, g, w, r in zip(NAMES[:1] + NAMES[2:], got[:1] + got[2:], exact[:1] + exact[2:], low):
        assert_lowp_close(name, g, w, r, eps=1e-4)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("lq, lk, d", [(35, 197, 64), (7, 13, 40), (1, 70, 64)])
def test_matches_reference(lq, lk, d, dtype):
    """Repeated, out-of-order and unread images; lengths off the block sizes, head_dim 40."""
    inputs = make_inputs(len(INDEX), IMAGES, lq, lk, d, dtype=dtype)
    check(*inputs, torch.tensor(INDEX))


def test_two_query_blocks():
    """Lq > 64: an image's dk / dv add each pair's second query block onto the first's."""
    check(*make_inputs(3, 2, 70, 30, 40), torch.tensor([1, 1, 0]))


def test_strided_caches_and_one_image():
    """Caches as slices of a larger buffer (a per-layer view of a stacked cache) and every pair
    on the same image."""
    q, _, _, dout = make_inputs(3, 1, 7, 13, 40)
    stacked = torch.randn(2, 4, HEADS, 13, 40)  # (kv, images, H, Lk, D)
    check(q, stacked[0, 1:2], stacked[1, 1:2], dout, torch.zeros(3, dtype=torch.long))


def test_no_pairs_gives_zero_cache_gradients():
    q, k_cache, v_cache, dout = make_inputs(0, 3, 7, 13, 40)
    check(q, k_cache, v_cache, dout, torch.zeros(0, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_gpu_matches_reference(dtype):
    """Training's ITM pass: 3 pairs per image at BLIP's 35 text tokens over ViT-B/384 tokens."""
    inputs = make_inputs(96, 33, 35, 577, 64, device="cuda", dtype=dtype)
    index = torch.randint(0, 32, (96,), device="cuda")  # image 32 unread
    if dtype != torch.bfloat16:
        check(*inputs, index)
        return
    got = run_kernels(*inputs, index)
    want = run_reference(*(t.float() for t in inputs), index)
    for name, g, w in zip(NAMES, got, want):
        assert_close_verbose(g.float(), w, **TOL[dtype], name=name)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_dropout_drops_what_the_reference_drops(dtype):
    """Training's ITM / LM rows with attention dropout: pair p's elements are counted as row p
    of (P, H, Lq, Lk), as the reference's per-pair copies count them, forward and backward."""
    q, k_cache, v_cache, dout = make_inputs(len(INDEX), IMAGES, 7, 70, 40, dtype=dtype)
    index = torch.tensor(INDEX)
    dropout = (0.1, torch.tensor([987654321987]))
    got = run_kernels(q, k_cache, v_cache, dout, index, dropout)
    want = run_reference(*(t.double() for t in (q, k_cache, v_cache, dout)), index, dropout)
    for name, g, w in zip(NAMES, got, want):
        assert not g.isnan().any(), f"{name}: NaN"
        assert_close_verbose(g, w.to(g.dtype), **TOL[dtype], name=name)
