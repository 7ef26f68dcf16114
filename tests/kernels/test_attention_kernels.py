"""Triton self-attention (kernels/cross_attention.py with CAUSAL) called through its launchers:
on CPU tensors under TRITON_INTERPRET=1 at small sizes, natively at BLIP's sizes on a GPU.
Bidirectional attention with a padding mask (text encoder), causal attention with Lq == Lk
(decoder training) and Lq < Lk (decoding over a KV cache, bottom-right aligned). Outputs are
pre-filled with NaN, so an element the kernels never write fails."""

import pytest
import torch
from _utils import TOL, assert_close_verbose, assert_lowp_close
from test_cross_attention_kernels import make_inputs, poisoned

from blip_fast.kernels import cross_attention as ca_kernels
from blip_fast.ops import reference

NAMES = ("out", "lse", "dq", "dk", "dv")
# (lq, lk, causal, masked): text encoder, decoder training, one decoding step and a chunk of
# them over a KV cache, a single key tile and keys spanning two tiles.
CASES = [
    (35, 35, False, True),
    (35, 35, True, False),
    (35, 35, True, True),
    (1, 13, True, True),
    (7, 70, True, True),
    (13, 13, True, True),
]
DTYPES = (torch.float32, torch.float16)  # the interpreter computes bf16 wrong (numpy has none)


def run_kernels(q, k, v, dout, mask, scale, causal):
    out, lse = poisoned(q, q[..., 0].float())
    out, lse = ca_kernels.attention_fwd(q, k, v, mask, scale, causal, out=out, lse=lse)
    grads = ca_kernels.attention_bwd(
        dout, q, k, v, mask, out, lse, scale, causal, grads=poisoned(q, k, v)
    )
    return (out, lse, *grads)


def run_reference(q, k, v, dout, mask, scale, causal):
    out, lse = reference.attention_fwd(q, k, v, mask, scale, causal)
    return (out, lse, *reference.attention_bwd(dout, q, k, v, mask, out, lse, scale, causal))


def check(inputs, causal, tol=TOL[torch.float32]):
    q = inputs[0]
    scale = q.shape[-1] ** -0.5
    got = run_kernels(*inputs, scale, causal)
    if q.dtype == torch.float32:
        for name, g, w in zip(NAMES, got, run_reference(*inputs, scale, causal)):
            assert_close_verbose(g, w, **tol, name=name)
        return
    # fp16: FlashAttention's rule, err(kernel, fp64) <= 2 · err(eager fp16 attention, fp64) + eps
    exact = run_reference(*(t.double() for t in inputs[:4]), inputs[4], scale, causal)
    leaves = [t.clone().requires_grad_() for t in inputs[:3]]
    low = reference.attention(*leaves, inputs[4], causal, scale=scale)
    low_grads = torch.autograd.grad(low, leaves, inputs[3])
    assert_close_verbose(got[1], exact[1], rtol=1e-5, atol=1e-5, name="lse")
    for name, g, w, r in zip(
        ("out", "dq", "dk", "dv"), got[:1] + got[2:], exact[:1] + exact[2:], (low, *low_grads)
    ):
        assert_lowp_close(name, g, w, r, eps=1e-4)  # eps: a few fp16 ulps of values near 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq,lk,causal,masked", CASES)
def test_matches_reference(lq, lk, causal, masked, dtype):
    check(make_inputs(2, 2, lq, lk, 40, dtype=dtype, masked=masked), causal)


def test_causal_two_query_blocks():
    """Lq > 64: two query blocks, the second sees keys the first does not."""
    check(make_inputs(1, 1, 70, 70, 64), True)


def test_causal_more_queries_than_keys():
    """Bottom-right alignment with Lq > Lk: the first rows see no key, every score is −10000
    and the softmax is the one over the raw scores, as official BERT's additive mask gives."""
    # Relaxed: those rows' scores sit near −10000, where one fp32 ulp is ~1e-3, so any other
    # summation order of q·k moves exp(s − max) by ~1e-3 relative (the reference has the same
    # rounding; neither is more exact).
    check(make_inputs(2, 1, 9, 5, 16, masked=False), True, tol=dict(rtol=2e-3, atol=2e-3))


