"""blip_fast.ops.gathered_cross_attention: every available backend's output, lse and gradients
vs the reference oracle (index the caches, then attend), the registered ops (opcheck, gradcheck,
torch.compile) and the shape / index checks. The C++ kernels' edge cases (tiles, strides, low
precision, threads) are in tests/csrc/test_cpu_ops.py."""

import pytest
import torch
from _utils import TOL, assert_close_verbose

from blip_fast.ops import _backend, gathered_cross_attention, reference

KERNELS = ("triton", "cpu", "cuda")  # the backends besides the reference
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))
# (pairs, images, q_len, k_len, head_dim): BLIP's retrieval text length over ViT-B/384 tokens;
# up to 6 pairs per image, whose queries span several 64-row query tiles of the CPU backward;
# odd sizes below one key tile with a head_dim that is not a power of two; one query.
SHAPES = [(6, 3, 35, 577, 64), (12, 3, 35, 77, 40), (5, 2, 7, 13, 40), (1, 2, 1, 197, 64)]
HEADS = 3
FAMILIES = ("gathered_cross_attention_fwd", "gathered_cross_attention_fwd_triton")

needs_cpu_kernel = pytest.mark.skipif(
    not _backend.available("gathered_cross_attention", "cpu", "cpu"),
    reason="blip_fast._C built without the CPU gathered_cross_attention kernels",
)


def make_inputs(pairs, images, lq, lk, d, device="cpu", dtype=torch.float32):
    """q, the caches and an image_index with repeated, out-of-order values that never reads
    image ``unread`` (its gradients must be exactly 0); returns them and ``unread``."""
    q = torch.randn(pairs, HEADS, lq, d, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(images, HEADS, lk, d, device=device, dtype=dtype) for _ in "kv")
    unread = images // 2
    read = torch.tensor([i for i in range(images) if i != unread], device=device)
    index = read[torch.randperm(pairs, device=device) % len(read)]
    return q, k_cache, v_cache, index, unread


def kernels_for(device):
    return [b for b in KERNELS if _backend.available("gathered_cross_attention", b, device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backends_match_reference(shape, device):
    kernels = kernels_for(device)
    if not kernels:
        pytest.skip(f"no gathered_cross_attention kernel built for {device}")
    q, k_cache, v_cache, index, unread = make_inputs(*shape, device=device)
    scale = shape[-1] ** -0.5
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k_cache, v_cache)]
    expected = reference.gathered_cross_attention(*leaves, index)
    expected_grads = torch.autograd.grad(expected, leaves, dout)
    _, expected_lse = reference.cross_attention_fwd(q, k_cache[index], v_cache[index], None, scale)
    for backend in kernels:
        op = getattr(torch.ops.blip_fast, _backend.KERNEL_OPS[backend]["gathered_cross_attention"])
        lse = op(q, k_cache, v_cache, index, scale)[1]
        assert_close_verbose(lse, expected_lse, **TOL[torch.float32], name=f"{backend} lse")
        leaves = [t.clone().requires_grad_() for t in (q, k_cache, v_cache)]
        out = gathered_cross_attention(*leaves, index, backend=backend)
        assert_close_verbose(out, expected, **TOL[torch.float32], name=f"{backend} out")
        grads = torch.autograd.grad(out, leaves, dout)
        for name, grad, ref in zip(("q", "k_cache", "v_cache"), grads, expected_grads):
            assert_close_verbose(grad, ref, **TOL[torch.float32], name=f"{backend} d{name}")
        for name, grad in zip(("k_cache", "v_cache"), grads[1:]):
            assert torch.count_nonzero(grad[unread]) == 0, f"{backend} d{name} of unread image"


def test_reference_kernels_match_oracle():
    """The ops' eager kernels (all the _triton family has off CUDA) and their autograd."""
    q, k_cache, v_cache, index, unread = make_inputs(7, 4, 9, 77, 40)
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k_cache, v_cache)]
    expected = reference.gathered_cross_attention(*leaves, index)
    expected_grads = torch.autograd.grad(expected, leaves, dout)
    leaves = [t.clone().requires_grad_() for t in (q, k_cache, v_cache)]
    out = torch.ops.blip_fast.gathered_cross_attention_fwd_triton(*leaves, index, 40**-0.5)[0]
    assert_close_verbose(out, expected, **TOL[torch.float32], name="out")
    grads = torch.autograd.grad(out, leaves, dout)
    for name, grad, ref in zip(("q", "k_cache", "v_cache"), grads, expected_grads):
        assert_close_verbose(grad, ref, **TOL[torch.float32], name=f"d{name}")
    assert torch.count_nonzero(grads[1][unread]) == 0 and torch.count_nonzero(grads[2][unread]) == 0


@needs_cpu_kernel
def test_gradcheck_cpu_op_fp64():
    q, k_cache, v_cache = (
        torch.randn(n, 1, lq, 5, dtype=torch.float64) for n, lq in ((4, 3), (3, 6), (3, 6))
    )
    index = torch.tensor([2, 0, 2, 0])  # image 1 unread
    leaves = tuple(t.requires_grad_() for t in (q, k_cache, v_cache))

    def attend(q, k_cache, v_cache):
        return torch.ops.blip_fast.gathered_cross_attention_fwd(q, k_cache, v_cache, index, 0.7)[0]

    assert torch.autograd.gradcheck(attend, leaves)


