"""Cross-attention from text queries (Lq <= 40) to image tokens (197 / 577).

Shapes: q (B, H, Lq, D), k / v (B, H, Lk, D), key_padding_mask (B, Lk) bool, True = attend.

Ops (schemas here, kernels: the eager reference everywhere, C++ from ``blip_fast._C`` on CPU
and, when built with CUDA, the CUDA forward; the ``*_triton`` twins take the same arguments and
get the Triton kernels of ``blip_fast.kernels.cross_attention`` on CUDA):
    blip_fast::cross_attention_fwd(q, k, v, key_padding_mask, scale, dropout_p, dropout_seed)
        -> (out, lse)
    blip_fast::cross_attention_bwd(dout, q, k, v, key_padding_mask, out, lse, scale, dropout_p,
        dropout_seed) -> (dq, dk, dv)
with out (B, H, Lq, D) in q's dtype and lse (B, H, Lq) fp32, the row log-sum-exp that lets the
backward recompute the probabilities instead of saving (B, H, Lq, Lk). Attention dropout
(training's cross-attention, p 0.1) happens inside the kernels: element (b, h, i, j) is kept by
a counter hash of its index and ``dropout_seed`` (a 1-element int64 tensor on q's device), so
the backward regenerates the mask instead of storing it and every backend (reference
included, ``reference.dropout_keep``) drops the same elements (the C++ CUDA forward has none).
"""

import torch
import torch.nn.functional as F

from blip_fast.ops import _backend, _external, reference
from blip_fast.ops._library import lib, register_family

# trailing arguments of the cross-attention schemas (attention's are `bool causal`)
DROPOUT_ARGS = "float dropout_p=0.0, Tensor? dropout_seed=None"
_FWD = (
    f"(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale, {DROPOUT_ARGS}) "
    "-> (Tensor, Tensor)"
)
_BWD = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor out, "
    f"Tensor lse, float scale, {DROPOUT_ARGS}) -> (Tensor, Tensor, Tensor)"
)
# backend -> forward op. Two op families share one schema because the C++ CUDA kernel and the
# Triton kernel both want the CUDA key: "" gets _C's kernels, "_triton" Triton's.
_OPS = {
    "cpu": "cross_attention_fwd",
    "cuda": "cross_attention_fwd",
    "triton": "cross_attention_fwd_triton",
}
# the backends whose kernels drop attention probabilities themselves (the counter hash above)
FUSED_DROPOUT = ("cpu", "triton")


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
    # trailing arguments (attention's `causal`, the dropout's p and seed) pass to the backward;
    # tensors among them (the seed) are saved
    ctx.extra_is_tensor = [isinstance(x, torch.Tensor) for x in extra]
    tensors = [x for x in extra if isinstance(x, torch.Tensor)]
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse, *tensors)
    ctx.scale = scale
    ctx.extra = tuple(None if t else x for x, t in zip(extra, ctx.extra_is_tensor, strict=True))


def _extra(ctx, saved_tensors):
    """The forward's trailing arguments, saved tensors put back in their places."""
    tensors = iter(saved_tensors)
    return tuple(next(tensors) if t else x for x, t in zip(ctx.extra, ctx.extra_is_tensor))


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
    scale); trailing arguments (attention's `causal`, cross-attention's dropout) pass from forward
    to backward."""
    fwd, bwd = f"{base}_fwd{suffix}", f"{base}_bwd{suffix}"
    lib.define(fwd + fwd_schema)
    lib.define(bwd + bwd_schema)
    lib.impl(fwd, ref_fwd, "CompositeExplicitAutograd")
    lib.impl(bwd, ref_bwd, "CompositeExplicitAutograd")
    bwd_op = getattr(torch.ops.blip_fast, bwd)

    def backward(ctx, dout, _dlse):
        q, k, v, key_padding_mask, out, lse, *tensors = ctx.saved_tensors
        extra = _extra(ctx, tensors)
        dq, dk, dv = bwd_op(dout, q, k, v, key_padding_mask, out, lse, ctx.scale, *extra)
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


def draw_seed(dropout_p: float, device, seed=None):
    """The seed tensor of a fused dropout: ``seed`` if given, else one drawn from torch's
    generator for ``device`` (on the device, so no host sync); None without dropout."""
    if dropout_p == 0.0:
        return None
    if seed is not None:
        return seed
    return torch.randint(1 << 62, (1,), device=device)


def check_dropout(op: str, dropout_p: float, backend: str):
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and backend == "cuda":
        raise ValueError(
            f"{op}: backend 'cuda' (the C++ CUDA forward) has no attention dropout; "
            f"use {', '.join(map(repr, FUSED_DROPOUT))} or 'reference'"
        )


def cross_attention(q, k, v, key_padding_mask=None, dropout_p=0.0, dropout_seed=None, backend=None):
    """softmax(q kᵀ / √D + mask) v without a causal mask, the probabilities dropped with
    probability ``dropout_p`` (training).

    Arguments: q: (batch, heads, q_len, head_dim); k, v: (batch, heads, k_len, head_dim);
    key_padding_mask: (batch, k_len) bool, True = attend; dropout_seed: a 1-element int64
    tensor on q's device for the fused kernels' counter hash (drawn from torch's generator when
    None); with a seed the reference drops the same elements, without one it draws its mask as
    ``F.dropout`` (the official code) and sdpa as sdpa does.
    Returns (batch, heads, q_len, head_dim).
    """
    backend = _backend.resolve("cross_attention", q.device, backend)
    check_dropout("cross_attention", dropout_p, backend)
    if backend == "sdpa":
        allowed = None if key_padding_mask is None else key_padding_mask.bool()[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
    mask = None if key_padding_mask is None else key_padding_mask.bool()
    if backend in _OPS:
        op = getattr(torch.ops.blip_fast, _OPS[backend])
        seed = draw_seed(dropout_p, q.device, dropout_seed)
        return op(q, k, v, mask, q.shape[-1] ** -0.5, dropout_p, seed)[0]
    if backend in _external.BACKENDS:
        return _external.attention(backend, q, k, v, key_padding_mask, dropout_p=dropout_p)
    if dropout_seed is not None and dropout_p > 0.0:
        scale = q.shape[-1] ** -0.5
        return reference.attention_fwd(q, k, v, mask, scale, False, dropout_p, dropout_seed)[0]
    return reference.attention(q, k, v, key_padding_mask, dropout_p=dropout_p)
