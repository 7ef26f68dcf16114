"""Self-attention of the ViT and text layers (bidirectional with padding mask, or causal for the
decoder), dispatched like every op.

Shapes: q (B, H, Lq, D), k / v (B, H, Lk, D), key_padding_mask (B, Lk) bool, True = attend.

Ops (schemas here, the eager reference kernel everywhere, Triton on CUDA: the cross-attention
kernels of ``blip_fast.kernels.cross_attention`` with their CAUSAL flag):
    blip_fast::attention_fwd_triton(q, k, v, key_padding_mask, scale, causal, dropout_p,
        dropout_seed) -> (out, lse)
    blip_fast::attention_bwd_triton(dout, q, k, v, key_padding_mask, out, lse, scale, causal,
        dropout_p, dropout_seed) -> (dq, dk, dv)
Causal is bottom-right aligned (query i sees keys j <= Lk - Lq + i), so Lq < Lk decoding over a
KV cache works; masked keys get -10000 added, as official BERT (``reference.additive_mask``).
The xformers / flash_attn backends are plain Python calls (``blip_fast.ops._external``). The
``cpu`` backend is the C++ cross-attention kernel (``blip_fast::cross_attention_fwd``, forward
and backward): it has a padding mask but no causal mask, which goes to sdpa when the backend
was chosen automatically. Attention dropout in the fused kernels (``cpu``, ``triton``) is
cross-attention's counter hash (``blip_fast.ops.cross_attention``), seeded per call.
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
_OPS = {"triton": "attention_fwd_triton"}
_CPU_OP = "cross_attention_fwd"  # (q, k, v, key_padding_mask, scale, dropout_p, seed)

_register_family(
    "_triton", "attention", _FWD, _BWD, reference.attention_fwd, reference.attention_bwd
)
if _backend._triton_ok():
    from blip_fast.kernels import cross_attention as _k
    from blip_fast.ops._library import lib

    lib.impl("attention_fwd_triton", _k.attention_fwd, "CUDA")
    lib.impl("attention_bwd_triton", _k.attention_bwd, "CUDA")
for _name, _op in {**_OPS, "cpu": _CPU_OP}.items():
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
    check_dropout("attention", dropout_p, backend)
    if causal and backend == "cpu":  # the C++ kernel has no causal mask
        if requested is not None:
            raise ValueError(
                "attention: backend 'cpu' does not support causal; use backend='sdpa' or "
                "'reference'"
            )
        backend = "sdpa"  # automatic choice (the decoder)
    if backend == "sdpa":
        return _sdpa(q, k, v, key_padding_mask, causal, dropout_p)
    mask = None if key_padding_mask is None else key_padding_mask.bool()
    seed = draw_seed(dropout_p, q.device) if backend in (*_OPS, "cpu") else None
    if backend == "cpu":
        op = getattr(torch.ops.blip_fast, _CPU_OP)
        return op(q, k, v, mask, q.shape[-1] ** -0.5, dropout_p, seed)[0]
    if backend in _OPS:
        op = getattr(torch.ops.blip_fast, _OPS[backend])
        return op(q, k, v, mask, q.shape[-1] ** -0.5, bool(causal), dropout_p, seed)[0]
    if backend in _external.BACKENDS:
        return _external.attention(backend, q, k, v, key_padding_mask, causal, dropout_p)
    return reference.attention(q, k, v, key_padding_mask, causal, dropout_p)
