"""blip_fast.ops.linear: PackedLinear (oneDNN prepacked GEMM) vs the nn.Linear it replaces, the
paths that fall back to F.linear, and prepack_linears' copy semantics."""

import pytest
import torch
import torch.nn.functional as F
from _utils import TOL, OpsSeen, assert_close_verbose, assert_lowp_close
from torch import nn

from blip_fast.ops import PackedLinear, _backend, cast_copy, prepack_linears
from blip_fast.ops.linear import native_bf16

ONEDNN = _backend.available("linear", "onednn", "cpu")
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="torch built without mkldnn")
needs_bf16 = pytest.mark.skipif(
    not (ONEDNN and native_bf16()), reason="CPU without AMX / AVX512-BF16"
)
# (input shape, out_features): the ITM reranker's (pairs x tokens, 256 -> 1024), odd sizes
# below one oneDNN block, a single row, and 3-D / 4-D inputs as the model passes them.
CASES = [
    ((2944, 256), 1024),
    ((37, 129), 67),
    ((1, 64), 3),
    ((5, 23, 64), 128),
    ((2, 3, 7, 40), 40),
]


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_packed_matches_linear(case, bias):
    shape, out_features = case
    torch.manual_seed(0)
    linear = nn.Linear(shape[-1], out_features, bias=bias)  # U(±1/√in): outputs of order 1
    x = torch.randn(shape)
    packed = PackedLinear(linear)
    with torch.no_grad(), OpsSeen() as seen:
        got = packed(x)
    assert any("mkldnn._linear_pointwise" in n for n in seen.names), seen.names
    with torch.no_grad():
        want = linear(x)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert_close_verbose(got, want, **TOL[torch.float32], name="packed linear")
    # and no less accurate than MKL's fp32 GEMM against the fp64 product
    exact = nn.functional.linear(
        x.double(), linear.weight.double(), None if linear.bias is None else linear.bias.double()
    )
    err, mkl_err = ((t.double() - exact).abs().max().item() for t in (got, want))
    assert err <= 2 * mkl_err + 1e-7, (err, mkl_err)


@needs_onednn
@pytest.mark.parametrize("case", CASES[:2])
def test_gelu_runs_inside_the_gemm(case):
    shape, out_features = case
    torch.manual_seed(1)
    linear = nn.Linear(shape[-1], out_features)
    x = torch.randn(shape)
    plain = PackedLinear(linear)
    fused = plain.with_activation("gelu")
    assert fused.packed is plain.packed  # the same packed weights
    with torch.no_grad(), OpsSeen() as seen:
        got = fused(x)
    assert not any("gelu" in n for n in seen.names), seen.names  # no separate GELU kernel
    with torch.no_grad():
        want = F.gelu(linear(x))
    assert_close_verbose(got, want, **TOL[torch.float32], name="packed linear + gelu")
    x.requires_grad_()
    torch.testing.assert_close(fused(x), F.gelu(linear(x)), rtol=0, atol=0)  # F.linear path
    with pytest.raises(ValueError, match="activation must be one of"):
        plain.with_activation("relu")


@needs_bf16
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("case", CASES)
def test_bf16_packed_gemm_under_autocast_and_for_bf16_inputs(case, activation):
    """bf16 GEMM on a bf16 copy of the weight, packed once on first use and shared with the
    GELU variant; error against fp64 within FlashAttention's rule, the floor being autocast's
    own ``F.linear`` (bf16 inputs and weight)."""
    shape, out_features = case
    torch.manual_seed(2)
    linear = nn.Linear(shape[-1], out_features)
    x = torch.randn(shape)
    packed = PackedLinear(linear).with_activation(activation)
    act = F.gelu if activation else (lambda y: y)
    exact = act(F.linear(x.double(), linear.weight.double(), linear.bias.double()))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16), OpsSeen() as seen:
            got = packed(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            floor = act(linear(x))
        from_bf16 = packed(x.bfloat16())  # bf16 input, no autocast: the same GEMM
    assert any("mkldnn._linear_pointwise" in n for n in seen.names), seen.names
    assert list(packed.packed) == [torch.float32, torch.bfloat16]  # packed once, on first use
    assert torch.equal(from_bf16, got)
    assert_lowp_close("bf16 packed linear", got, exact, floor, 1e-3)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[1:4])
def test_residual_added_inside_the_gemm(case, dtype):
    """linear(x) + residual with the sum as the GEMM's post-op (no separate add) where the
    residual has the GEMM's dtype; an fp32 residual under bf16 autocast is added after, in
    fp32; with grads, F.linear + add. Error against fp64 within the plain GEMM's."""
    if dtype == torch.bfloat16 and not native_bf16():
        pytest.skip("CPU without AMX / AVX512-BF16")
    shape, out_features = case
    torch.manual_seed(3)
    linear = nn.Linear(shape[-1], out_features)
    x = torch.randn(shape)
    residual = torch.randn(*shape[:-1], out_features)
    packed = PackedLinear(linear)
    exact = F.linear(x.double(), linear.weight.double(), linear.bias.double()) + residual.double()
    x_, residual_ = x.to(dtype), residual.to(dtype)
    with torch.no_grad(), OpsSeen() as seen:
        got = packed(x_, residual=residual_)
    assert any("mkldnn._linear_pointwise.binary" in n for n in seen.names), seen.names
    assert not any(n.startswith("aten.add") for n in seen.names), seen.names
    with torch.no_grad():
        plain = packed(x_) + residual_
    assert got.dtype == dtype and bool(torch.isfinite(got).all())
    err, plain_err = ((t.double() - exact).abs().max().item() for t in (got, plain))
    assert err <= 1.01 * plain_err + 1e-6, (err, plain_err)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = packed(x, residual=residual)  # bf16 GEMM, fp32 residual: added after, fp32
    assert mixed.dtype == torch.float32
    x.requires_grad_()
    torch.testing.assert_close(packed(x, residual=residual), linear(x) + residual, rtol=0, atol=0)
    with pytest.raises(ValueError, match=rf"residual of shape \({out_features},\)"):
        packed(x, residual=residual[(0,) * (residual.dim() - 1)])  # would broadcast


