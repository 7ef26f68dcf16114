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
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    err = (a - e).abs()
    ok = (err <= atol + rtol * e.abs()) | (a == e) | (a_nan & e_nan)
    if bool(ok.all()):
        return
    bad = (~ok).nonzero()
    lines = [f"{name}: {len(bad)} of {a.numel()} elements differ (rtol={rtol}, atol={atol}, "
             f"dtypes {actual.dtype} vs {expected.dtype})"]
    for idx in bad[:max_report].tolist():
        lines.append(f"  at {tuple(idx)}: actual {a[tuple(idx)].item():.8g}, "
                     f"expected {e[tuple(idx)].item():.8g}")
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
    assert err <= 2 * ref_err + eps, f"{name}: error {err:.3g} > 2 · reference {ref_err:.3g} + {eps}"