def test_default_backend_on_cpu_is_the_kernel_when_built():
    built = _backend.available("gathered_cross_attention", "cpu", "cpu")
    assert _backend.resolve("gathered_cross_attention", "cpu") == ("cpu" if built else "reference")


@pytest.mark.parametrize("fwd", FAMILIES)
def test_opcheck_fwd(fwd):
    q, k_cache, v_cache, index, _ = make_inputs(4, 3, 7, 13, 40)
    leaves = [t.requires_grad_() for t in (q, k_cache, v_cache)]
    torch.library.opcheck(getattr(torch.ops.blip_fast, fwd).default, (*leaves, index, 40**-0.5))


@pytest.mark.parametrize("fwd", FAMILIES)
def test_opcheck_bwd(fwd):
    q, k_cache, v_cache, index, _ = make_inputs(4, 3, 7, 13, 40)
    out, lse = getattr(torch.ops.blip_fast, fwd)(q, k_cache, v_cache, index, 40**-0.5)
    # No input requires grad: the backward op's own backward only raises.
    torch.library.opcheck(
        getattr(torch.ops.blip_fast, fwd.replace("_fwd", "_bwd")).default,
        (torch.randn_like(q), q, k_cache, v_cache, index, out, lse, 40**-0.5),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_compile_fullgraph_matches_eager():
    """One graph, index check included (a device-side assert, no host sync)."""
    q, k_cache, v_cache, index, _ = make_inputs(6, 3, 35, 197, 64)
    dout = torch.randn_like(q)
    compiled = torch.compile(gathered_cross_attention, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (gathered_cross_attention, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k_cache, v_cache)]
        out = fn(*leaves, index)
        results.append((out, *torch.autograd.grad(out, leaves, dout)))
    for name, got, want in zip(("out", "dq", "dk", "dv"), results[1], results[0]):
        assert_close_verbose(got, want, rtol=0, atol=0, name=f"compiled {name}")
    with pytest.raises(RuntimeError, match=r"outside \[0, 3\)"):
        compiled(q, k_cache, v_cache, torch.tensor([0, 1, 3, 1, 0, 2]))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(q=torch.randn(4, 3, 7)), r"must be 4-D; got q \(4, 3, 7\)"),
        (
            dict(v_cache=torch.randn(2, 3, 12, 40)),
            r"k_cache \(2, 3, 13, 40\) and v_cache \(2, 3, 12, 40\)",
        ),
        (dict(q=torch.randn(4, 2, 7, 40)), r"heads and head_dim of q \(4, 2, 7, 40\)"),
        (
            dict(image_index=torch.zeros(3, dtype=torch.long)),
            r"shape \(P,\) = \(4,\); got torch.int64 \(3,\)",
        ),
        (dict(image_index=torch.zeros(4, dtype=torch.int32)), r"must be int64"),
        (
            dict(image_index=torch.tensor([0, 1, 2, 1])),
            r"image_index holds values outside \[0, 2\): k_cache \(2, 3, 13, 40\) has 2 images",
        ),
        (dict(image_index=torch.tensor([0, -1, 1, 1])), r"outside \[0, 2\)"),
    ],
)
@pytest.mark.parametrize("backend", ("reference", pytest.param("cpu", marks=needs_cpu_kernel)))
def test_bad_inputs_raise_with_shapes(bad, match, backend):
    q, k_cache, v_cache, index, _ = make_inputs(4, 2, 7, 13, 40)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, image_index=index) | bad
    with pytest.raises((ValueError, RuntimeError), match=match):
        gathered_cross_attention(**args, backend=backend)


def test_triton_unavailable_on_cpu_raises():
    with pytest.raises(RuntimeError, match="triton"):
        gathered_cross_attention(*make_inputs(2, 2, 7, 13, 40)[:4], backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_gpu_low_precision_within_1e_2(dtype):
    """Every CUDA backend in fp16 / bf16 (fp32 accumulation) vs the reference on fp32 copies."""
    q, k_cache, v_cache, index, _ = make_inputs(48, 16, 35, 577, 64, device="cuda", dtype=dtype)
    dout = torch.randn_like(q)
    leaves = [t.float().requires_grad_() for t in (q, k_cache, v_cache)]
    expected = reference.gathered_cross_attention(*leaves, index)
    expected_grads = torch.autograd.grad(expected, leaves, dout.float())
    for backend in kernels_for("cuda"):
        leaves = [t.clone().requires_grad_() for t in (q, k_cache, v_cache)]
        out = gathered_cross_attention(*leaves, index, backend=backend)
        assert out.dtype == dtype
        assert_close_verbose(out, expected, **TOL[dtype], name=f"{backend} out")
        grads = torch.autograd.grad(out, leaves, dout)
        for name, grad, ref in zip(("q", "k_cache", "v_cache"), grads, expected_grads):
            assert_close_verbose(grad, ref, **TOL[dtype], name=f"{backend} d{name}")
