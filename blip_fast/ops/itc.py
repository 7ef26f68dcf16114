"""Image-text contrastive loss with momentum distillation and feature queues (BLIP ITC).

Shapes: image_feat / text_feat / image_feat_m / text_feat_m (B, D); image_queue / text_queue
(D, Q) as stored; idx (B,); idx_queue (Q,) or (1, Q).

Ops (schemas here; kernels: the tiled eager implementation below everywhere, C++ from
``blip_fast._C`` on CPU (forward + backward) and CUDA (forward), Triton on CUDA):
    blip_fast::itc_fwd(img, txt, img_m, txt_m, img_queue, txt_queue, temp, alpha, idx?,
                       idx_queue?, need_grad) -> (loss, stats)
    blip_fast::itc_bwd(dloss, img, txt, img_m, txt_m, img_queue, txt_queue, temp, alpha, idx?,
                       idx_queue?, need_grad, stats) -> (d_img, d_txt, d_temp)
and the same pair named itc_fwd_triton / itc_bwd_triton (a second family, as both may want the
CUDA key). loss is 0-d in img's dtype; stats (2, B, 3 + D) in the compute dtype (fp64 for fp64
inputs, else fp32) holds per direction (i2t, t2i) and row: the student log-sum-exp, the teacher
log-sum-exp, the number of hard positives and, when need_grad, the gradient direction
G_i = Σ_j (softmax(s)_ij − targets_ij) c_j (D values; left unset by the kernels whose backward
recomputes instead: Triton and the CUDA forward).

The columns of direction i2t are [txt_m of the batch ; txt_queue] (t2i: the image side),
visited in tiles, so neither the concatenated columns nor a (B, B + Q) logit matrix is ever
built. With s = x·c / temp (student), t = x_m·c / temp (teacher, no grad), targets =
alpha·softmax(t) + (1 − alpha)·hard, a row's loss is lse(s) − alpha·Σ softmax(t)·s −
(1 − alpha)·Σ hard·s / count, all gathered in one pass with a running log-sum-exp for s and t.
The gradient, ds = (softmax(s) − targets)·dloss / (2B), d_x = Σ_j ds_j c_j / temp,
d_temp = −Σ ds·s / temp, is either gathered in the same pass (the eager and C++ CPU kernels:
running Σ exp(s − m_s)·c and Σ exp(t − m_t)·c, rescaled as the maxima move, the flash-attention
forward; 4 products of B rows per tile instead of 5 with a recomputing backward) or recomputed
per tile from the saved lse (Triton).
"""

import torch

from blip_fast.ops import _backend, reference
from blip_fast.ops._library import lib, register_family

_ARGS = (
    "Tensor image_feat, Tensor text_feat, Tensor image_feat_m, Tensor text_feat_m, "
    "Tensor image_queue, Tensor text_queue, Tensor temp, float alpha, Tensor? idx, "
    "Tensor? idx_queue, bool need_grad"
)
# Columns per tile of the eager kernels: a (2B, 4096) fp32 tile is 8 MiB at B = 256.
_TILE = 4096

# Two op families because both may want the CUDA key: itc_fwd / itc_bwd get C++ kernels from
# _C, itc_fwd_triton / itc_bwd_triton get the Triton launchers of blip_fast.kernels.itc.
_FAMILIES = {"": ("itc_fwd", "itc_bwd"), "_triton": ("itc_fwd_triton", "itc_bwd_triton")}


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _column_tiles(feat_m, queue, tile):
    """(j0, cols) over [feat_m of the batch ; queue]: cols (D, n) views, never a copy of all."""
    B, Q = feat_m.shape[0], queue.shape[1]
    for j0 in range(0, B, tile):
        yield j0, feat_m[j0 : j0 + tile].t()
    for q0 in range(0, Q, tile):
        yield B + q0, queue[:, q0 : q0 + tile]


def _directions(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue):
    """(student rows, teacher rows, column feat_m, column queue) for i2t then t2i."""
    return (
        (image_feat, image_feat_m, text_feat_m, text_queue),
        (text_feat, text_feat_m, image_feat_m, image_queue),
    )


def _hard(idx, idx_all, B, j0, n, device):
    """(B, n) bool hard positives of columns j0..j0+n: eq of ids, or the batch identity."""
    if idx is None:
        return torch.arange(B, device=device)[:, None] == torch.arange(j0, j0 + n, device=device)
    return idx[:, None] == idx_all[j0 : j0 + n][None, :]


def _hard_cols(hard, cols):
    """(B, D) Σ over hard positives of their columns."""
    return hard @ cols.t()


