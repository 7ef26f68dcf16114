"""xformers / flash_attn backends of ``attention`` and ``cross_attention``: plain Python calls
(no blip_fast op of their own), registered in ``_backend.KERNEL_OPS`` only where CUDA exists and
the package imports (``_backend.available`` then also checks that the module is present). Never
auto-selected (not in ``_backend.PREFERENCE``): ask for them with ``backend="xformers"`` /
``"flash_attn"``.

Both libraries take (B, L, H, D); blip_fast's ops take (B, H, L, D), so q / k / v are transposed
on the way in (a view; the libraries copy to their layout where they must) and the output back.
Masks: xformers gets official BERT's additive bias (−10000 on a dropped key,
``reference.additive_mask``); flash_attn has no additive mask, so it runs only without a
key_padding_mask (its causal mask is bottom-right aligned, like blip_fast's, since 2.1).
"""

import importlib

import torch

from blip_fast.ops import _backend, reference

BACKENDS = ("xformers", "flash_attn")
_MODULES = {"xformers": "xformers.ops", "flash_attn": "flash_attn"}


def _importable(name: str) -> bool:
    try:
        importlib.import_module(_MODULES[name])
    except Exception:  # ImportError, or a wheel built against another torch / CUDA
        return False
    return True


def _register():
    if not torch.cuda.is_available():
        return
    for name in BACKENDS:
        if _importable(name):
            ops = _backend.KERNEL_OPS.setdefault(name, {})
            ops["attention"] = ops["cross_attention"] = name


def _xformers_bias(key_padding_mask, causal, q, k):
    """(B, H, Lq, Lk) additive bias in q's dtype, or None; allocated with Lk padded to a
    multiple of 8 and sliced, the alignment xformers' kernels require of a tensor bias."""
    batch, heads, lq, _ = q.shape
    lk = k.shape[2]
    if key_padding_mask is None and not causal:
        return None
    bias = reference.additive_mask(key_padding_mask, causal, lq, lk, q.dtype, q.device)
    padded = q.new_empty((batch, heads, lq, (lk + 7) // 8 * 8))[..., :lk]
    padded.copy_(bias.expand(batch, heads, lq, lk))
    return padded


def attention(backend, q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0, scale=None):
    """softmax(q kᵀ · scale + mask) v through ``backend``; shapes as ``reference.attention``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, D)
    if backend == "xformers":
        from xformers.ops import memory_efficient_attention

        bias = _xformers_bias(key_padding_mask, causal, q, k)
        out = memory_efficient_attention(qt, kt, vt, attn_bias=bias, p=dropout_p, scale=scale)
    elif backend == "flash_attn":
        if key_padding_mask is not None:
            raise ValueError(
                "backend 'flash_attn' has no additive mask: key_padding_mask must be "
                "None (use backend='xformers', 'triton' or 'sdpa' with padding)"
            )
        from flash_attn import flash_attn_func

        out = flash_attn_func(qt, kt, vt, dropout_p=dropout_p, softmax_scale=scale, causal=causal)
    else:
        raise ValueError(f"unknown external attention backend {backend!r}; known: {BACKENDS}")
    return out.transpose(1, 2)


_register()
