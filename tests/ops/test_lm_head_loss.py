"""blip_fast.ops.lm_head_loss: every available backend and the eager default kernels vs the
reference, the registered ops (opcheck, gradcheck, torch.compile), rows that are all ignored,
and the errors for bad labels and shapes."""

import pytest
import torch
from _utils import TOL, assert_close_verbose

from blip_fast.ops import _backend, lm_head_loss, reference
from blip_fast.ops.lm_head_loss import chunk_rows

KERNELS = ("cpu", "triton")  # the backends besides the reference
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))
REDUCTIONS = ("mean", "sum", "none")
BLIP_VOCAB = 30524
# (N, H, V): one row, a prime vocabulary, and BLIP's vocabulary with more rows than one chunk.
SIZES = ((1, 8, 5), (45, 24, 997), (chunk_rows(BLIP_VOCAB) + 29, 16, BLIP_VOCAB))

fwd_cpu = torch.ops.blip_fast.lm_head_loss_fwd
# On CPU the Triton family has no kernel: its ops run the chunked eager default kernels.
fwd_default = torch.ops.blip_fast.lm_head_loss_fwd_triton


def cpu_op_built() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("blip_fast::lm_head_loss_fwd", "CPU")


needs_cpu_op = pytest.mark.skipif(not cpu_op_built(), reason="blip_fast._C not built")


def make_inputs(N, H, V, *, device="cpu", dtype=torch.float32, ignored=0.3):
    """hidden (N, H), weight (V, H), bias (V,), labels (N,) with a fraction ``ignored`` of -100.
    Ignored rows of hidden are NaN (poisoned): a kernel must never read them."""
    hidden = torch.randn(N, H, device=device, dtype=dtype)
    weight = torch.randn(V, H, device=device, dtype=dtype) / H**0.5
    bias = torch.randn(V, device=device, dtype=dtype)
    labels = torch.randint(0, V, (N,), device=device)
    labels[torch.rand(N, device=device) < ignored] = -100
    hidden[labels == -100] = float("nan")
    return hidden, weight, bias, labels


def loss_and_grads(hidden, weight, bias, labels, eps, reduction, backend, upstream):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    args = leaves if bias is not None else [*leaves, None]
    loss = lm_head_loss(*args, labels, eps, reduction, backend=backend)
    return loss, torch.autograd.grad(loss, leaves, upstream)


def unpoisoned(hidden, labels):
    """The reference's input: hidden with the ignored (poisoned) rows zeroed; they carry no
    loss, and their zero rows contribute nothing to d_weight."""
    return hidden.masked_fill((labels == -100)[:, None], 0.0)


def kernels_for(device):
    kernels = [b for b in KERNELS if _backend.available("lm_head_loss", b, device)]
    if not kernels:
        pytest.skip(f"no lm_head_loss kernel built for {device}")
    return kernels


def check(name, actual, expected, dtype):
    tol = TOL[dtype]
    atol = tol["atol"] + tol["rtol"] * float(expected.detach().abs().max())  # the tensor's scale
    assert_close_verbose(actual, expected, rtol=tol["rtol"], atol=atol, name=name)


def check_against_reference(run, inputs, eps, reduction, dtype):
    """``run(hidden, weight, bias, labels, eps, reduction, upstream)`` -> (loss, grads) vs the
    reference, forward and every gradient."""
    hidden, weight, bias, labels = inputs
    n = hidden.shape[0] if reduction == "none" else ()
    upstream = torch.randn(n, device=hidden.device, dtype=reference_dtype(dtype))
    expected, expected_grads = loss_and_grads(
        unpoisoned(hidden, labels), weight, bias, labels, eps, reduction, "reference", upstream
    )
    loss, grads = run(hidden, weight, bias, labels, eps, reduction, upstream)
    assert loss.dtype == expected.dtype, f"loss dtype {loss.dtype}, expected {expected.dtype}"
    check("loss", loss, expected, dtype)
    for name, grad, ref in zip(("d_hidden", "d_weight", "d_bias"), grads, expected_grads):
        assert grad.dtype == ref.dtype and bool(torch.isfinite(grad).all()), name
        check(name, grad, ref, dtype)
    assert bool((grads[0][labels == -100] == 0).all()), "ignored rows got a gradient"


def reference_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("with_bias", (True, False))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", (0.0, 0.1))
@pytest.mark.parametrize("N,H,V", SIZES)
def test_kernels_match_reference(N, H, V, eps, reduction, with_bias, dtype, device):
    inputs = list(make_inputs(N, H, V, device=device, dtype=dtype))
    if not with_bias:
        inputs[2] = None
    for backend in kernels_for(device):

        def run(*args, backend=backend):
            return loss_and_grads(*args[:-1], backend, args[-1])

        check_against_reference(run, inputs, eps, reduction, dtype)


