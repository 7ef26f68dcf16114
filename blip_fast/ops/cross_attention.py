"""Cross-attention from text queries (Lq <= 40) to image tokens (197 / 577).

Shapes: q (B, H, Lq, D), k / v (B, H, Lk, D), key_padding_mask (B, Lk) bool, True = attend.

Ops (schemas here, kernels: the eager reference everywhere, C++ from ``blip_fast._C`` on CPU
and, when built with CUDA, the CUDA forward):
    blip_fast::cross_attention_fwd(q, k, v, key_padding_mask, scale) -> (out, lse)
    blip_fast::cross_attention_bwd(dout, q, k, v, key_padding_mask, out, lse, scale) -> (dq, dk, dv)
with out (B, H, Lq, D) in q's dtype and lse (B, H, Lq) fp32, the row log-sum-exp that lets the
backward recompute the probabilities instead of saving (B, H, Lq, Lk).
"""
import torch
import torch.nn.functional as F

from blip_fast.ops import _backend, reference
from blip_fast.ops._library import lib

lib.define("cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, "
           "float scale) -> (Tensor, Tensor)")
lib.define("cross_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, "
           "Tensor? key_padding_mask, Tensor out, Tensor lse, float scale) "
           "-> (Tensor, Tensor, Tensor)")
# Default kernels on every device; _C's TORCH_LIBRARY_IMPL(blip_fast, CPU / CUDA) kernels take
# precedence on their device.
lib.impl("cross_attention_fwd", reference.cross_attention_fwd, "CompositeExplicitAutograd")
lib.impl("cross_attention_bwd", reference.cross_attention_bwd, "CompositeExplicitAutograd")

for _backend_name in ("cpu", "cuda"):
    _backend.KERNEL_OPS.setdefault(_backend_name, {})["cross_attention"] = "cross_attention_fwd"


@torch.library.register_fake("blip_fast::cross_attention_fwd", lib=lib)
def _fwd_fake(q, k, v, key_padding_mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("blip_fast::cross_attention_bwd", lib=lib)
def _bwd_fake(dout, q, k, v, key_padding_mask, out, lse, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # an auxiliary output for the backward, not a result
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.scale = scale


def _backward(ctx, dout, _dlse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.blip_fast.cross_attention_bwd(
        dout, q, k, v, key_padding_mask, out, lse, ctx.scale)
    return dq, dk, dv, None, None


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("blip_fast::cross_attention_bwd has no backward: double backward "
                              "through cross_attention is not supported")


torch.library.register_autograd("blip_fast::cross_attention_fwd", _backward,
                                setup_context=_setup_context, lib=lib)
# Registered so that a double backward fails loudly instead of silently returning no gradient.
torch.library.register_autograd("blip_fast::cross_attention_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None, lib=lib)


def cross_attention(q, k, v, key_padding_mask=None, backend=None):
    """softmax(q kᵀ / √D + mask) v without a causal mask.

    Arguments: q: (batch, heads, q_len, head_dim); k, v: (batch, heads, k_len, head_dim);
    key_padding_mask: (batch, k_len) bool, True = attend. Returns (batch, heads, q_len, head_dim).
    """
    backend = _backend.resolve("cross_attention", q.device, backend)
    if backend == "sdpa":
        allowed = None if key_padding_mask is None else key_padding_mask.bool()[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    if backend in ("cpu", "cuda"):
        mask = None if key_padding_mask is None else key_padding_mask.bool()
        return torch.ops.blip_fast.cross_attention_fwd(q, k, v, mask, q.shape[-1] ** -0.5)[0]
    return reference.cross_attention(q, k, v, key_padding_mask)
