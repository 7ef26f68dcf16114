"""Cross-attention from text queries (Lq <= 40) to image tokens (197 / 577).

Shapes: q (B, H, Lq, D), k / v (B, H, Lk, D), key_padding_mask (B, Lk) bool, True = attend.

Ops (schemas here, kernels: the eager reference everywhere, C++ from ``blip_fast._C`` on CPU
and, when built with CUDA, the CUDA forward; the ``*_triton`` twins take the same arguments and
get the Triton kernels of ``blip_fast.kernels.cross_attention`` on CUDA):
    blip_fast::cross_attention_fwd(q, k, v, key_padding_mask, scale) -> (out, lse)
    blip_fast::cross_attention_bwd(dout, q, k, v, key_padding_mask, out, lse, scale) -> (dq, dk, dv)
with out (B, H, Lq, D) in q's dtype and lse (B, H, Lq) fp32, the row log-sum-exp that lets the
backward recompute the probabilities instead of saving (B, H, Lq, Lk).
"""

import torch
import torch.nn.functional as F

from blip_fast.ops import _backend, _external, reference
from blip_fast.ops._library import lib, register_family

_FWD = "(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale) -> (Tensor, Tensor)"
_BWD = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor out, "
    "Tensor lse, float scale) -> (Tensor, Tensor, Tensor)"
)
# backend -> forward op. Two op families share one schema because the C++ CUDA kernel and the
# Triton kernel both want the CUDA key: "" gets _C's kernels, "_triton" Triton's.
_OPS = {
    "cpu": "cross_attention_fwd",
    "cuda": "cross_attention_fwd",
    "triton": "cross_attention_fwd_triton",
}


def _fwd_fake(q, k, v, key_padding_mask, scale, *extra):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:-1], dtype=torch.float32
    )


def _bwd_fake(dout, q, k, v, key_padding_mask, out, lse, scale, *extra):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale, *extra = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # an auxiliary output for the backward, not a result
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.scale = scale
    ctx.extra = tuple(extra)  # trailing non-tensor arguments (attention's `causal`)


def _register_family(
    suffix: str,
    base: str = "cross_attention",
    fwd_schema: str = _FWD,
    bwd_schema: str = _BWD,
    ref_fwd=reference.cross_attention_fwd,
    ref_bwd=reference.cross_attention_bwd,
):
    """Schemas, eager default kernels (every device), fakes and autograd of one op family;
    compiled kernels registered for a device key take precedence on that device. The schemas
    start with (q, k, v, key_padding_mask, scale) / (dout, q, k, v, key_padding_mask, out, lse,
    scale); trailing non-tensor arguments (attention's `causal`) pass from forward to backward."""
    fwd, bwd = f"{base}_fwd{suffix}", f"{base}_bwd{suffix}"
    lib.define(fwd + fwd_schema)
    lib.define(bwd + bwd_schema)
    lib.impl(fwd, ref_fwd, "CompositeExplicitAutograd")
    lib.impl(bwd, ref_bwd, "CompositeExplicitAutograd")
    bwd_op = getattr(torch.ops.blip_fast, bwd)

    def backward(ctx, dout, _dlse):
        q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd_op(dout, q, k, v, key_padding_mask, out, lse, ctx.scale, *ctx.extra)
        return (dq, dk, dv, None, None) + (None,) * len(ctx.extra)

    register_family(
        fwd,
        bwd,
        fwd_fake=_fwd_fake,
        bwd_fake=_bwd_fake,
        backward=backward,
        setup_context=_setup_context,
    )


for _suffix in ("", "_triton"):
    _register_family(_suffix)
if _backend._triton_ok():
    from blip_fast.kernels import cross_attention as _k

    lib.impl("cross_attention_fwd_triton", _k.cross_attention_fwd, "CUDA")
    lib.impl("cross_attention_bwd_triton", _k.cross_attention_bwd, "CUDA")
for _name, _op in _OPS.items():
    _backend.KERNEL_OPS.setdefault(_name, {})["cross_attention"] = _op


def cross_attention(q, k, v, key_padding_mask=None, backend=None):
    """softmax(q kᵀ / √D + mask) v without a causal mask.

    Arguments: q: (batch, heads, q_len, head_dim); k, v: (batch, heads, k_len, head_dim);
    key_padding_mask: (batch, k_len) bool, True = attend. Returns (batch, heads, q_len, head_dim).
    """
    backend = _backend.resolve("cross_attention", q.device, backend)
    if backend == "sdpa":
        allowed = None if key_padding_mask is None else key_padding_mask.bool()[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    if backend in _OPS:
        mask = None if key_padding_mask is None else key_padding_mask.bool()
        op = getattr(torch.ops.blip_fast, _OPS[backend])
        return op(q, k, v, mask, q.shape[-1] ** -0.5)[0]
    if backend in _external.BACKENDS:
        return _external.attention(backend, q, k, v, key_padding_mask)
    return reference.cross_attention(q, k, v, key_padding_mask)