def default_kernel_run(hidden, weight, bias, labels, eps, reduction, upstream):
    """The ops' eager default kernels: the Triton family's op on CPU (forward; backward via
    autograd, which for 'none' runs the recomputing lm_head_loss_bwd_triton)."""
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    args = leaves if bias is not None else [*leaves, None]
    loss = fwd_default(*args, labels, eps, reduction, True)[0]
    return loss, torch.autograd.grad(loss, leaves, upstream)


@pytest.mark.parametrize("with_bias", (True, False))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("N,H,V", SIZES[1:])
def test_eager_default_kernels_match_reference(N, H, V, reduction, with_bias):
    inputs = list(make_inputs(N, H, V, dtype=torch.float64))
    if not with_bias:
        inputs[2] = None
    check_against_reference(default_kernel_run, inputs, 0.1, reduction, torch.float64)


@needs_cpu_op
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_cpu_low_precision(dtype):
    """fp16 / bf16 inputs: the C++ kernel computes in fp32, so it must match the fp32 reference
    on the same (rounded) values up to the rounding of its gradients to the input dtype."""
    hidden, weight, bias, labels = make_inputs(40, 32, 500, dtype=dtype)
    upstream = torch.tensor(1.0)
    fp32 = [unpoisoned(hidden, labels).float(), weight.float(), bias.float()]
    expected, expected_grads = loss_and_grads(*fp32, labels, 0.1, "mean", "reference", upstream)
    loss, grads = loss_and_grads(hidden, weight, bias, labels, 0.1, "mean", "cpu", upstream)
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    check("loss", loss, expected, torch.float32)
    eps = 2**-11 if dtype == torch.float16 else 2**-8  # output rounding, relative
    for name, grad, ref in zip(("d_hidden", "d_weight", "d_bias"), grads, expected_grads):
        atol = 1e-5 + eps * float(ref.abs().max())
        assert_close_verbose(grad.float(), ref, rtol=eps, atol=atol, name=name)


@pytest.mark.parametrize("backend", ("reference", *KERNELS, "default"))
def test_all_rows_ignored_match_torch(backend):
    """No row counts: 'mean' is NaN (0 / 0, as F.cross_entropy gives), 'sum' 0, 'none' zeros;
    every gradient is 0."""
    if backend in KERNELS and not _backend.available("lm_head_loss", backend, "cpu"):
        pytest.skip(f"{backend} not available on cpu")
    hidden, weight, bias, labels = make_inputs(6, 8, 50, ignored=1.0)
    hidden = torch.randn_like(hidden)  # finite: the reference reads every row
    for reduction, expected in (("mean", float("nan")), ("sum", 0.0), ("none", 0.0)):
        upstream = torch.ones(6 if reduction == "none" else ())
        if backend == "default":
            loss, grads = default_kernel_run(hidden, weight, bias, labels, 0.1, reduction, upstream)
        else:
            loss, grads = loss_and_grads(
                hidden, weight, bias, labels, 0.1, reduction, backend, upstream
            )
        assert_close_verbose(
            loss, torch.full_like(loss, expected), rtol=0, atol=0, name=f"{reduction} loss"
        )
        for grad in grads:
            assert bool((grad == 0).all()), f"{reduction}: nonzero gradient"


@pytest.mark.parametrize("backend", (*KERNELS, "default"))
@pytest.mark.parametrize("label", (50, -1, -101))
def test_out_of_range_label_names_it(backend, label):
    if backend in KERNELS and not _backend.available("lm_head_loss", backend, "cpu"):
        pytest.skip(f"{backend} not available on cpu")
    hidden, weight, bias, labels = make_inputs(6, 8, 50, ignored=0.0)
    labels[4] = label
    message = rf"labels\[4\] = {label} is outside the vocabulary \[0, 50\)"
    with pytest.raises(IndexError, match=message):
        if backend == "default":
            fwd_default(hidden, weight, bias, labels, 0.1, "mean", False)
        else:
            lm_head_loss(hidden, weight, bias, labels, 0.1, backend=backend)


