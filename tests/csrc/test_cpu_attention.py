"""blip_fast::attention_fwd / _bwd on the CPU: the C++ cross-attention kernels with their causal
mask (the decoder's self-attention), against the reference oracle: square and KV-cache shapes
across tile edges, padding, dropout, low precision and the bf16 products."""

import pytest
import torch
from _utils import TOL, assert_close_verbose

from blip_fast.ops import reference

pytestmark = pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("blip_fast::attention_fwd", "CPU"),
    reason="blip_fast._C not built",
)

fwd = torch.ops.blip_fast.attention_fwd
bwd = torch.ops.blip_fast.attention_bwd
SEED = torch.tensor([1234567], dtype=torch.int64)


def make_inputs(b, h, lq, lk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for n in (lq, lk, lk))
    lengths = torch.randint(1, lk + 1, (b,), generator=g)
    mask = torch.arange(lk)[None, :] < lengths[:, None]
    return q, k, v, mask


def check(q, k, v, mask, causal, tol, p=0.0):
    """Forward and backward of the C++ op vs the reference on wide copies of the inputs."""
    scale = q.shape[-1] ** -0.5
    seed = SEED if p > 0 else None
    out, lse = fwd(q, k, v, mask, scale, causal, p, seed)
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    qw, kw, vw = (t.to(wide) for t in (q, k, v))
    ref_out, ref_lse = reference.attention_fwd(qw, kw, vw, mask, scale, causal, p, seed)
    assert_close_verbose(out, ref_out, **tol, name="out")
    assert_close_verbose(lse, ref_lse, **tol, name="lse")
    dout = torch.randn_like(out)
    grads = bwd(dout, q, k, v, mask, out, lse, scale, causal, p, seed)
    ref_grads = reference.attention_bwd(
        dout.to(wide), qw, kw, vw, mask, ref_out, ref_lse, scale, causal, p, seed
    )
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert bool(torch.isfinite(grad).all()), f"{name} has NaN / inf"
        assert_close_verbose(grad, ref, **tol, name=name)
    return out


# (B, H, Lq, Lk, D): caption lengths; one past a 64-query / 64-key tile and the 16-wide vectors;
# three tiles each way; decoding over a KV cache (Lq < Lk, one query, several).
SHAPES = [
    (3, 4, 35, 35, 64),
    (1, 2, 65, 65, 17),
    (1, 1, 150, 150, 40),
    (2, 3, 1, 70, 64),
    (2, 3, 5, 40, 64),
]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_causal_matches_reference(shape, masked, dtype):
    q, k, v, mask = make_inputs(*shape, dtype)
    mask = mask if masked else None
    out = check(q, k, v, mask, True, TOL[dtype])
    if mask is None and shape[2] > 1:  # the causal mask is on: the non-causal result differs
        assert not torch.allclose(out, fwd(q, k, v, mask, shape[-1] ** -0.5, False)[0])


def test_queries_that_see_no_key_attend_to_all():
    """Lq > Lk: the first queries see no key, so every key gets official BERT's -10000 and they
    attend to all keys as if unmasked (-inf would give NaN). fp64 forward only: a score near
    -10000 keeps 3 decimals in fp32, and the lse the backward reads is stored in fp32."""
    q, k, v, _ = make_inputs(2, 2, 9, 4, 16, torch.float64)
    out = fwd(q, k, v, None, 0.25, True)[0]
    ref = reference.attention(q, k, v, None, causal=True, scale=0.25)
    assert_close_verbose(out, ref, **TOL[torch.float64], name="out")
    unmasked = reference.attention(q, k, v, None, scale=0.25)
    assert_close_verbose(out[:, :, :5], unmasked[:, :, :5], **TOL[torch.float64], name="blind")


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_causal_low_precision_within_1e_2(dtype):
    check(*make_inputs(2, 3, 35, 35, 64, dtype), True, TOL[dtype])


@pytest.mark.parametrize("shape", [(2, 3, 35, 35, 64), (1, 2, 65, 65, 17), (2, 2, 5, 40, 16)])
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_causal_dropout_drops_what_the_reference_drops(shape, dtype):
    q, k, v, mask = make_inputs(*shape, dtype)
    out = check(q, k, v, mask, True, TOL[dtype], p=0.1)
    assert not torch.allclose(out, fwd(q, k, v, mask, shape[-1] ** -0.5, True)[0], atol=1e-3)


# The bf16 forward on the CPU's bf16 instructions: each cap (AMX, AVX512-BF16, none) masks the
# future too.
@pytest.mark.parametrize("products", ("amx", "avx512_bf16", "fp32"))
@pytest.mark.parametrize("shape", [(2, 3, 35, 35, 64), (1, 2, 65, 65, 40), (2, 2, 5, 40, 40)])
def test_causal_bf16_products_match_reference(monkeypatch, products, shape):
    monkeypatch.setenv("BLIP_FAST_CPU_BF16_PRODUCTS", products)
    q, k, v, mask = make_inputs(*shape, torch.bfloat16)
    scale = shape[-1] ** -0.5
    out, lse = fwd(q, k, v, mask, scale, True)
    ref_out, ref_lse = reference.attention_fwd(q.float(), k.float(), v.float(), mask, scale, True)
    assert_close_verbose(out, ref_out, **TOL[torch.bfloat16], name="out")
    assert_close_verbose(lse, ref_lse, **TOL[torch.bfloat16], name="lse")


def test_a_query_depends_on_no_later_key():
    """Changing the last key and value changes only the last query's output and only its
    gradient reaches them."""
    q, k, v, _ = make_inputs(2, 2, 20, 20, 16, torch.float32)
    out = fwd(q, k, v, None, 0.25, True)[0]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 1.0
    v2[:, :, -1] -= 1.0
    out2 = fwd(q, k2, v2, None, 0.25, True)[0]
    assert torch.equal(out[:, :, :-1], out2[:, :, :-1])
    assert not torch.allclose(out[:, :, -1], out2[:, :, -1])
    dout = torch.zeros_like(out)
    dout[:, :, :-1] = torch.randn_like(out[:, :, :-1])
    _, dk, dv = bwd(dout, q, k, v, None, *fwd(q, k, v, None, 0.25, True), 0.25, True)
    assert torch.equal(dk[:, :, -1], torch.zeros_like(dk[:, :, -1]))
    assert torch.equal(dv[:, :, -1], torch.zeros_like(dv[:, :, -1]))
