"""blip_fast.ops.attention (ViT / text self-attention, the decoder's causal one): every
available CPU backend vs the reference, forward and gradients, and which kernel runs."""

import pytest
import torch
from _utils import TOL, OpsSeen, assert_close_verbose

from blip_fast.ops import _backend, attention, reference

# the backends compared with the reference (sdpa is always there)
CPU_BACKENDS = [b for b in ("sdpa", "cpu") if _backend.available("attention", b, "cpu")]
# (batch, heads, length, head_dim): the ITM reranker's text (23 tokens), the demo ViT (65),
# ViT-B/224 (197: several query tiles of the C++ kernel), and odd sizes.
SHAPES = [(3, 4, 23, 64), (2, 2, 65, 64), (1, 3, 197, 64), (2, 3, 7, 40)]
needs_cpu_kernel = pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="blip_fast._C not built")


def make_inputs(b, h, length, d, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g) for _ in "qkv")
    mask = None
    if masked:  # each row keeps a different prefix, as padded captions do
        lengths = torch.randint(1, length + 1, (b,), generator=g)
        mask = torch.arange(length)[None, :] < lengths[:, None]
    return q, k, v, mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_backends_match_reference_forward_and_grads(shape, masked, causal):
    q, k, v, mask = make_inputs(*shape, masked)
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    reference.attention(*leaves, mask, causal).backward(dout)
    want = [reference.attention(q, k, v, mask, causal)] + [t.grad for t in leaves]
    for backend in CPU_BACKENDS:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, mask, causal, backend=backend)
        out.backward(dout)
        for name, got, exp in zip(
            ("out", "dq", "dk", "dv"), [out] + [t.grad for t in leaves], want
        ):
            assert torch.isfinite(got).all(), f"{backend} {name}"
            assert_close_verbose(got, exp, **TOL[torch.float32], name=f"{backend} {name}")


@needs_cpu_kernel
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_kernel_is_the_default_causal_or_not(causal):
    """The decoder's causal self-attention runs the C++ kernel too (forward and backward), no
    sdpa or materialised scores."""
    assert _backend.resolve("attention", "cpu") == "cpu"
    q, k, v, mask = make_inputs(2, 2, 9, 16, masked=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with OpsSeen() as seen:
        attention(*leaves, mask, causal=causal, dropout_p=0.1).sum().backward()
    assert "blip_fast.attention_fwd.default" in seen.names
    assert "blip_fast.attention_bwd.default" in seen.names
    assert not any("scaled_dot_product" in n or "softmax" in n for n in seen.names), seen.names


@needs_cpu_kernel
def test_decoding_over_a_kv_cache_goes_to_sdpa_unless_asked():
    q, k, v, _ = make_inputs(2, 2, 9, 16, masked=False)
    q = q[:, :, -1:]  # one new token over the cache
    want = reference.attention(q, k, v, None, causal=True)
    for backend, op in ((None, "aten._scaled_dot_product"), ("cpu", "blip_fast.attention_fwd")):
        with OpsSeen() as seen:
            got = attention(q, k, v, None, causal=True, backend=backend)
        assert any(n.startswith(op) for n in seen.names), (backend, seen.names)
        assert_close_verbose(got, want, **TOL[torch.float32], name=str(backend))


@needs_cpu_kernel
def test_cpu_dropout_is_the_counter_hash_of_a_seed_drawn_from_torchs_generator():
    """Self-attention dropout runs inside the C++ kernel: its seed is the next draw of torch's
    generator, and the reference with that seed drops the same elements (forward and
    gradients)."""
    q, k, v, mask = make_inputs(2, 2, 9, 16, masked=True)
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(3)
    got = attention(*leaves, mask, dropout_p=0.2)
    got.backward(dout)
    torch.manual_seed(3)
    seed = torch.randint(1 << 62, (1,))
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = reference.attention_fwd(*ref_leaves, mask, 16**-0.5, False, 0.2, seed)[0]
    want.backward(dout)
    assert not torch.allclose(want, attention(q, k, v, mask), atol=1e-3)  # dropout did run
    for name, g, w in zip(("out", "dq", "dk", "dv"), [got, *leaves], [want, *ref_leaves]):
        g, w = (g if name == "out" else g.grad), (w if name == "out" else w.grad)
        assert_close_verbose(g, w, **TOL[torch.float32], name=name)
