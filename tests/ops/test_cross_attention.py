"""blip_fast.ops.cross_attention: every available backend vs the reference, the registered ops
(opcheck, gradcheck, torch.compile)."""

import pytest
import torch
from _utils import TOL, assert_close_verbose

from blip_fast.ops import _backend, cross_attention, reference

# Every backend but the reference they are compared with.
BACKENDS = ("sdpa", "cpu", "cuda", "triton", "xformers", "flash_attn")
# Backends whose output carries autograd (a Triton / xformers / flash_attn path would be added
# here with its backward).
DIFFERENTIABLE = ("sdpa", "cpu", "cuda", "triton")
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))
Q_LENS = (1, 7, 35)  # a decoding step, a short caption, BLIP's retrieval text length
K_LENS = (13, 197, 577)  # below one key tile, ViT-B at 224 px and at 384 px
HEAD_DIMS = (64, 40)  # BLIP's 64 and one that is not a multiple of the SIMD width
BATCH, HEADS = 2, 3


def cpu_op_built() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("blip_fast::cross_attention_fwd", "CPU")


needs_cpu_op = pytest.mark.skipif(not cpu_op_built(), reason="blip_fast._C not built")


def make_inputs(lq, lk, d, device="cpu", dtype=torch.float32, batch=BATCH, heads=HEADS):
    """q, k, v and a ragged key_padding_mask: each batch row keeps a random prefix of >= 1 keys."""
    q, k, v = (torch.randn(batch, heads, n, d, device=device, dtype=dtype) for n in (lq, lk, lk))
    lengths = torch.randint(1, lk + 1, (batch,), device=device)
    lengths[0] = lk  # one row without padding
    mask = torch.arange(lk, device=device)[None, :] < lengths[:, None]
    return q, k, v, mask


def backends_for(device):
    return [b for b in BACKENDS if _backend.available("cross_attention", b, device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("lk", K_LENS)
@pytest.mark.parametrize("lq", Q_LENS)
def test_backends_match_reference(lq, lk, d, device):
    q, k, v, mask = make_inputs(lq, lk, d, device)
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = reference.cross_attention(*leaves, mask)
    expected_grads = torch.autograd.grad(expected, leaves, dout)
    for backend in backends_for(device):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = cross_attention(*leaves, key_padding_mask=mask, backend=backend)
        assert_close_verbose(out, expected, **TOL[torch.float32], name=f"{backend} out")
        if backend not in DIFFERENTIABLE:
            continue
        for name, grad, ref in zip("qkv", torch.autograd.grad(out, leaves, dout), expected_grads):
            assert_close_verbose(grad, ref, **TOL[torch.float32], name=f"{backend} d{name}")


@pytest.mark.parametrize("device", DEVICES)
def test_no_mask_matches_reference(device):
    q, k, v, _ = make_inputs(7, 197, 64, device)
    expected = reference.cross_attention(q, k, v)
    for backend in backends_for(device):
        assert_close_verbose(
            cross_attention(q, k, v, backend=backend),
            expected,
            **TOL[torch.float32],
            name=f"{backend} out",
        )


def test_reference_and_sdpa_available_on_cpu():
    assert _backend.available("cross_attention", "reference", "cpu")
    assert "sdpa" in backends_for("cpu")


@needs_cpu_op
def test_cpu_backend_available_when_built():
    assert _backend.available("cross_attention", "cpu", "cpu")
    assert _backend.KERNEL_OPS["cpu"]["cross_attention"] == "cross_attention_fwd"


@pytest.mark.parametrize("with_mask", (True, False))
def test_opcheck_fwd(with_mask):
    q, k, v, mask = make_inputs(7, 70, 40)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(
        torch.ops.blip_fast.cross_attention_fwd.default,
        (q, k, v, mask if with_mask else None, 40**-0.5),
    )


@pytest.mark.parametrize("with_mask", (True, False))
def test_opcheck_bwd(with_mask):
    q, k, v, mask = make_inputs(7, 70, 40)
    mask = mask if with_mask else None
    out, lse = torch.ops.blip_fast.cross_attention_fwd(q, k, v, mask, 40**-0.5)
    # No input requires grad: the op's own backward only raises (test_double_backward_raises),
    # so opcheck's autograd checks do not apply.
    torch.library.opcheck(
        torch.ops.blip_fast.cross_attention_bwd.default,
        (torch.randn_like(q), q, k, v, mask, out, lse, 40**-0.5),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_double_backward_raises():
    q, k, v, mask = make_inputs(7, 13, 64)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = torch.ops.blip_fast.cross_attention_fwd(*leaves, mask, 0.125)[0]
    dq, _, _ = torch.autograd.grad(out.sum(), leaves, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        dq.sum().backward()


@needs_cpu_op
@pytest.mark.parametrize("lq, lk", [(3, 7), (5, 70)])  # one key tile with a tail; two tiles
def test_gradcheck_cpu_op_fp64(lq, lk):
    q, k, v, mask = make_inputs(lq, lk, 5, dtype=torch.float64, batch=2, heads=1)
    leaves = tuple(t.requires_grad_() for t in (q, k, v))

    def attend(q, k, v):
        return torch.ops.blip_fast.cross_attention_fwd(q, k, v, mask, 0.7)[0]

    assert torch.autograd.gradcheck(attend, leaves)


@needs_cpu_op
def test_compile_fullgraph_matches_eager():
    q, k, v, mask = make_inputs(35, 197, 64)
    dout = torch.randn_like(q)

    def attend(q, k, v, mask):
        return torch.ops.blip_fast.cross_attention_fwd(q, k, v, mask, q.shape[-1] ** -0.5)[0]

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (attend, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, mask)
        results.append((out, *torch.autograd.grad(out, leaves, dout)))
    for name, got, want in zip(("out", "dq", "dk", "dv"), results[1], results[0]):
        assert_close_verbose(got, want, rtol=0, atol=0, name=f"compiled {name}")


def test_unknown_backend_raises():
    q, k, v, mask = make_inputs(1, 13, 64)
    with pytest.raises(RuntimeError, match="no_such_backend"):
        cross_attention(q, k, v, mask, backend="no_such_backend")
