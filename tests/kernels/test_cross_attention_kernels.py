"""Triton launchers of kernels/cross_attention.py called directly: on CPU tensors under
TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA) at small sizes, natively at BLIP's
sizes on a GPU. Outputs are pre-filled with NaN, so an element the kernel never writes fails."""

import pytest
import torch
from _utils import TOL, assert_close_verbose, assert_lowp_close

from blip_fast.kernels import cross_attention as ca_kernels
from blip_fast.ops import reference

Q_LENS = (1, 7, 35)  # a decoding step, a short caption, BLIP's retrieval text length
K_LENS = (13, 197)  # below one key tile, ViT-B at 224 px (577 once below: interpreter time)
HEAD_DIMS = (64, 40)  # BLIP's 64 and one that is not a power of two (BLOCK_D masking)
DTYPES = (torch.float32, torch.float16)  # the interpreter computes bf16 wrong (numpy has none)


def make_inputs(batch, heads, lq, lk, d, *, device="cpu", dtype=torch.float32, masked=True):
    """q, k, v, dout and a ragged key_padding_mask (row 0 unpadded, others a random prefix)."""
    q, k, v = (torch.randn(batch, heads, n, d, device=device, dtype=dtype) for n in (lq, lk, lk))
    dout = torch.randn_like(q)
    if not masked:
        return q, k, v, dout, None
    lengths = torch.randint(1, lk + 1, (batch,), device=device)
    lengths[0] = lk
    mask = torch.arange(lk, device=device)[None, :] < lengths[:, None]
    return q, k, v, dout, mask


def poisoned(*tensors):
    return tuple(torch.full(t.shape, float("nan"), device=t.device, dtype=t.dtype) for t in tensors)


def run_kernels(q, k, v, dout, mask, scale, dropout=(0.0, None)):
    """fwd + bwd through the launchers, every output buffer pre-filled with NaN; ``dropout`` =
    (p, seed)."""
    out, lse = poisoned(q, q[..., 0].float())
    out, lse = ca_kernels.cross_attention_fwd(q, k, v, mask, scale, *dropout, out=out, lse=lse)
    grads = ca_kernels.cross_attention_bwd(
        dout, q, k, v, mask, out, lse, scale, *dropout, grads=poisoned(q, k, v)
    )
    return (out, lse, *grads)


def run_reference(q, k, v, dout, mask, scale, dropout=(0.0, None)):
    out, lse = reference.cross_attention_fwd(q, k, v, mask, scale, *dropout)
    grads = reference.cross_attention_bwd(dout, q, k, v, mask, out, lse, scale, *dropout)
    return (out, lse, *grads)


NAMES = ("out", "lse", "dq", "dk", "dv")


def check_fp32(q, k, v, dout, mask):
    scale = q.shape[-1] ** -0.5
    got = run_kernels(q, k, v, dout, mask, scale)
    want = run_reference(q, k, v, dout, mask, scale)
    for name, g, w in zip(NAMES, got, want):
        assert_close_verbose(g, w, **TOL[torch.float32], name=name)


