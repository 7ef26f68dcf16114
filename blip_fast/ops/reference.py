"""Eager PyTorch oracle for every op, mirroring the official BLIP math (docs/architecture.md,
"Model" and "Training objectives").

Tests, benchmarks and the CPU fallback all import these functions; no other reference exists.
Shapes follow the public ops: q (B, H, Lq, D), k / v (B, H, Lk, D), key_padding_mask (B, Lk)
bool with True = attend.
"""

import math

import torch
import torch.nn.functional as F

# Official BERT adds (1 - mask) * -10000 to the scores instead of -inf.
MASK_VALUE = -10000.0


def allowed_mask(key_padding_mask, causal: bool, lq: int, lk: int, device):
    """(B | 1, 1, Lq | 1, Lk) bool, True = attend, or None when nothing is masked. Causal is
    bottom-right aligned: query i (absolute position lk - lq + i) sees keys j <= lk - lq + i,
    which is what decoding with a KV cache needs."""
    allowed = None
    if key_padding_mask is not None:
        allowed = key_padding_mask.bool()[:, None, None, :]
    if causal:
        seen = (
            torch.arange(lk, device=device)[None, :]
            <= torch.arange(lk - lq, lk, device=device)[:, None]
        )[None, None]
        allowed = seen if allowed is None else allowed & seen
    return allowed


def additive_mask(key_padding_mask, causal: bool, lq: int, lk: int, dtype, device):
    """``allowed_mask`` as official BERT adds it: 0 where allowed, -10000 elsewhere (a key
    masked both ways is still -10000, as (1 - causal * padding) * -10000 gives)."""
    allowed = allowed_mask(key_padding_mask, causal, lq, lk, device)
    return None if allowed is None else (~allowed).to(dtype) * MASK_VALUE


