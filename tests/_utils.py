"""Helpers shared by the tests: a closeness check whose failure says where and how it failed,
the comparison of two trained models, and a record of the ops a call dispatches."""

import contextlib

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# Tolerances vs an fp32 reference, by input dtype: |actual − expected| <= atol + rtol · |expected|.
TOL = {
    torch.float64: dict(rtol=1e-5, atol=1e-5),
    torch.float32: dict(rtol=1e-5, atol=1e-5),  # the fp32 parity goal
    torch.float16: dict(rtol=1e-2, atol=1e-2),  # inputs rounded to 11 bits: ~5e-4 per element
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),  # 8 bits: ~4e-3 per element, fp32 accumulation
}


def assert_close_verbose(actual, expected, *, rtol, atol, name="tensor", max_report=5):
    """Assert |actual − expected| <= atol + rtol · |expected| elementwise (NaN only matches NaN).

    On failure the message gives the mismatch count, the first mismatching indices with both
    values, the largest error, and NaN / inf disagreements (Liger's assert_verbose_allclose).
    """
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    err = (a - e).abs()
    ok = (err <= atol + rtol * e.abs()) | (a == e) | (a_nan & e_nan)
    if bool(ok.all()):
        return
    bad = (~ok).nonzero()
    lines = [
        f"{name}: {len(bad)} of {a.numel()} elements differ (rtol={rtol}, atol={atol}, "
        f"dtypes {actual.dtype} vs {expected.dtype})"
    ]
    for idx in bad[:max_report].tolist():
        lines.append(
            f"  at {tuple(idx)}: actual {a[tuple(idx)].item():.8g}, "
            f"expected {e[tuple(idx)].item():.8g}"
        )
    finite = ~(a_nan | e_nan) & torch.isfinite(a) & torch.isfinite(e)
    if bool(finite.any()):
        worst = torch.where(finite, err, torch.zeros_like(err)).argmax()
        worst_idx = tuple(int(i) for i in torch.unravel_index(worst, a.shape))
        lines.append(f"  largest error {err[worst_idx].item():.3g} at {worst_idx}")
    nan_diff = int((a_nan != e_nan).sum())
    inf_diff = int((torch.isinf(a) != torch.isinf(e)).sum())
    if nan_diff or inf_diff:
        lines.append(f"  NaN disagreements: {nan_diff}, inf disagreements: {inf_diff}")
    raise AssertionError("\n".join(lines))


def assert_lowp_close(name, got, exact, low, eps):
    """FlashAttention's rule for fp16 / bf16 kernels: max |got - exact| <= 2 · max |low - exact|
    + eps, where ``exact`` is the fp64 reference and ``low`` the eager reference run in the
    kernel's own dtype (its error is the floor any kernel in that dtype can reach)."""
    assert got.dtype == low.dtype, f"{name}: dtype {got.dtype}, expected {low.dtype}"
    err = (got.double() - exact).abs().max().item()
    ref_err = (low.detach().double() - exact).abs().max().item()
    assert err <= 2 * ref_err + eps, (
        f"{name}: error {err:.3g} > 2 · reference {ref_err:.3g} + {eps}"
    )


@contextlib.contextmanager
def largest_gradients(model: nn.Module):
    """Inside the block, records per trainable parameter name the elementwise largest |grad|
    over every backward pass (yielded dict, filled as gradients arrive)."""
    largest: dict[str, torch.Tensor] = {}

    def recorder(name):
        def record(p):
            g = p.grad.detach().abs()
            largest[name] = torch.maximum(largest[name], g) if name in largest else g.clone()

        return record

    hooks = [
        p.register_post_accumulate_grad_hook(recorder(name))
        for name, p in model.named_parameters()
        if p.requires_grad
    ]
    try:
        yield largest
    finally:
        for hook in hooks:
            hook.remove()


def rounding_noise_elements(model: nn.Module, exact: dict, fp32: dict) -> dict:
    """Boolean masks (by state-dict name) of the parameter elements trained on rounding noise
    alone: their float64 gradient is zero to float64 rounding of the largest gradient, yet their
    float32 gradient is not zero. An attention key bias is one (softmax is shift-invariant per
    query, so the true gradient is 0); AdamW scales such noise up to +-lr steps whose signs
    depend on the summation order, so two correct runs disagree there by ~lr. Elements that no
    run ever touches (unused embedding rows) get exact zeros and stay compared. A momentum copy
    follows its online parameter, so it inherits the mask.

    ``exact`` / ``fp32``: ``largest_gradients`` of the same training run in float64 / float32.
    On blip_tiny the noise elements sit below 1e-19 of the largest gradient and every other
    nonzero element above 1e-12, so the float64 epsilon separates them with a wide margin."""
    floor = torch.finfo(torch.float64).eps * max(float(g.max()) for g in exact.values())
    masks = {name: (exact[name] <= floor) & (g > 0) for name, g in fp32.items()}
    names = {id(p): name for name, p in model.named_parameters()}
    for online, momentum in model.momentum_pairs():
        for p, p_m in zip(online.parameters(), momentum.parameters(), strict=True):
            if names[id(p)] in masks:
                masks[names[id(p_m)]] = masks[names[id(p)]]
    return masks


def assert_trained_states_close(
    got: dict, expected: dict, init: dict, *, noise: dict, rtol=1e-5, atol=1e-6
):
    """Two state dicts after the same training steps agree (floats within rtol / atol, others
    exactly) except on the ``noise`` elements (``rounding_noise_elements``), which need only be
    finite; returns how many float tensors training moved away from ``init``."""
    assert got.keys() == expected.keys()
    moved = 0
    for k, e in expected.items():
        g = got[k]
        moved += e.is_floating_point() and not torch.equal(e, init[k])
        if not e.is_floating_point():
            assert torch.equal(g, e), k
            continue
        assert torch.isfinite(g).all(), k
        if k in noise:
            g, e = g[~noise[k]], e[~noise[k]]
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=k)
    return moved


class OpsSeen(TorchDispatchMode):
    """Records the ATen / mkldnn ops a call dispatches."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))
