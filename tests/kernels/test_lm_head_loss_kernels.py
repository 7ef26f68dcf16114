"""Triton kernel of kernels/lm_head_loss.py: the chunk launcher alone and the op's chunked
driver over it, on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it without
CUDA) at small sizes, natively at BLIP's sizes on a GPU. The loss buffer is pre-filled with NaN,
so a row the kernel never writes fails."""

import pytest
import torch
import torch.nn.functional as F
from _utils import TOL, assert_close_verbose, assert_lowp_close

from blip_fast.kernels import lm_head_loss as lm_kernels
from blip_fast.ops import reference
from blip_fast.ops.lm_head_loss import chunk_rows, kernels_with

interpreter_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter tests run without CUDA"
)
# Output rounding of a gradient written in the logits' dtype, relative.
ROUNDING = {torch.float32: 0.0, torch.float16: 2**-11, torch.bfloat16: 2**-8}


def expected_chunk(logits, labels, eps, grad_scale):
    """Row losses and d(Σ grad_scale_i · loss_i)/dlogits from F.cross_entropy in fp32."""
    z = logits.float().requires_grad_()
    loss = F.cross_entropy(z, labels, label_smoothing=eps, reduction="none")
    (grad,) = torch.autograd.grad(loss, z, grad_scale)
    return loss.detach(), grad


def check_chunk(rows, vocab, eps, dtype, device):
    logits = (3 * torch.randn(rows, vocab, device=device)).to(dtype)
    labels = torch.randint(0, vocab, (rows,), device=device)
    grad_scale = torch.rand(rows, device=device)
    want_loss, want_grad = expected_chunk(logits, labels, eps, grad_scale)
    poisoned = torch.full((rows,), float("nan"), device=device)
    loss = lm_kernels.lm_head_loss_chunk(logits.clone(), labels, eps, None, loss=poisoned)
    assert_close_verbose(loss, want_loss, **TOL[torch.float32], name="loss without gradient")
    grad = logits.clone()
    poisoned = torch.full((rows,), float("nan"), device=device)
    loss = lm_kernels.lm_head_loss_chunk(grad, labels, eps, grad_scale, loss=poisoned)
    assert_close_verbose(loss, want_loss, **TOL[torch.float32], name="loss")
    atol = (TOL[torch.float32]["atol"] + ROUNDING[dtype]) * float(want_grad.abs().max())
    assert_close_verbose(grad.float(), want_grad, rtol=ROUNDING[dtype], atol=atol, name="grad")


@interpreter_only
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("eps", (0.0, 0.1))
@pytest.mark.parametrize(
    "rows,vocab",
    [(1, 5), (7, 997), (3, lm_kernels.MAX_BLOCK_V + 1000)],  # the last sweeps two blocks
)
def test_chunk_kernel_interpreter(rows, vocab, eps, dtype):
    check_chunk(rows, vocab, eps, dtype, "cpu")


def reference_loss_and_grads(inputs, labels, reduction, dloss):
    leaves = [t.detach().requires_grad_() for t in inputs]
    loss = reference.lm_head_loss(*leaves, labels, 0.1, reduction)
    return (loss.detach(), *torch.autograd.grad(loss, leaves, dloss.to(loss.dtype)))


def check_op(N, H, V, reduction, dtype, device):
    """The op's forward and backward kernels over the Triton chunk kernel vs the fp64 reference
    on the same values (about a tenth of the rows ignored). fp16 / bf16 by FlashAttention's rule
    against the reference run in that dtype (its Linear rounds the logits to it too)."""
    fwd, bwd = kernels_with(lm_kernels.lm_head_loss_chunk)
    hidden = torch.randn(N, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype)
    bias = torch.randn(V, device=device).to(dtype)
    labels = torch.randint(0, V, (N,), device=device)
    labels[torch.rand(N, device=device) < 0.1] = -100
    inputs = (hidden, weight, bias)
    dloss = torch.randn(N if reduction == "none" else (), device=device, dtype=torch.float64)
    exact = reference_loss_and_grads([t.double() for t in inputs], labels, reduction, dloss)
    loss, *gathered = fwd(hidden, weight, bias, labels, 0.1, reduction, True)
    if reduction == "none":  # the recomputing backward
        grads = bwd(dloss.float(), hidden, weight, bias, labels, 0.1, reduction)
    else:  # gathered for dloss = 1
        grads = [g * dloss.to(g.dtype) for g in gathered]
    names = ("loss", "d_hidden", "d_weight", "d_bias")
    if dtype == torch.float32:
        for name, got, want in zip(names, (loss, *grads), exact):
            atol = 1e-5 * (1 + float(want.abs().max()))  # the tensor's scale
            assert_close_verbose(got.double(), want, rtol=1e-5, atol=atol, name=name)
        return
    low = reference_loss_and_grads(inputs, labels, reduction, dloss)
    for name, got, want, ref in zip(names, (loss, *grads), exact, low):
        assert_lowp_close(name, got, want, ref, 1e-5)


@interpreter_only
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_op_over_chunk_kernel_interpreter(reduction, dtype):
    V = 2000  # chunk_rows(2000) = 4194 rows: one chunk; the op tests cover several
    check_op(37, 16, V, reduction, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gpu_matches_reference(reduction, dtype):
    V = 30524
    check_chunk(64, V, 0.1, dtype, "cuda")
    check_op(chunk_rows(V) * 2 + 5, 768, V, reduction, dtype, "cuda")
