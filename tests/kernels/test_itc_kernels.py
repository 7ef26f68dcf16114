"""Triton launchers of kernels/itc.py called directly: on CPU tensors under TRITON_INTERPRET=1
(tests/conftest.py sets it without CUDA) at small sizes, natively at BLIP's sizes on a GPU."""

import pytest
import torch
import torch.nn.functional as F
from _utils import TOL, assert_close_verbose

from blip_fast.kernels import itc as itc_kernels
from blip_fast.ops import reference

LEAVES = ("image_feat", "text_feat", "temp")


def make_inputs(B, Q, D, *, with_idx, device, dtype, temp):
    def feat(n):
        return F.normalize(torch.randn(n, D, device=device, dtype=torch.float64), dim=-1).to(dtype)

    inputs = dict(
        image_feat=feat(B),
        text_feat=feat(B),
        image_feat_m=feat(B),
        text_feat_m=feat(B),
        image_queue=feat(Q).t(),
        text_queue=feat(Q).t(),
        temp=torch.tensor(temp, device=device, dtype=torch.float32),
    )
    inputs["idx"] = torch.randint(0, 4, (B,), device=device) if with_idx else None
    inputs["idx_queue"] = torch.randint(0, 4, (Q,), device=device) if with_idx else None
    return inputs


def check(B, Q, D, *, with_idx, alpha, temp, dtype, device):
    inputs = make_inputs(B, Q, D, with_idx=with_idx, device=device, dtype=dtype, temp=temp)
    # oracle: fp32 (fp64 on a GPU-sized queue would be slow) reference on the same values
    ref_in = {
        k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in inputs.items()
    }
    leaves = {k: ref_in[k].clone().requires_grad_() for k in LEAVES}
    expected = reference.itc_loss(**{**ref_in, **leaves}, alpha=alpha)
    expected_grads = torch.autograd.grad(expected, list(leaves.values()))

    args = [
        inputs[k]
        for k in (
            "image_feat",
            "text_feat",
            "image_feat_m",
            "text_feat_m",
            "image_queue",
            "text_queue",
            "temp",
        )
    ]
    loss, stats = itc_kernels.itc_fwd(*args, alpha, inputs["idx"], inputs["idx_queue"], True)
    grads = itc_kernels.itc_bwd(
        torch.ones((), device=device), *args, alpha, inputs["idx"], inputs["idx_queue"], True, stats
    )
    # fp16 inputs: the reference runs on the same fp16-rounded values in fp32, as the kernel
    # does, so only accumulation order differs; fp32 loosened to 1e-4 at temp 0.001 where
    # one logit's fp32 rounding (1000 · 6e-8) moves softmax by ~6e-5 relatively.
    tol = dict(TOL[torch.float32]) if temp >= 0.01 else dict(rtol=1e-4, atol=1e-4)
    rounding = {torch.float32: 0.0, torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
    loss_atol = tol["atol"] + rounding * float(expected.detach().abs())
    assert_close_verbose(loss.float(), expected, rtol=tol["rtol"], atol=loss_atol, name="loss")
    for name, grad, ref in zip(("d_image_feat", "d_text_feat", "d_temp"), grads, expected_grads):
        atol = tol["atol"] + tol["rtol"] * float(ref.abs().max())
        atol += rounding * float(ref.abs().max())
        assert_close_verbose(grad.float(), ref, rtol=tol["rtol"], atol=atol, name=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run without CUDA")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize(
    "B,Q,with_idx,alpha,temp",
    [
        (5, 37, True, 0.4, 0.07),  # B and Q not multiples of the tiles, repeated ids
        (16, 64, False, 0.4, 0.001),  # the low temp clamp: logits ±1000
        (1, 0, False, 0.0, 0.5),  # B = 1, no queue, no teacher
        (9, 50, True, 0.0, 0.07),
    ],
)
def test_interpreter_matches_reference(B, Q, with_idx, alpha, temp, dtype):
    check(B, Q, 32, with_idx=with_idx, alpha=alpha, temp=temp, dtype=dtype, device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("B,with_idx", [(256, False), (256, True), (37, True)])
def test_gpu_matches_reference(B, with_idx, dtype):
    check(B, 57600, 256, with_idx=with_idx, alpha=0.4, temp=0.07, dtype=dtype, device="cuda")