@needs_onednn
def test_packed_reads_non_contiguous_input():
    linear = nn.Linear(48, 32)
    x = torch.randn(48, 10).t()  # (10, 48), column-major
    with torch.no_grad():
        assert_close_verbose(PackedLinear(linear)(x), linear(x), **TOL[torch.float32])


@needs_onednn
def test_falls_back_to_linear_for_grads_fp16_autocast_and_other_dtypes():
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    packed = PackedLinear(linear)
    x = torch.randn(6, 40, requires_grad=True)
    packed(x).square().sum().backward()  # grads flow through F.linear on the shared weight
    gx, gw = x.grad.clone(), linear.weight.grad.clone()
    x.grad = linear.weight.grad = None
    linear(x).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=0, atol=0)
    torch.testing.assert_close(gw, linear.weight.grad, rtol=0, atol=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):  # fp16: not packed
        assert torch.equal(packed(x), linear(x)) and packed(x).dtype == torch.float16
    with torch.no_grad():
        x64 = x.double()
        with pytest.raises(RuntimeError):  # F.linear's own dtype error, not a silent cast
            packed(x64)


def test_packed_linear_rejects_unpackable_weights():
    with pytest.raises(ValueError, match="fp32 or bf16 CPU weight, got torch.float16"):
        PackedLinear(nn.Linear(4, 4).half())


@needs_onednn
@needs_bf16
def test_bf16_module_packs_its_bf16_weights():
    """An all-bf16 inference copy: bf16 in, bf16 out on the bf16 packed weight, the same
    product as bf16 ``F.linear`` up to accumulation order (no cast of the weight per call)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 96).bfloat16()
    x = torch.randn(8, 64).bfloat16()
    packed = PackedLinear(linear)
    assert list(packed.packed) == [torch.bfloat16]
    with torch.no_grad():
        out = torch.full((8, 96), float("nan"), dtype=torch.bfloat16)
        out.copy_(packed(x))
        want = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)
    with torch.no_grad():  # fp32 in: the fp32 GEMM on the same (bf16-valued) weight and bias
        torch.testing.assert_close(packed(x.float()), want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_wrong_input_width_names_both_shapes():
    with (
        torch.no_grad(),
        pytest.raises(
            ValueError,
            match=r"\(5, 30\) has 30 features, "
            r"expected \(\.\.\., 32\)",
        ),
    ):
        PackedLinear(nn.Linear(32, 16))(torch.randn(5, 30))


@needs_onednn
def test_prepack_copies_modules_shares_tensors_leaves_original():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64),
        nn.GELU(),
        nn.LayerNorm(64),
        nn.Sequential(nn.Linear(64, 16)),
        nn.Linear(16, 8).bfloat16(),
        nn.Linear(8, 8).half(),
    )
    packed = prepack_linears(model)
    assert [type(m) for m in packed] == [
        PackedLinear,
        nn.GELU,
        nn.LayerNorm,
        nn.Sequential,
        PackedLinear,
        nn.Linear,
    ]  # fp32 and bf16 layers packed, the fp16 one kept
    assert type(packed[3][0]) is PackedLinear
    assert all(type(m) is not PackedLinear for m in model.modules())
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in packed.parameters()} <= ids
    assert packed[2].weight is model[2].weight  # LayerNorm shared, not copied
    x = torch.randn(9, 32)
    with torch.no_grad():
        assert_close_verbose(packed[:4](x), model[:4](x), **TOL[torch.float32])
    assert isinstance(prepack_linears(nn.Linear(3, 5)), PackedLinear)


def test_reference_backend_returns_the_module_and_default_is_onednn():
    model = nn.Sequential(nn.Linear(8, 8))
    assert prepack_linears(model, backend="reference") is model
    assert _backend.resolve("linear", "cpu") == ("onednn" if ONEDNN else "reference")
    assert _backend.resolve("linear", "cuda") == "reference"
    with pytest.raises(RuntimeError, match="cannot run op 'linear'"):
        _backend.resolve("linear", "cuda", "onednn")


def test_cast_copy_converts_floating_tensors_once_and_leaves_the_original():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Embedding(10, 8))
    module.register_buffer("positions", torch.arange(4))  # not floating: copied as it is
    module.register_buffer("scale", torch.randn(3))
    copied = cast_copy(module, torch.bfloat16)
    for (name, want), got in zip(module.named_parameters(), copied.parameters()):
        assert isinstance(got, nn.Parameter) and got.dtype == torch.bfloat16, name
        assert torch.equal(got, want.detach().to(torch.bfloat16)), name
        assert want.dtype == torch.float32, name  # the original stays fp32
    assert copied.scale.dtype == torch.bfloat16 and torch.equal(copied.positions, module.positions)
    assert copied.positions.data_ptr() != module.positions.data_ptr()
    same = cast_copy(module, torch.float32)  # already in dtype: shared, modules copied
    assert same is not module and same[0].weight is module[0].weight