def itc_fwd_eager(
    image_feat,
    text_feat,
    image_feat_m,
    text_feat_m,
    image_queue,
    text_queue,
    temp,
    alpha,
    idx,
    idx_queue,
    need_grad,
    tile=_TILE,
):
    """Tiled single-pass forward (default kernel of itc_fwd); returns (loss, stats)."""
    (B, D), acc = image_feat.shape, _acc_dtype(image_feat.dtype)
    dev = image_feat.device
    inv_t = 1.0 / temp.detach().to(acc)
    idx_all = None if idx is None else torch.cat([idx.reshape(-1), idx_queue.reshape(-1)])
    stats = torch.zeros(2, B, 3 + D, dtype=acc, device=dev)
    total = torch.zeros((), dtype=acc, device=dev)
    for d, (x, xm, fm, queue) in enumerate(
        _directions(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue)
    ):
        x2 = torch.cat([x.detach(), xm.detach()]).to(acc)  # (2B, D): student and teacher rows
        neg_inf = torch.full((B,), float("-inf"), dtype=acc, device=dev)
        m_s, m_t = neg_inf.clone(), neg_inf.clone()
        l_s, l_t, w, h, cnt = (torch.zeros(B, dtype=acc, device=dev) for _ in range(5))
        o_s, o_t, o_h = (torch.zeros(B, D, dtype=acc, device=dev) for _ in range(3))
        for j0, cols in _column_tiles(fm.detach(), queue.detach(), tile):
            cols = cols.to(acc)
            st = (x2 @ cols) * inv_t  # (2B, n)
            s, t = st[:B], st[B:]
            new_s = torch.maximum(m_s, s.amax(1))
            scale_s = torch.exp(m_s - new_s)
            e_s = torch.exp(s - new_s[:, None])
            l_s = l_s * scale_s + e_s.sum(1)
            new_t = torch.maximum(m_t, t.amax(1))
            scale_t = torch.exp(m_t - new_t)
            e_t = torch.exp(t - new_t[:, None])
            l_t = l_t * scale_t + e_t.sum(1)
            w = w * scale_t + (e_t * s).sum(1)
            m_s, m_t = new_s, new_t
            hard = _hard(idx, idx_all, B, j0, s.shape[1], dev).to(acc)
            h = h + (hard * s).sum(1)
            cnt = cnt + hard.sum(1)
            if need_grad:
                o_s = o_s * scale_s[:, None] + e_s @ cols.t()
                o_t = o_t * scale_t[:, None] + e_t @ cols.t()
                o_h = o_h + _hard_cols(hard, cols)
        lse_s, lse_t = m_s + torch.log(l_s), m_t + torch.log(l_t)
        rows = lse_s - alpha * (w / l_t) - (1.0 - alpha) * (h / cnt)
        total = total + rows.mean()
        stats[d, :, 0], stats[d, :, 1], stats[d, :, 2] = lse_s, lse_t, cnt
        if need_grad:
            stats[d, :, 3:] = (
                o_s / l_s[:, None]
                - alpha * (o_t / l_t[:, None])
                - (1.0 - alpha) * (o_h / cnt[:, None])
            )
    return (total / 2).to(image_feat.dtype), stats


def itc_bwd_eager(
    dloss,
    image_feat,
    text_feat,
    image_feat_m,
    text_feat_m,
    image_queue,
    text_queue,
    temp,
    alpha,
    idx,
    idx_queue,
    need_grad,
    stats,
):
    """Backward from the gradient directions G the forward gathered (default kernel of
    itc_bwd): d_x = g·G / temp, d_temp = −g·Σ_i x_i·G_i / temp² with g = dloss / (2B)."""
    if not need_grad:
        raise RuntimeError(
            "itc_bwd: the forward ran with need_grad=False, so stats holds no gradient"
        )
    B, acc = image_feat.shape[0], stats.dtype
    inv_t = 1.0 / temp.detach().to(acc)
    g = dloss.to(acc) / (2 * B)
    grads, d_temp = [], torch.zeros((), dtype=acc, device=image_feat.device)
    for d, x in enumerate((image_feat, text_feat)):
        G = stats[d, :, 3:]
        grads.append((G * (g * inv_t)).to(x.dtype))
        d_temp = d_temp - g * inv_t * inv_t * (x.detach().to(acc) * G).sum()
    return grads[0], grads[1], d_temp.to(temp.dtype).reshape(temp.shape)


for _suffix, (_fwd, _bwd) in _FAMILIES.items():
    lib.define(f"{_fwd}({_ARGS}) -> (Tensor, Tensor)")
    lib.define(f"{_bwd}(Tensor dloss, {_ARGS}, Tensor stats) -> (Tensor, Tensor, Tensor)")
    # Default kernels on every device; _C's TORCH_LIBRARY_IMPL(blip_fast, CPU | CUDA) kernels
    # and the Triton CUDA kernels below take precedence on their device.
    lib.impl(_fwd, itc_fwd_eager, "CompositeExplicitAutograd")
    lib.impl(_bwd, itc_bwd_eager, "CompositeExplicitAutograd")

if _backend._triton_ok():
    from blip_fast.kernels import itc as _k

    lib.impl("itc_fwd_triton", _k.itc_fwd, "CUDA")
    lib.impl("itc_bwd_triton", _k.itc_bwd, "CUDA")
    # The C++ CUDA family has a forward kernel only (csrc/cuda/itc.cu); its backward reuses the
    # Triton kernel (same stats layout; fp32 stats from the CUDA forward).
    lib.impl("itc_bwd", _k.itc_bwd, "CUDA")

