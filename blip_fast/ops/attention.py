"""Self-attention of the ViT and text layers (bidirectional with padding mask, or causal for the
decoder), dispatched like every op.

Shapes: q (B, H, Lq, D), k / v (B, H, Lk, D), key_padding_mask (B, Lk) bool, True = attend.

Ops (schemas here, the eager reference kernel everywhere; the C++ cross-attention kernels of
``blip_fast._C`` on CPU with their causal flag, Triton's with their CAUSAL flag on CUDA):
    blip_fast::attention_fwd(q, k, v, key_padding_mask, scale, causal, dropout_p, dropout_seed)
        -> (out, lse)
    blip_fast::attention_bwd(dout, q, k, v, key_padding_mask, out, lse, scale, causal,
        dropout_p, dropout_seed) -> (dq, dk, dv)
and their ``*_triton`` twins. Causal is bottom-right aligned (query i sees keys
j <= Lk - Lq + i), so Lq < Lk decoding over a KV cache works; masked keys get -10000 added, as
official BERT (``reference.additive_mask``). The xformers / flash_attn backends are plain Python
calls (``blip_fast.ops._external``). Attention dropout in the fused kernels (``cpu``,
``triton``) is cross-attention's counter hash (``blip_fast.ops.cross_attention``), seeded per
call. Chosen automatically on CPU, decoding steps over a KV cache (causal, Lq < Lk) go to sdpa.
"""

import torch
import torch.nn.functional as F

from blip_fast.ops import _backend, _external, reference
from blip_fast.ops.cross_attention import DROPOUT_ARGS, _register_family, check_dropout, draw_seed

_FWD = (
    "(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale, bool causal, "
    f"{DROPOUT_ARGS}) -> (Tensor, Tensor)"
)
_BWD = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor out, "
    f"Tensor lse, float scale, bool causal, {DROPOUT_ARGS}) -> (Tensor, Tensor, Tensor)"
)
_OPS = {"cpu": "attention_fwd", "triton": "attention_fwd_triton"}

for _suffix in ("", "_triton"):
    _register_family(
        _suffix, "attention", _FWD, _BWD, reference.attention_fwd, reference.attention_bwd
    )
if _backend._triton_ok():
    from blip_fast.kernels import cross_attention as _k
    from blip_fast.ops._library import lib

    lib.impl("attention_fwd_triton", _k.attention_fwd, "CUDA")
    lib.impl("attention_bwd_triton", _k.attention_bwd, "CUDA")
for _name, _op in _OPS.items():
    _backend.KERNEL_OPS.setdefault(_name, {})["attention"] = _op


def _sdpa(q, k, v, key_padding_mask, causal, dropout_p):
    allowed = reference.allowed_mask(key_padding_mask, causal, q.shape[-2], k.shape[-2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)


def attention(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0, backend=None):
    """softmax(q kᵀ / √D + mask) v.

    Arguments: q: (batch, heads, q_len, head_dim); k, v: (batch, heads, k_len, head_dim);
    key_padding_mask: (batch, k_len) bool, True = attend; causal: bottom-right aligned causal
    mask (query i sees keys up to k_len - q_len + i); dropout_p: attention-probability dropout
    (the fused kernels' counter hash; reference and sdpa draw theirs).
    Returns (batch, heads, q_len, head_dim).
    """
    requested, backend = backend, _backend.resolve("attention", q.device, backend)
    if requested is None and backend == "cpu" and causal and q.shape[-2] < k.shape[-2]:
        # decoding over a KV cache: its few queries leave most of the C++ kernel's 16 query
        # lanes empty, and sdpa is faster (36 beams x 12 heads, 1 query over 20 keys, fp32:
        # 178 vs 405 us on a 2-core Xeon)
        backend = "sdpa"
    check_dropout("attention", dropout_p, backend)
    if backend == "sdpa":
        return _sdpa(q, k, v, key_padding_mask, causal, dropout_p)
    mask = None if key_padding_mask is None else key_padding_mask.bool()
    seed = draw_seed(dropout_p, q.device) if backend in _OPS else None
    if backend in _OPS:
        op = getattr(torch.ops.blip_fast, _OPS[backend])
        return op(q, k, v, mask, q.shape[-1] ** -0.5, bool(causal), dropout_p, seed)[0]
    if backend in _external.BACKENDS:
        return _external.attention(backend, q, k, v, key_padding_mask, causal, dropout_p)
    return reference.attention(q, k, v, key_padding_mask, causal, dropout_p)