def attention(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0, scale=None):
    """softmax(q kᵀ · scale + mask) v, as official BERT / ViT attention.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); key_padding_mask: (B, Lk) bool, True = attend.
    Returns (B, H, Lq, D).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = additive_mask(key_padding_mask, causal, q.shape[-2], k.shape[-2], scores.dtype, q.device)
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def cross_attention(q, k, v, key_padding_mask=None, scale=None):
    """Text queries over image keys: non-causal ``attention`` (no dropout; BLIP's ITM/LM
    cross-attention dropout is applied by the caller's module when training)."""
    return attention(q, k, v, key_padding_mask, causal=False, scale=scale)


def _mul32(x, c: int):
    """(x · c) mod 2³² for int64 tensors x < 2³², in 16-bit halves of c (no int64 overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _mix32(x):
    """csrc/core/dropout.h's mix32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0xD35A2D97)
    return x ^ (x >> 15)


def dropout_keep(seed, shape, p: float, device=None):
    """Attention dropout's keep mask (bool, ``shape`` = (B, H, Lq, Lk)) as the fused kernels
    draw it: element c (row-major linear index) is kept iff a counter hash of (c, seed) is
    >= round(p · 2³²) (csrc/core/dropout.h). seed: a 1-element int64 tensor. A backward
    regenerates the mask from the seed instead of storing it."""
    seed = seed.reshape(()).to(device)
    counter = torch.arange(math.prod(shape), device=device, dtype=torch.int64).view(shape)
    lo = _mix32((counter & 0xFFFFFFFF) ^ (seed & 0xFFFFFFFF))
    bits = _mix32(lo ^ ((seed >> 32) & 0xFFFFFFFF) ^ (counter >> 32))
    return bits >= min(round(p * 2**32), 2**32 - 1)


def _dropped(probs, dropout_p: float, dropout_seed):
    """probs with ``dropout_keep``'s elements scaled by 1 / (1 - p) and the others zeroed."""
    if dropout_p == 0.0:
        return probs
    keep = dropout_keep(dropout_seed, probs.shape, dropout_p, probs.device)
    return probs * keep.to(probs.dtype) * (1.0 / (1.0 - dropout_p))


def attention_fwd(
    q, k, v, key_padding_mask, scale: float, causal: bool = False, dropout_p=0.0, dropout_seed=None
):
    """Forward that also returns the row log-sum-exp, so a backward can recompute the
    probabilities instead of keeping (B, H, Lq, Lk). Returns out (B, H, Lq, D) in q's dtype and
    lse (B, H, Lq) in fp32 (fp64 for fp64 inputs). ``causal`` as in ``allowed_mask``;
    ``dropout_p`` > 0 drops probabilities by ``dropout_keep(dropout_seed)`` (lse is that of the
    probabilities before dropout)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    mask = additive_mask(key_padding_mask, causal, q.shape[-2], k.shape[-2], scores.dtype, q.device)
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    probs = _dropped(torch.exp(scores - lse[..., None]), dropout_p, dropout_seed)
    return torch.matmul(probs, v.to(acc)).to(q.dtype), lse


def attention_bwd(
    dout,
    q,
    k,
    v,
    key_padding_mask,
    out,
    lse,
    scale: float,
    causal: bool = False,
    dropout_p=0.0,
    dropout_seed=None,
):
    """Gradients of ``attention_fwd`` from the saved lse (FlashAttention's recurrence:
    dS = P ∘ (dP − rowsum(dO ∘ O)), dP taken through the dropout mask, which leaves
    rowsum(P ∘ dP) = rowsum(dO ∘ O)). Returns dq, dk, dv in the inputs' dtypes."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf, dof = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    mask = additive_mask(key_padding_mask, causal, q.shape[-2], k.shape[-2], scores.dtype, q.device)
    if mask is not None:
        scores = scores + mask
    probs = torch.exp(scores - lse[..., None])
    dv = torch.matmul(_dropped(probs, dropout_p, dropout_seed).transpose(-1, -2), dof)
    dprobs = _dropped(torch.matmul(dof, vf.transpose(-1, -2)), dropout_p, dropout_seed)
    delta = (dof * out.to(acc)).sum(-1, keepdim=True)
    dscores = probs * (dprobs - delta) * scale
    dq = torch.matmul(dscores, kf)
    dk = torch.matmul(dscores.transpose(-1, -2), qf)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def cross_attention_fwd(q, k, v, key_padding_mask, scale: float, dropout_p=0.0, dropout_seed=None):
    """Non-causal ``attention_fwd``: out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) fp32."""
    return attention_fwd(q, k, v, key_padding_mask, scale, False, dropout_p, dropout_seed)


def cross_attention_bwd(
    dout, q, k, v, key_padding_mask, out, lse, scale: float, dropout_p=0.0, dropout_seed=None
):
    """Gradients of ``cross_attention_fwd``: dq, dk, dv in the inputs' dtypes."""
    return attention_bwd(
        dout, q, k, v, key_padding_mask, out, lse, scale, False, dropout_p, dropout_seed
    )


def itc_loss(
    image_feat,
    text_feat,
    image_feat_m,
    text_feat_m,
    image_queue,
    text_queue,
    temp,
    alpha: float,
    idx=None,
    idx_queue=None,
):
    """Momentum-distilled image-text contrastive loss, exactly as official BLIP.

    image_feat, text_feat: (B, D) normalised student features (carry grad);
    image_feat_m, text_feat_m: (B, D) momentum features of the local batch;
    image_queue, text_queue: (D, Q) ring buffers as stored; temp: 0-d tensor (carries grad);
    idx: (B,) and idx_queue: (Q,) or (1, Q) image ids: same id ⇒ positive (fine-tuning);
    without idx the hard targets are the identity over the batch part (pre-training).
    Returns the scalar (loss_i2t + loss_t2i) / 2.
    """
    with torch.no_grad():
        image_feat_m_all = torch.cat([image_feat_m.t(), image_queue.detach()], dim=1)
        text_feat_m_all = torch.cat([text_feat_m.t(), text_queue.detach()], dim=1)
        if idx is None:
            sim_targets = torch.zeros(
                image_feat.shape[0],
                text_feat_m_all.shape[1],
                device=image_feat.device,
                dtype=image_feat.dtype,
            )
            sim_targets.fill_diagonal_(1)
        else:
            idx = idx.view(-1, 1)
            idx_all = torch.cat([idx.t(), idx_queue.detach().view(1, -1)], dim=1)
            pos_idx = torch.eq(idx, idx_all).to(image_feat.dtype)
            sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        sim_i2t_m = image_feat_m @ text_feat_m_all / temp
        sim_t2i_m = text_feat_m @ image_feat_m_all / temp
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_m_all / temp
    sim_t2i = text_feat @ image_feat_m_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def gathered_cross_attention(q, k_cache, v_cache, image_index, scale=None, dropout_p=0.0):
    """ITM reranking's cross-attention over cached image K / V: pair p's queries attend over
    row image_index[p] of the caches (index, then attend; dropout as official BERT's).

    q: (P, H, Lq, D); k_cache, v_cache: (N_images, H, Lk, D); image_index: (P,) int64.
    Returns (P, H, Lq, D)."""
    k, v = k_cache[image_index], v_cache[image_index]
    return attention(q, k, v, dropout_p=dropout_p, scale=scale)


def gathered_cross_attention_fwd(
    q, k_cache, v_cache, image_index, scale: float, dropout_p=0.0, dropout_seed=None
):
    """``cross_attention_fwd`` over the gathered caches: out (P, H, Lq, D) in q's dtype,
    lse (P, H, Lq) fp32 (dropout counted over (P, H, Lq, Lk))."""
    k, v = k_cache[image_index], v_cache[image_index]
    return cross_attention_fwd(q, k, v, None, scale, dropout_p, dropout_seed)


def gathered_cross_attention_bwd(
    dout, q, k_cache, v_cache, image_index, out, lse, scale: float, dropout_p=0.0, dropout_seed=None
):
    """Gradients of ``gathered_cross_attention_fwd``: dq (P, H, Lq, D) and dk_cache, dv_cache
    (N_images, H, Lk, D), an image's the sum over the pairs that read it (0 if none does)."""
    k, v = k_cache[image_index], v_cache[image_index]
    dq, dk, dv = cross_attention_bwd(dout, q, k, v, None, out, lse, scale, dropout_p, dropout_seed)
    dk_cache = k_cache.new_zeros(k_cache.shape).index_add_(0, image_index, dk)
    dv_cache = v_cache.new_zeros(v_cache.shape).index_add_(0, image_index, dv)
    return dq, dk_cache, dv_cache


def lm_head_loss(hidden, weight, bias, labels, label_smoothing: float = 0.0, reduction="mean"):
    """The LM head's output projection and label-smoothed cross-entropy, as official BLIP's
    ``BertLMHeadModel``: Linear, then ``F.cross_entropy`` on the fp32 logits (fp64 for fp64).

    hidden: (N, H) transformed hidden states; weight: (V, H) (tied to the word embeddings);
    bias: (V,) or None; labels: (N,) int64, -100 = ignored. Returns the mean over non-ignored
    rows (NaN when there are none), their sum, or per row (0 at ignored rows) for
    ``reduction`` 'mean' / 'sum' / 'none'."""
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)),
        labels,
        ignore_index=-100,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
