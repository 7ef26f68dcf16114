"""blip_fast.ops.gathered_cross_attention: every available backend vs "copy K / V per pair, then
reference.cross_attention", the registered op (opcheck) and the shape / index checks."""

import pytest
import torch
from _utils import TOL, assert_close_verbose

from blip_fast.ops import _backend, gathered_cross_attention, reference

KERNELS = ("triton", "cpu", "cuda")  # the backends besides the reference
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))
# (pairs, images, q_len, k_len, head_dim): BLIP's retrieval text length over ViT-B/384 tokens,
# and odd sizes below one key tile with a head_dim that is not a power of two.
SHAPES = [(6, 3, 35, 577, 64), (5, 2, 7, 13, 40), (1, 4, 1, 197, 64)]
HEADS = 3


def make_inputs(pairs, images, lq, lk, d, device="cpu", dtype=torch.float32):
    q = torch.randn(pairs, HEADS, lq, d, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(images, HEADS, lk, d, device=device, dtype=dtype) for _ in "kv")
    # repeated and out-of-order indices: pairs share images, as i2t / t2i candidates do
    index = torch.randint(0, images, (pairs,), device=device)
    return q, k_cache, v_cache, index


def copied(q, k_cache, v_cache, index):
    """The naive path the op replaces: one K / V copy per pair, then plain cross attention."""
    k = torch.stack([k_cache[i] for i in index.tolist()])
    v = torch.stack([v_cache[i] for i in index.tolist()])
    return reference.cross_attention(q, k, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_copy_per_pair(shape, device):
    kernels = [k for k in KERNELS if _backend.available("gathered_cross_attention", k, device)]
    if not kernels:
        pytest.skip(f"no gathered_cross_attention kernel built for {device}")
    inputs = make_inputs(*shape, device=device)
    expected = copied(*inputs)
    for backend in kernels:
        with torch.no_grad():
            out = gathered_cross_attention(*inputs, backend=backend)
        assert_close_verbose(out, expected, **TOL[torch.float32], name=f"{backend} out")


def test_reference_records_autograd():
    q, k_cache, v_cache, index = make_inputs(4, 2, 7, 13, 40)
    q.requires_grad_()
    out = gathered_cross_attention(q, k_cache, v_cache, index, backend="reference")
    assert out.requires_grad


def test_default_backend_on_cpu_is_the_kernel_when_built():
    built = _backend.available("gathered_cross_attention", "cpu", "cpu")
    assert _backend.resolve("gathered_cross_attention", "cpu") == ("cpu" if built else "reference")


def test_automatic_backend_with_grad_falls_back_to_reference():
    q, k_cache, v_cache, index = make_inputs(4, 2, 7, 13, 40)
    q.requires_grad_()
    out = gathered_cross_attention(q, k_cache, v_cache, index)
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_opcheck():
    q, k_cache, v_cache, index = make_inputs(4, 3, 7, 13, 40)
    torch.library.opcheck(
        torch.ops.blip_fast.gathered_cross_attention_triton.default,
        (q, k_cache, v_cache, index, 40**-0.5),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


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
            r"\[0, 2\] but k_cache \(2, 3, 13, 40\) has 2 images",
        ),
        (dict(image_index=torch.tensor([0, -1, 1, 1])), r"\[-1, 1\]"),
    ],
)
def test_bad_inputs_raise_with_shapes(bad, match):
    q, k_cache, v_cache, index = make_inputs(4, 2, 7, 13, 40)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, image_index=index) | bad
    with pytest.raises((ValueError, IndexError), match=match):
        gathered_cross_attention(**args, backend="reference")


def test_triton_unavailable_on_cpu_raises():
    with pytest.raises(RuntimeError, match="triton"):
        gathered_cross_attention(*make_inputs(2, 2, 7, 13, 40), backend="triton")


@pytest.mark.gpu
def test_gpu_triton_refuses_grad():
    q, k_cache, v_cache, index = make_inputs(4, 2, 7, 13, 40, device="cuda")
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="inference only"):
        gathered_cross_attention(q, k_cache, v_cache, index, backend="triton")


needs_cpu_kernel = pytest.mark.skipif(
    not _backend.available("gathered_cross_attention", "cpu", "cpu"),
    reason="blip_fast._C built without the CPU gathered_cross_attention_fwd kernel",
)


