"""blip_fast.ops.itc_loss: every available backend vs the reference, the registered ops
(opcheck, torch.compile) and the shape errors of the C++ kernel."""

import pytest
import torch
import torch.nn.functional as F
from _utils import TOL, assert_close_verbose

from blip_fast.ops import _backend, itc_loss

KERNELS = ("cpu", "cuda", "triton")  # the backends besides the reference
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))
D = 32
# (B, Q): below / above one SIMD width, B = 1, no queue, and a queue spanning several column
# tiles of the eager kernels (4096) that is not a multiple of any tile.
SIZES = ((5, 37), (1, 0), (1, 9), (17, 0), (33, 9000))
TEMPS = (0.07, 0.001, 0.5)  # BLIP's init and both clamps (at 0.001 the logits reach ±1000)
ALPHAS = (0.0, 0.4)


def cpu_op_built() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("blip_fast::itc_fwd", "CPU")


needs_cpu_op = pytest.mark.skipif(not cpu_op_built(), reason="blip_fast._C not built")


def make_inputs(B, Q, *, with_idx, device="cpu", dtype=torch.float32, temp=0.07):
    """Normalised features; ids drawn from a small range so that they repeat inside the batch,
    inside the queue and across both."""

    def feat(n):
        return F.normalize(torch.randn(n, D, device=device, dtype=torch.float64), dim=-1).to(dtype)

    inputs = dict(
        image_feat=feat(B),
        text_feat=feat(B),
        image_feat_m=feat(B),
        text_feat_m=feat(B),
        image_queue=feat(Q).t(),
        text_queue=feat(Q).t(),  # (D, Q) views, as stored
        temp=torch.tensor(temp, device=device, dtype=dtype),
    )
    if with_idx:
        inputs["idx"] = torch.randint(0, 4, (B,), device=device)
        inputs["idx_queue"] = torch.randint(0, 4, (1, Q), device=device)
    return inputs


def kernels_for(device):
    kernels = [b for b in KERNELS if _backend.available("itc", b, device)]
    if not kernels:
        pytest.skip(f"no ITC kernel built for {device}")
    return kernels


def loss_and_grads(inputs, alpha, backend):
    leaves = {
        k: v.clone().requires_grad_()
        for k, v in inputs.items()
        if k in ("image_feat", "text_feat", "temp")
    }
    loss = itc_loss(**{**inputs, **leaves}, alpha=alpha, backend=backend)
    return loss, torch.autograd.grad(loss, list(leaves.values()))


def to64(inputs):
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("with_idx", (False, True))
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("temp", TEMPS)
@pytest.mark.parametrize("B,Q", SIZES)
def test_kernels_match_reference(B, Q, temp, alpha, with_idx, dtype, device):
    kernels = kernels_for(device)
    inputs = make_inputs(B, Q, with_idx=with_idx, device=device, dtype=dtype, temp=temp)
    expected, expected_grads = loss_and_grads(inputs, alpha, "reference")
    # The same inputs through the fp64 oracle: the reference's own fp32 rounding error. At
    # temp = 0.001 the logits reach ±1000, so fp32 rounding of one logit (~6e-5) moves
    # softmax by as much relatively, and two correct fp32 implementations differ by more than
    # 1e-5; there a backend may be off the fp32 reference by at most twice the reference's
    # own error (FlashAttention's rule), and must still be within 1e-5 of the fp64 truth at
    # BLIP's temperatures.
    exact, exact_grads = loss_and_grads(to64(inputs), alpha, "reference")
    tol = TOL[dtype]

    def check(name, actual, ref, ref_exact):
        atol = tol["atol"] + tol["rtol"] * float(ref.detach().abs().max())  # the tensor's scale
        atol = max(atol, 2 * float((ref.detach().double() - ref_exact.detach()).abs().max()))
        assert_close_verbose(actual, ref, rtol=tol["rtol"], atol=atol, name=name)

    for backend in kernels:
        loss, grads = loss_and_grads(inputs, alpha, backend)
        assert torch.isfinite(loss), f"{backend}: loss {loss}"
        check(f"{backend} loss", loss, expected, exact)
        for name, grad, ref, ref_exact in zip(
            ("d_image_feat", "d_text_feat", "d_temp"), grads, expected_grads, exact_grads
        ):
            assert bool(torch.isfinite(grad).all()), f"{backend} {name} not finite"
            check(f"{backend} {name}", grad, ref, ref_exact)


@needs_cpu_op
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("with_idx", (False, True))
def test_cpu_low_precision(dtype, with_idx):
    """fp16 / bf16 inputs: the C++ kernel computes in fp32, so it must match the fp32 reference
    on the same (rounded) values up to the rounding of its outputs to the input dtype."""
    inputs = make_inputs(9, 300, with_idx=with_idx, dtype=dtype)
    expected, expected_grads = loss_and_grads(to32(inputs), 0.4, "reference")
    loss, grads = loss_and_grads(inputs, 0.4, "cpu")
    assert loss.dtype == dtype and grads[0].dtype == dtype
    eps = 2**-11 if dtype == torch.float16 else 2**-8  # output rounding, relative
    for name, actual, ref in zip(
        ("loss", "d_image_feat", "d_text_feat", "d_temp"),
        (loss, *grads),
        (expected, *expected_grads),
    ):
        atol = 1e-5 + eps * float(ref.detach().abs().max())
        assert_close_verbose(actual.float(), ref, rtol=eps, atol=atol, name=f"cpu {name}")


