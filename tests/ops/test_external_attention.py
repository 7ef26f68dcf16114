"""xformers / flash_attn backends of cross_attention and attention vs the reference (GPU only;
the packages do not install on a CPU machine, so each test imports them inside its body)."""

import pytest
import torch
from _utils import assert_close_verbose

from blip_fast.ops import _backend, _external, attention, cross_attention

# fp16 inputs (flash_attn takes no fp32); 2e-3 ~ a few fp16 ulps of outputs of magnitude ~0.5.
TOL16 = dict(rtol=2e-3, atol=2e-3)


def _inputs(lq, lk, masked):
    q, k, v = (torch.randn(4, 12, n, 64, device="cuda", dtype=torch.float16) for n in (lq, lk, lk))
    mask = None
    if masked:
        lengths = torch.randint(1, lk + 1, (4,), device="cuda")
        mask = torch.arange(lk, device="cuda")[None, :] < lengths[:, None]
    return q, k, v, mask


def _require(module):
    pytest.importorskip(module)
    backend = module.split(".")[0]
    assert _backend.available("cross_attention", backend, "cuda"), f"{backend} not registered"
    return backend


@pytest.mark.gpu
@pytest.mark.parametrize("module", ("xformers.ops", "flash_attn"))
@pytest.mark.parametrize("masked", (False, True))
def test_cross_attention_matches_reference(module, masked):
    backend = _require(module)
    q, k, v, mask = _inputs(35, 577, masked)
    want = cross_attention(*(t.float() for t in (q, k, v)), mask, backend="reference")
    if backend == "flash_attn" and masked:
        with pytest.raises(ValueError, match="key_padding_mask"):
            cross_attention(q, k, v, mask, backend=backend)
        return
    got = cross_attention(q, k, v, mask, backend=backend)
    assert_close_verbose(got.float(), want, **TOL16, name=f"{backend} cross_attention")


@pytest.mark.gpu
@pytest.mark.parametrize("module", ("xformers.ops", "flash_attn"))
@pytest.mark.parametrize("lq,lk", [(35, 35), (1, 40), (7, 40)])
def test_causal_attention_matches_reference(module, lq, lk):
    backend = _require(module)
    q, k, v, _ = _inputs(lq, lk, False)
    want = attention(*(t.float() for t in (q, k, v)), causal=True, backend="reference")
    got = attention(q, k, v, causal=True, backend=backend)
    assert_close_verbose(got.float(), want, **TOL16, name=f"{backend} causal attention")


def test_external_backends_never_auto_selected():
    for op in ("attention", "cross_attention"):
        for device in _backend.PREFERENCE[op].values():
            assert not set(device) & set(_external.BACKENDS)
