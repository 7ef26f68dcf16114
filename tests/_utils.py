"""Helpers shared by the tests: a closeness check whose failure says where and how it failed."""

import torch

# Tolerances vs an fp32 reference, by input dtype: |actual − expected| <= atol + rtol · |expected|.
TOL = {
    torch.float64: dict(rtol=1e-5, atol=1e-5),
    torch.float32: dict(rtol=1e-5, atol=1e-5),  # DESIGN parity goal for fp32
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


def assert_trained_states_close(got: dict, expected: dict, init: dict, *, rtol=1e-5, atol=1e-6):
    """Two state dicts after the same training steps agree (floats within rtol / atol, others
    exactly); returns how many float tensors training moved away from ``init``.

    The ViT key bias (middle third of ``attn.qkv.bias``) is left out: it cannot change
    attention (softmax is shift-invariant per query), so its true gradient is 0 and AdamW turns
    rounding noise into +-lr steps that differ between any two summation orders."""
    assert got.keys() == expected.keys()
    moved = 0
    for k, e in expected.items():
        g = got[k]
        moved += e.is_floating_point() and not torch.equal(e, init[k])
        if k.endswith("attn.qkv.bias"):
            g, e = g.view(3, -1)[[0, 2]], e.view(3, -1)[[0, 2]]
        if e.is_floating_point():
            assert torch.isfinite(g).all(), k
            torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=k)
        else:
            assert torch.equal(g, e), k
    return moved