@pytest.mark.parametrize("op", (fwd_cpu, fwd_default), ids=("cpu", "default"))
@pytest.mark.parametrize(
    "change,message",
    [
        (dict(weight=torch.zeros(50, 9)), r"weight"),
        (dict(bias=torch.zeros(49)), r"bias must be"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), r"labels must"),
        (dict(labels=torch.zeros(6, dtype=torch.int32)), r"labels must be int64"),
        (dict(reduction="avg"), r"reduction must be"),
        (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\]"),
    ],
)
def test_bad_arguments_are_named(op, change, message):
    if op is fwd_cpu and not cpu_op_built():
        pytest.skip("blip_fast._C not built")
    hidden, weight, bias, labels = make_inputs(6, 8, 50, ignored=0.0)
    args = dict(hidden=hidden, weight=weight, bias=bias, labels=labels)
    args.update(label_smoothing=0.1, reduction="mean", need_grad=False)
    args.update(change)
    with pytest.raises((RuntimeError, ValueError), match=message):
        op(*args.values())


@pytest.mark.parametrize("name", ("lm_head_loss_fwd", "lm_head_loss_fwd_triton"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_bias", (True, False))
def test_opcheck(name, reduction, with_bias):
    hidden, weight, bias, labels = make_inputs(7, 8, 40, dtype=torch.float64)
    hidden = unpoisoned(hidden, labels)
    bias = bias if with_bias else None
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    fwd = getattr(torch.ops.blip_fast, name)
    for need_grad in (True, False):
        torch.library.opcheck(fwd, (*leaves, labels, 0.1, reduction, need_grad))
    dloss = torch.randn(7 if reduction == "none" else (), dtype=torch.float64)
    bwd = getattr(torch.ops.blip_fast, name.replace("fwd", "bwd"))
    torch.library.opcheck(bwd, (dloss, hidden, weight, bias, labels, 0.1, reduction))


@needs_cpu_op
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_cpu(reduction):
    hidden, weight, bias, labels = make_inputs(5, 4, 11, dtype=torch.float64)
    hidden = unpoisoned(hidden, labels)
    leaves = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    need_grad = True  # the forward gathers ('mean', 'sum') or the backward recomputes ('none')
    assert torch.autograd.gradcheck(
        lambda h, w, b: fwd_cpu(h, w, b, labels, 0.1, reduction, need_grad)[0], leaves
    )


@needs_cpu_op
def test_torch_compile_matches_eager():
    """fullgraph compile of the loss (aot_eager traces the op's fake and autograd formula)."""
    hidden, weight, bias, labels = make_inputs(30, 16, 300)
    hidden = unpoisoned(hidden, labels)

    def step(h, w, b):
        return lm_head_loss(h, w, b, labels, 0.1, backend="cpu")

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss = fn(*leaves)
        loss.backward()
        return loss, [leaf.grad for leaf in leaves]

    expected, expected_grads = run(step)
    loss, grads = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    check("compiled loss", loss, expected, torch.float32)
    for grad, ref in zip(grads, expected_grads):
        check("compiled grad", grad, ref, torch.float32)


@needs_cpu_op
def test_autocast_runs_gemms_in_autocast_dtype():
    """Under autocast the fused op sees bf16 inputs, as the Linear it replaces would, and its
    gradients reach the fp32 parameters in fp32."""
    hidden, weight, bias, labels = make_inputs(20, 16, 100)
    hidden = unpoisoned(hidden, labels)
    bf16 = [t.bfloat16().float() for t in (hidden, weight, bias)]
    expected = reference.lm_head_loss(*bf16, labels, 0.1)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_head_loss(*leaves, labels, 0.1, backend="cpu")
    loss.backward()
    check("loss", loss, expected, torch.float32)  # the kernel's fp32 math on bf16 values
    assert all(leaf.grad.dtype == torch.float32 for leaf in leaves)


@needs_cpu_op
def test_backward_builds_no_zero_gradient_for_auxiliary_outputs():
    """The op's gathered d_weight (V, H) is an auxiliary output: autograd must not build a
    (V, H) zero gradient for it (nor for d_hidden, d_bias) before calling the backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ZeroFills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (
                torch.ops.aten.zeros,
                torch.ops.aten.fill_,
                torch.ops.aten.zero_,
                torch.ops.aten.zeros_like,
            ):
                self.shapes.append(tuple(out.shape))
            return out

    hidden, weight, bias, labels = make_inputs(12, 8, 50)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = lm_head_loss(*leaves, labels, 0.1, "mean", backend="cpu")
    with ZeroFills() as fills:
        grads = torch.autograd.grad(loss, leaves)
    assert (50, 8) not in fills.shapes and (12, 8) not in fills.shapes, fills.shapes
    assert all(bool(torch.isfinite(g).all()) for g in grads)