def to32(inputs):
    return {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("with_idx", (False, True))
def test_eager_default_kernels_match_reference(with_idx):
    """The Python default kernels (every device without a compiled kernel) vs the oracle, fp64,
    with a queue spanning several tiles (both op families share them)."""
    inputs = make_inputs(6, 9000, with_idx=with_idx, dtype=torch.float64, temp=0.001)
    expected, expected_grads = loss_and_grads(inputs, 0.4, "reference")
    leaves = {k: inputs[k].clone().requires_grad_() for k in ("image_feat", "text_feat", "temp")}
    args = {**inputs, **leaves}
    idx = args.get("idx")
    idx_queue = args["idx_queue"].reshape(-1) if with_idx else None
    from blip_fast.ops import itc as itc_mod

    loss, stats = itc_mod.itc_fwd_eager(
        args["image_feat"],
        args["text_feat"],
        args["image_feat_m"],
        args["text_feat_m"],
        args["image_queue"],
        args["text_queue"],
        args["temp"],
        0.4,
        idx,
        idx_queue,
        True,
    )
    assert_close_verbose(loss, expected, **TOL[torch.float64], name="eager loss")
    grads = itc_mod.itc_bwd_eager(
        torch.tensor(1.0, dtype=torch.float64),
        *(
            args[k]
            for k in (
                "image_feat",
                "text_feat",
                "image_feat_m",
                "text_feat_m",
                "image_queue",
                "text_queue",
                "temp",
            )
        ),
        0.4,
        idx,
        idx_queue,
        True,
        stats,
    )
    for grad, ref in zip(grads, expected_grads):
        assert_close_verbose(grad, ref, **TOL[torch.float64], name="eager grad")


def op_args(inputs, alpha=0.4):
    idx = inputs.get("idx")
    idx_queue = inputs["idx_queue"].reshape(-1) if "idx_queue" in inputs else None
    return (
        inputs["image_feat"],
        inputs["text_feat"],
        inputs["image_feat_m"],
        inputs["text_feat_m"],
        inputs["image_queue"],
        inputs["text_queue"],
        inputs["temp"],
        alpha,
        idx,
        idx_queue,
        True,
    )


@pytest.mark.parametrize("op_name", ("itc_fwd", "itc_fwd_triton"))
@pytest.mark.parametrize("with_idx", (False, True))
def test_opcheck(op_name, with_idx):
    inputs = make_inputs(5, 37, with_idx=with_idx, dtype=torch.float64)
    args = list(op_args(inputs))
    for i in (0, 1, 6):  # image_feat, text_feat, temp carry grad
        args[i] = args[i].clone().requires_grad_()
    torch.library.opcheck(getattr(torch.ops.blip_fast, op_name), tuple(args))
    fwd = getattr(torch.ops.blip_fast, op_name)
    _, stats = fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    bwd = getattr(torch.ops.blip_fast, op_name.replace("fwd", "bwd"))
    torch.library.opcheck(
        bwd,
        (
            torch.tensor(1.0, dtype=torch.float64),
            *(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
            stats,
        ),
    )
    # without need_grad (no backward can follow) the forward skips the gradient gathering
    torch.library.opcheck(
        fwd, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:-1]) + (False,)
    )


@needs_cpu_op
@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradcheck_cpu(alpha):
    """fp64 gradcheck of the C++ op. The teacher's softmax depends on temp but carries no
    gradient (official BLIP computes it under no_grad), so temp is checked at alpha = 0 only."""
    inputs = make_inputs(3, 5, with_idx=True, dtype=torch.float64, temp=0.2)
    args = list(op_args(inputs, alpha))
    for i in (0, 1, 6) if alpha == 0.0 else (0, 1):
        args[i] = args[i].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: torch.ops.blip_fast.itc_fwd(*a)[0], tuple(args))


@needs_cpu_op
def test_torch_compile_matches_eager():
    """fullgraph compile of a loss step (aot_eager traces the op's fake and autograd formula);
    the backward runs through the compiled graph's autograd."""
    inputs = make_inputs(7, 100, with_idx=True)

    def step(image_feat, text_feat, temp):
        return itc_loss(
            image_feat,
            text_feat,
            inputs["image_feat_m"],
            inputs["text_feat_m"],
            inputs["image_queue"],
            inputs["text_queue"],
            temp,
            0.4,
            inputs["idx"],
            inputs["idx_queue"],
            backend="cpu",
        )

    def run(fn):
        leaves = [inputs[k].clone().requires_grad_() for k in ("image_feat", "text_feat", "temp")]
        loss = fn(*leaves)
        loss.backward()
        return loss, [leaf.grad for leaf in leaves]

    expected, expected_grads = run(step)
    loss, grads = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    assert_close_verbose(loss, expected, **TOL[torch.float32], name="compiled loss")
    for grad, ref in zip(grads, expected_grads):
        assert_close_verbose(grad, ref, **TOL[torch.float32], name="compiled grad")


@needs_cpu_op
@pytest.mark.parametrize(
    "field,bad,message",
    [
        (
            "image_queue",
            torch.zeros(16, 37),
            r"image_queue must be \[D, Q\] with D = 32, got \[16, 37\]",
        ),
        ("text_feat", torch.zeros(5, 16), r"text_feat must have shape \[5, 32\], got \[5, 16\]"),
        ("text_queue", torch.zeros(32, 36), r"same queue length Q"),
        ("idx", torch.zeros(4, dtype=torch.long), r"idx must be \[B\] with B = 5, got \[4\]"),
    ],
)
def test_bad_shapes_are_named(field, bad, message):
    inputs = make_inputs(5, 37, with_idx=True)
    inputs[field] = bad
    with pytest.raises(RuntimeError, match=message):
        itc_loss(**inputs, alpha=0.4, backend="cpu")