def test_doubly_masked_key_gets_minus_10000_once():
    """Padding drops the last keys that causality drops too: −10000, not −20000."""
    q, k, v, dout, _ = make_inputs(1, 1, 6, 6, 16, masked=False)
    mask = torch.tensor([[True, True, True, True, False, False]])
    check((q, k, v, dout, mask), True)


@pytest.mark.parametrize("causal", (False, True))
def test_opcheck_triton_ops(causal):
    """attention_*_triton schemas, fakes and autograd (CPU runs their reference kernels)."""
    q, k, v, dout, mask = make_inputs(2, 2, 5, 9, 16)
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(
        torch.ops.blip_fast.attention_fwd_triton.default, (*leaves, mask, 0.25, causal)
    )
    out, lse = torch.ops.blip_fast.attention_fwd_triton(q, k, v, mask, 0.25, causal)
    torch.library.opcheck(
        torch.ops.blip_fast.attention_bwd_triton.default,
        (dout, q, k, v, mask, out, lse, 0.25, causal),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_op_autograd_matches_reference_attention():
    """The op's registered autograd (reference kernels on CPU) vs autograd through
    reference.attention, causal and padded."""
    q, k, v, dout, mask = make_inputs(2, 2, 7, 11, 16)
    grads = []
    for fn in (
        lambda *t: torch.ops.blip_fast.attention_fwd_triton(*t, mask, 0.25, True)[0],
        lambda *t: reference.attention(*t, mask, True, scale=0.25),
    ):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        grads.append((out, *torch.autograd.grad(out, leaves, dout)))
    for name, g, w in zip(("out", "dq", "dk", "dv"), *grads):
        assert_close_verbose(g, w, **TOL[torch.float32], name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize(
    "lq,lk,causal", [(35, 35, False), (35, 35, True), (1, 40, True), (197, 197, False)]
)
def test_gpu_matches_reference(lq, lk, causal, dtype):
    inputs = make_inputs(32, 12, lq, lk, 64, device="cuda", dtype=dtype)
    if dtype == torch.bfloat16:  # no fp16-style rule for bf16: 1e-2 vs the fp32 reference
        scale = 64**-0.5
        got = run_kernels(*inputs, scale, causal)
        want = run_reference(*(t.float() for t in inputs[:4]), inputs[4], scale, causal)
        for name, g, w in zip(NAMES, got, want):
            assert_close_verbose(g.float(), w, rtol=1e-2, atol=1e-2, name=name)
        return
    check(inputs, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", (False, True))
def test_gpu_public_attention_triton(causal):
    from blip_fast.ops import attention

    q, k, v, dout, mask = make_inputs(8, 12, 35, 35, 64, device="cuda")
    results = []
    for backend in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, key_padding_mask=mask, causal=causal, backend=backend)
        results.append((out, *torch.autograd.grad(out, leaves, dout)))
    for name, g, w in zip(("out", "dq", "dk", "dv"), results[1], results[0]):
        assert_close_verbose(g, w, **TOL[torch.float32], name=f"triton {name}")
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, causal=causal, dropout_p=0.1, backend="triton")


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_drops_what_the_reference_drops(causal):
    """Training's self-attention dropout (text encoder, decoder) inside the kernels: the
    reference's counter-hash mask, forward and regenerated in the backward."""
    q, k, v, dout, mask = make_inputs(2, 2, 13, 13, 40)
    scale, seed = 40**-0.5, torch.tensor([31337])
    out, lse = poisoned(q, q[..., 0].float())
    out, lse = ca_kernels.attention_fwd(q, k, v, mask, scale, causal, 0.1, seed, out=out, lse=lse)
    grads = ca_kernels.attention_bwd(
        dout, q, k, v, mask, out, lse, scale, causal, 0.1, seed, grads=poisoned(q, k, v)
    )
    want = reference.attention_fwd(q, k, v, mask, scale, causal, 0.1, seed)
    want = (*want, *reference.attention_bwd(dout, q, k, v, mask, *want, scale, causal, 0.1, seed))
    for name, g, w in zip(NAMES, (out, lse, *grads), want):
        assert_close_verbose(g, w, **TOL[torch.float32], name=name)