@needs_cpu_kernel
@pytest.mark.parametrize("index", ([2, 0, 2, 1, 0, 2], [1, 1, 1, 1, 1, 1], [0, 2, 1, 0, 1, 2]))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_cpu_kernel_repeated_and_out_of_order_indices(index, dtype):
    """The C++ CPU kernel (the twin of the CUDA one) vs copy-per-pair: repeated, out-of-order
    and all-the-same image rows, a head_dim that is not a power of two, Lk over two key tiles."""
    q, k_cache, v_cache, _ = make_inputs(6, 3, 9, 77, 40, dtype=dtype)
    index = torch.tensor(index)
    out = torch.ops.blip_fast.gathered_cross_attention_fwd(q, k_cache, v_cache, index, 40**-0.5)
    assert_close_verbose(
        out, copied(q, k_cache, v_cache, index), **TOL[torch.float32], name="cpu out"
    )


@needs_cpu_kernel
def test_cpu_kernel_fp16_and_strided():
    """fp16 caches (fp32 compute) and non-contiguous q / caches from a (N, L, H, D) layout."""
    pairs, images, lq, lk, d = 5, 3, 7, 40, 64
    q = torch.randn(pairs, lq, HEADS, d).transpose(1, 2)
    k_cache, v_cache = (torch.randn(images, lk, HEADS, d).transpose(1, 2) for _ in "kv")
    index = torch.tensor([2, 0, 0, 1, 2])
    want = copied(q, k_cache, v_cache, index)
    out = torch.ops.blip_fast.gathered_cross_attention_fwd(q, k_cache, v_cache, index, d**-0.5)
    assert_close_verbose(out, want, **TOL[torch.float32], name="cpu fp32 strided")
    half = [t.half() for t in (q, k_cache, v_cache)]
    out16 = torch.ops.blip_fast.gathered_cross_attention_fwd(*half, index, d**-0.5)
    assert out16.dtype == torch.float16
    # fp16 inputs, fp32 compute, one rounding of the output: a few fp16 ulps of |out| < 1
    assert_close_verbose(
        out16.float(),
        copied(*(t.float() for t in half), index),
        rtol=2e-3,
        atol=2e-3,
        name="cpu fp16",
    )


@needs_cpu_kernel
def test_cpu_backend_requested_refuses_grad():
    q, k_cache, v_cache, index = make_inputs(4, 2, 7, 13, 40)
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="inference only"):
        gathered_cross_attention(q, k_cache, v_cache, index, backend="cpu")


@needs_cpu_kernel
def test_cpu_backend_through_public_op():
    inputs = make_inputs(6, 3, 35, 197, 64)
    with torch.no_grad():
        out = gathered_cross_attention(*inputs, backend="cpu")
    assert_close_verbose(out, copied(*inputs), **TOL[torch.float32], name="cpu backend")


@needs_cpu_kernel
def test_cpu_kernel_rejects_out_of_range_index():
    q, k_cache, v_cache, _ = make_inputs(4, 2, 7, 13, 40)
    with pytest.raises(RuntimeError, match=r"image_index holds values in \[0, 2\]"):
        torch.ops.blip_fast.gathered_cross_attention_fwd(
            q, k_cache, v_cache, torch.tensor([0, 1, 2, 1]), 0.1
        )
    with pytest.raises(RuntimeError, match="image_index must be int64"):
        torch.ops.blip_fast.gathered_cross_attention_fwd(
            q, k_cache, v_cache, torch.zeros(4, dtype=torch.int32), 0.1
        )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fwd_op(device):
    q, k_cache, v_cache, index = make_inputs(4, 3, 7, 13, 40, device=device)
    torch.library.opcheck(
        torch.ops.blip_fast.gathered_cross_attention_fwd.default,
        (q, k_cache, v_cache, index, 40**-0.5),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_gpu_cuda_kernel_matches_copy_per_pair(dtype):
    if not _backend.available("gathered_cross_attention", "cuda", "cuda"):
        pytest.skip("blip_fast._C built without CUDA kernels")
    q, k_cache, v_cache, _ = make_inputs(48, 16, 35, 577, 64, device="cuda", dtype=dtype)
    index = torch.randperm(48, device="cuda") % 16  # repeated, out of order
    out = torch.ops.blip_fast.gathered_cross_attention_fwd(q, k_cache, v_cache, index, 0.125)
    want = copied(*(t.float() for t in (q, k_cache, v_cache)), index)
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_close_verbose(out.float(), want, **tol, name=f"cuda {dtype}")
