"""Image-text contrastive loss with momentum distillation and feature queues (BLIP ITC).

Shapes: image_feat / text_feat / image_feat_m / text_feat_m (B, D); image_queue / text_queue
(D, Q) as stored; idx (B,); idx_queue (Q,) or (1, Q).

Ops (schemas here; kernels: the tiled eager implementation below everywhere, C++ from
``blip_fast._C`` on CPU, Triton on CUDA through the ``*_triton`` twins):
    blip_fast::itc_fwd(img, txt, img_m, txt_m, img_queue, txt_queue, temp, alpha, idx?,
                       idx_queue?) -> (loss, stats)
    blip_fast::itc_bwd(dloss, img, txt, img_m, txt_m, img_queue, txt_queue, temp, alpha, idx?,
                       idx_queue?, stats) -> (d_img, d_txt, d_temp)
loss is 0-d in img's dtype; stats (2, 3, B) in the compute dtype (fp64 for fp64 inputs, else
fp32) holds per direction (i2t, t2i) and row: the student log-sum-exp, the teacher log-sum-exp
and the number of hard positives. The columns of direction i2t are [txt_m of the batch ;
txt_queue] (t2i: the image side), visited in tiles, so neither the concatenated columns nor a
(B, B + Q) logit matrix is ever built. With s = x·c / temp (student), t = x_m·c / temp
(teacher, no grad), targets = alpha·softmax(t) + (1 − alpha)·hard, a row's loss is
lse(s) − alpha·Σ softmax(t)·s − (1 − alpha)·Σ hard·s / count, all gathered in one pass with a
running log-sum-exp for s and t. The backward recomputes s and t per tile from the saved lse:
ds = (softmax(s) − targets)·dloss / (2B), d_x = Σ_j ds_j c_j / temp, d_temp = −Σ ds·s / temp.
"""
import torch

from blip_fast.ops import _backend, reference
from blip_fast.ops._library import lib

_ARGS = ("Tensor image_feat, Tensor text_feat, Tensor image_feat_m, Tensor text_feat_m, "
         "Tensor image_queue, Tensor text_queue, Tensor temp, float alpha, Tensor? idx, "
         "Tensor? idx_queue")
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
        yield j0, feat_m[j0:j0 + tile].t()
    for q0 in range(0, Q, tile):
        yield B + q0, queue[:, q0:q0 + tile]


def _directions(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue):
    """(student rows, teacher rows, column feat_m, column queue) for i2t then t2i."""
    return ((image_feat, image_feat_m, text_feat_m, text_queue),
            (text_feat, text_feat_m, image_feat_m, image_queue))


def _hard(idx, idx_all, B, j0, n, device):
    """(B, n) bool hard positives of columns j0..j0+n: eq of ids, or the batch identity."""
    if idx is None:
        return torch.arange(B, device=device)[:, None] == torch.arange(j0, j0 + n, device=device)
    return idx[:, None] == idx_all[j0:j0 + n][None, :]


def itc_fwd_eager(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                  temp, alpha, idx, idx_queue, tile=_TILE):
    """Tiled single-pass forward (default kernel of itc_fwd); returns (loss, stats)."""
    B, acc = image_feat.shape[0], _acc_dtype(image_feat.dtype)
    dev = image_feat.device
    inv_t = 1.0 / temp.detach().to(acc)
    idx_all = None if idx is None else torch.cat([idx.reshape(-1), idx_queue.reshape(-1)])
    stats = torch.empty(2, 3, B, dtype=acc, device=dev)
    total = torch.zeros((), dtype=acc, device=dev)
    for d, (x, xm, fm, queue) in enumerate(_directions(image_feat, text_feat, image_feat_m,
                                                       text_feat_m, image_queue, text_queue)):
        x2 = torch.cat([x.detach(), xm.detach()]).to(acc)  # (2B, D): student and teacher rows
        neg_inf = torch.full((B,), float("-inf"), dtype=acc, device=dev)
        m_s, m_t = neg_inf.clone(), neg_inf.clone()
        l_s, l_t, w, h, cnt = (torch.zeros(B, dtype=acc, device=dev) for _ in range(5))
        for j0, cols in _column_tiles(fm.detach(), queue.detach(), tile):
            st = (x2 @ cols.to(acc)) * inv_t  # (2B, n)
            s, t = st[:B], st[B:]
            new_s = torch.maximum(m_s, s.amax(1))
            l_s = l_s * torch.exp(m_s - new_s) + torch.exp(s - new_s[:, None]).sum(1)
            new_t = torch.maximum(m_t, t.amax(1))
            scale = torch.exp(m_t - new_t)
            e_t = torch.exp(t - new_t[:, None])
            l_t = l_t * scale + e_t.sum(1)
            w = w * scale + (e_t * s).sum(1)
            m_s, m_t = new_s, new_t
            hard = _hard(idx, idx_all, B, j0, s.shape[1], dev).to(acc)
            h = h + (hard * s).sum(1)
            cnt = cnt + hard.sum(1)
        lse_s, lse_t = m_s + torch.log(l_s), m_t + torch.log(l_t)
        rows = lse_s - alpha * (w / l_t) - (1.0 - alpha) * (h / cnt)
        total = total + rows.mean()
        stats[d, 0], stats[d, 1], stats[d, 2] = lse_s, lse_t, cnt
    return (total / 2).to(image_feat.dtype), stats


