"""Self-attention of the ViT and text layers (bidirectional with padding mask, or causal for the
decoder), dispatched like every op.

Shapes: q (B, H, Lq, D), k / v (B, H, Lk, D), key_padding_mask (B, Lk) bool, True = attend.
"""
import torch.nn.functional as F

from blip_fast.ops import _backend, reference


def _sdpa(q, k, v, key_padding_mask, causal, dropout_p):
    allowed = reference.allowed_mask(key_padding_mask, causal, q.shape[-2], k.shape[-2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)


def attention(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0, backend=None):
    """softmax(q kᵀ / √D + mask) v.

    Arguments: q: (batch, heads, q_len, head_dim); k, v: (batch, heads, k_len, head_dim);
    key_padding_mask: (batch, k_len) bool, True = attend; causal: bottom-right aligned causal
    mask (query i sees keys up to k_len - q_len + i); dropout_p: attention-probability dropout.
    Returns (batch, heads, q_len, head_dim).
    """
    backend = _backend.resolve("attention", q.device, backend)
    if backend == "sdpa":
        return _sdpa(q, k, v, key_padding_mask, causal, dropout_p)
    return reference.attention(q, k, v, key_padding_mask, causal, dropout_p)