def check_low_precision(q, k, v, dout, mask, *, eps):
    """FlashAttention's rule: err(kernel, fp64) <= 2 · err(reference in the same dtype, fp64)
    + eps, max-abs errors; the reference "in the same dtype" is the plain eager attention on
    fp16 / bf16 tensors (fp16 products, fp16 softmax) and its autograd."""
    scale = q.shape[-1] ** -0.5
    got = run_kernels(q, k, v, dout, mask, scale)
    exact = run_reference(*(t.double() for t in (q, k, v, dout)), mask, scale)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    low = reference.cross_attention(*leaves, mask, scale=scale)
    low_grads = torch.autograd.grad(low, leaves, dout)
    # lse is fp32 from exactly representable fp16 inputs: only fp32 accumulation error.
    assert_close_verbose(got[1], exact[1], rtol=1e-5, atol=1e-5, name="lse")
    for name, g, w, r in zip(
        ("out", "dq", "dk", "dv"), got[:1] + got[2:], exact[:1] + exact[2:], (low, *low_grads)
    ):
        assert_lowp_close(name, g, w, r, eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("lk", K_LENS)
@pytest.mark.parametrize("lq", Q_LENS)
def test_matches_reference(lq, lk, d, dtype):
    inputs = make_inputs(2, 2, lq, lk, d, dtype=dtype)
    if dtype == torch.float32:
        check_fp32(*inputs)
    else:
        check_low_precision(*inputs, eps=1e-4)  # eps: a few fp16 ulps of values near 0.1


def test_vit_384_keys():
    check_fp32(*make_inputs(1, 2, 35, 577, 64))


def test_two_query_blocks():
    """Lq > 64: the backward adds the second query block's dk / dv onto the first's."""
    check_fp32(*make_inputs(2, 1, 70, 100, 40))


def test_no_mask():
    check_fp32(*make_inputs(2, 2, 7, 197, 64, masked=False))


def test_all_but_one_key_masked_and_strided_inputs():
    """BERT's (B, L, H, D) -> (B, H, L, D) permute gives non-contiguous q / k / v; a row with one
    kept key puts the −10000 of every other key next to one real score."""
    batch, heads, lq, lk, d = 2, 2, 7, 70, 40
    q, k, v = (torch.randn(batch, n, heads, d).transpose(1, 2) for n in (lq, lk, lk))
    dout = torch.randn(batch, heads, lq, d)
    mask = torch.ones(batch, lk, dtype=torch.bool)
    mask[1, 1:] = False
    check_fp32(q, k, v, dout, mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", (0.1, 0.6))
def test_dropout_drops_what_the_reference_drops(p, dtype):
    """Training's attention dropout inside the kernels: the forward drops what
    ``reference.dropout_keep`` drops (the same counter hash) and the backward regenerates the
    mask from the seed; p 0.6 puts the keep threshold past int32. fp16 against the fp64
    reference within fp16's tolerance (the same mask, so only rounding differs)."""
    q, k, v, dout, mask = make_inputs(2, 2, 7, 70, 40, dtype=dtype)
    dropout = (p, torch.tensor([(1 << 40) + 12345]))
    scale = q.shape[-1] ** -0.5
    got = run_kernels(q, k, v, dout, mask, scale, dropout)
    want = run_reference(*(t.double() for t in (q, k, v, dout)), mask, scale, dropout)
    undropped = run_reference(q.double(), k.double(), v.double(), dout.double(), mask, scale)
    assert not torch.allclose(want[0], undropped[0], atol=1e-3)  # the mask changes the output
    for name, g, w in zip(NAMES, got, want):
        assert not g.isnan().any(), f"{name}: NaN"
        assert_close_verbose(g, w.to(g.dtype), **TOL[dtype], name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("lk", (197, 577))
def test_gpu_matches_reference(lk, dtype):
    inputs = make_inputs(64, 12, 35, lk, 64, device="cuda", dtype=dtype)
    if dtype == torch.float32:
        check_fp32(*inputs)
        return
    scale = 64**-0.5
    got = run_kernels(*inputs, scale)
    want = run_reference(*(t.float() for t in inputs[:4]), inputs[4], scale)
    for name, g, w in zip(NAMES, got, want):
        assert_close_verbose(g.float(), w, rtol=1e-2, atol=1e-2, name=name)
    if dtype == torch.float16:
        check_low_precision(*inputs, eps=1e-4)


@pytest.mark.gpu
def test_gpu_op_autograd_matches_reference():
    from blip_fast.ops import cross_attention

    q, k, v, dout, mask = make_inputs(8, 12, 35, 577, 64, device="cuda")
    results = []
    for backend in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = cross_attention(*leaves, key_padding_mask=mask, backend=backend)
        results.append((out, *torch.autograd.grad(out, leaves, dout)))
    for name, g, w in zip(("out", "dq", "dk", "dv"), results[1], results[0]):
        assert_close_verbose(g, w, **TOL[torch.float32], name=f"triton {name}")


@pytest.mark.parametrize("with_mask", (True, False))
def test_opcheck_triton_ops(with_mask):
    """The *_triton schemas, fakes and autograd (CPU runs their reference kernels)."""
    q, k, v, dout, mask = make_inputs(2, 2, 7, 70, 40)
    mask = mask if with_mask else None
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(
        torch.ops.blip_fast.cross_attention_fwd_triton.default, (*leaves, mask, 40**-0.5)
    )
    out, lse = torch.ops.blip_fast.cross_attention_fwd_triton(q, k, v, mask, 40**-0.5)
    torch.library.opcheck(
        torch.ops.blip_fast.cross_attention_bwd_triton.default,
        (dout, q, k, v, mask, out, lse, 40**-0.5),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