else:

    def _no_cuda_bwd(*args):
        raise RuntimeError(
            "blip_fast::itc_bwd on CUDA runs the Triton kernel, and Triton is not "
            "available; use backend='reference'"
        )

    # Without it the eager default would read the gradient columns the CUDA forward leaves at 0.
    lib.impl("itc_bwd", _no_cuda_bwd, "CUDA")

_backend.KERNEL_OPS.setdefault("cpu", {})["itc"] = "itc_fwd"
_backend.KERNEL_OPS.setdefault("triton", {})["itc"] = "itc_fwd_triton"
if _backend._triton_ok():  # the "cuda" backend's backward is the Triton kernel
    _backend.KERNEL_OPS.setdefault("cuda", {})["itc"] = "itc_fwd"


def _fwd_fake(
    image_feat,
    text_feat,
    image_feat_m,
    text_feat_m,
    image_queue,
    text_queue,
    temp,
    alpha,
    idx,
    idx_queue,
    need_grad,
):
    B, D = image_feat.shape
    return (
        image_feat.new_empty(()),
        image_feat.new_empty((2, B, 3 + D), dtype=_acc_dtype(image_feat.dtype)),
    )


def _bwd_fake(
    dloss,
    image_feat,
    text_feat,
    image_feat_m,
    text_feat_m,
    image_queue,
    text_queue,
    temp,
    alpha,
    idx,
    idx_queue,
    need_grad,
    stats,
):
    return (
        torch.empty_like(image_feat, memory_format=torch.contiguous_format),
        torch.empty_like(text_feat, memory_format=torch.contiguous_format),
        torch.empty_like(temp, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    (
        image_feat,
        text_feat,
        image_feat_m,
        text_feat_m,
        image_queue,
        text_queue,
        temp,
        alpha,
        idx,
        idx_queue,
        need_grad,
    ) = inputs
    stats = output[1]
    ctx.mark_non_differentiable(stats)  # auxiliary output for the backward, not a result
    ctx.save_for_backward(
        image_feat,
        text_feat,
        image_feat_m,
        text_feat_m,
        image_queue,
        text_queue,
        temp,
        idx,
        idx_queue,
        stats,
    )
    ctx.alpha, ctx.need_grad = alpha, need_grad


def _make_backward(bwd_name):
    def _backward(ctx, dloss, _dstats):
        (
            image_feat,
            text_feat,
            image_feat_m,
            text_feat_m,
            image_queue,
            text_queue,
            temp,
            idx,
            idx_queue,
            stats,
        ) = ctx.saved_tensors
        d_img, d_txt, d_temp = getattr(torch.ops.blip_fast, bwd_name)(
            dloss,
            image_feat,
            text_feat,
            image_feat_m,
            text_feat_m,
            image_queue,
            text_queue,
            temp,
            ctx.alpha,
            idx,
            idx_queue,
            ctx.need_grad,
            stats,
        )
        # momentum features, queues, alpha and ids get no gradient
        return d_img, d_txt, None, None, None, None, d_temp, None, None, None, None

    return _backward


for _fwd, _bwd in _FAMILIES.values():
    register_family(
        _fwd,
        _bwd,
        fwd_fake=_fwd_fake,
        bwd_fake=_bwd_fake,
        backward=_make_backward(_bwd),
        setup_context=_setup_context,
    )


def itc_loss(
    image_feat,
    text_feat,
    image_feat_m,
    text_feat_m,
    image_queue,
    text_queue,
    temp,
    alpha,
    idx=None,
    idx_queue=None,
    backend=None,
):
    """Scalar ITC loss, both directions averaged; gradients flow to the student features and
    temp. See ``reference.itc_loss`` for the exact math.

    Arguments: image_feat, text_feat: (batch, dim) normalised; image_feat_m, text_feat_m:
    (batch, dim) momentum features of the local batch; image_queue, text_queue: (dim, queue)
    read in place; temp: 0-d tensor; alpha: float; idx: (batch,) image ids and idx_queue:
    (queue,) or (1, queue), or both None (identity targets over the batch part).
    """
    backend = _backend.resolve("itc", image_feat.device, backend)
    if backend == "reference":
        return reference.itc_loss(
            image_feat,
            text_feat,
            image_feat_m,
            text_feat_m,
            image_queue,
            text_queue,
            temp,
            alpha,
            idx,
            idx_queue,
        )
    if (idx is None) != (idx_queue is None):
        raise ValueError("itc_loss: pass both idx and idx_queue, or neither")
    if idx is not None:
        idx, idx_queue = idx.reshape(-1).long(), idx_queue.reshape(-1).long()
    # The fused forward gathers the gradient only when a backward can follow.
    need_grad = torch.is_grad_enabled() and (
        image_feat.requires_grad or text_feat.requires_grad or temp.requires_grad
    )
    op = getattr(torch.ops.blip_fast, _backend.KERNEL_OPS[backend]["itc"])
    return op(
        image_feat,
        text_feat,
        image_feat_m,
        text_feat_m,
        image_queue,
        text_queue,
        temp,
        float(alpha),
        idx,
        idx_queue,
        need_grad,
    )[0]