def itc_bwd_eager(dloss, image_feat, text_feat, image_feat_m, text_feat_m, image_queue,
                  text_queue, temp, alpha, idx, idx_queue, stats, tile=_TILE):
    """Tiled backward (default kernel of itc_bwd): recomputes s, t per tile from stats."""
    B, acc = image_feat.shape[0], _acc_dtype(image_feat.dtype)
    dev = image_feat.device
    inv_t = 1.0 / temp.detach().to(acc)
    g = dloss.to(acc) / (2 * B)
    idx_all = None if idx is None else torch.cat([idx.reshape(-1), idx_queue.reshape(-1)])
    grads, d_temp = [], torch.zeros((), dtype=acc, device=dev)
    for d, (x, xm, fm, queue) in enumerate(_directions(image_feat, text_feat, image_feat_m,
                                                       text_feat_m, image_queue, text_queue)):
        x2 = torch.cat([x.detach(), xm.detach()]).to(acc)
        lse_s, lse_t, cnt = stats[d, 0, :, None], stats[d, 1, :, None], stats[d, 2, :, None]
        dx = torch.zeros(B, x.shape[1], dtype=acc, device=dev)
        for j0, cols in _column_tiles(fm.detach(), queue.detach(), tile):
            cols = cols.to(acc)
            st = (x2 @ cols) * inv_t
            s, t = st[:B], st[B:]
            hard = _hard(idx, idx_all, B, j0, s.shape[1], dev).to(acc)
            ds = (torch.exp(s - lse_s) - alpha * torch.exp(t - lse_t)
                  - (1.0 - alpha) * hard / cnt) * g
            d_temp = d_temp - (ds * s).sum()
            dx = dx + ds @ cols.t()
        grads.append((dx * inv_t).to(x.dtype))
    return grads[0], grads[1], (d_temp * inv_t).to(temp.dtype)


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

for _backend_name in ("cpu", "cuda"):
    _backend.KERNEL_OPS.setdefault(_backend_name, {})["itc"] = "itc_fwd"
_backend.KERNEL_OPS.setdefault("triton", {})["itc"] = "itc_fwd_triton"


def _fwd_fake(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp,
              alpha, idx, idx_queue):
    return (image_feat.new_empty(()),
            image_feat.new_empty((2, 3, image_feat.shape[0]), dtype=_acc_dtype(image_feat.dtype)))


def _bwd_fake(dloss, image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
              temp, alpha, idx, idx_queue, stats):
    return (torch.empty_like(image_feat, memory_format=torch.contiguous_format),
            torch.empty_like(text_feat, memory_format=torch.contiguous_format),
            torch.empty_like(temp, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    (image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
     idx, idx_queue) = inputs
    stats = output[1]
    ctx.mark_non_differentiable(stats)  # auxiliary output for the backward, not a result
    ctx.save_for_backward(image_feat, text_feat, image_feat_m, text_feat_m, image_queue,
                          text_queue, temp, idx, idx_queue, stats)
    ctx.alpha = alpha


def _make_backward(bwd_name):
    def _backward(ctx, dloss, _dstats):
        (image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, idx,
         idx_queue, stats) = ctx.saved_tensors
        d_img, d_txt, d_temp = getattr(torch.ops.blip_fast, bwd_name)(
            dloss, image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
            temp, ctx.alpha, idx, idx_queue, stats)
        # momentum features, queues, alpha and ids get no gradient
        return d_img, d_txt, None, None, None, None, d_temp, None, None, None
    return _backward


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("blip_fast::itc_bwd has no backward: double backward through "
                              "itc_loss is not supported")


for _suffix, (_fwd, _bwd) in _FAMILIES.items():
    torch.library.register_fake(f"blip_fast::{_fwd}", _fwd_fake, lib=lib)
    torch.library.register_fake(f"blip_fast::{_bwd}", _bwd_fake, lib=lib)
    torch.library.register_autograd(f"blip_fast::{_fwd}", _make_backward(_bwd),
                                    setup_context=_setup_context, lib=lib)
    torch.library.register_autograd(f"blip_fast::{_bwd}", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None, lib=lib)


def itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
             temp, alpha, idx=None, idx_queue=None, backend=None):
    """Scalar ITC loss, both directions averaged; gradients flow to the student features and
    temp. See ``reference.itc_loss`` for the exact math.

    Arguments: image_feat, text_feat: (batch, dim) normalised; image_feat_m, text_feat_m:
    (batch, dim) momentum features of the local batch; image_queue, text_queue: (dim, queue)
    read in place; temp: 0-d tensor; alpha: float; idx: (batch,) image ids and idx_queue:
    (queue,) or (1, queue), or both None (identity targets over the batch part).
    """
    backend = _backend.resolve("itc", image_feat.device, backend)
    if backend == "reference":
        return reference.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue,
                                  text_queue, temp, alpha, idx, idx_queue)
    if (idx is None) != (idx_queue is None):
        raise ValueError("itc_loss: pass both idx and idx_queue, or neither")
    if idx is not None:
        idx, idx_queue = idx.reshape(-1).long(), idx_queue.reshape(-1).long()
    op = getattr(torch.ops.blip_fast, _backend.KERNEL_OPS[backend]["itc"])
    return op(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp,
              float(alpha), idx, idx_queue)[0]
