"""The LM head's output projection and label-smoothed cross-entropy as one chunked op (BLIP's
decoder loss). BLIP's head is ``transform`` (dense + GELU + LayerNorm) then ``decoder``, a Linear
tied to the word embeddings plus a bias; only ``decoder`` + cross-entropy are fused here.

Shapes: hidden (N, H) transformed hidden states, weight (V, H), bias (V,) or None, labels (N,)
int64 with -100 = ignored.

Ops (schemas here; kernels: the chunked eager implementation below everywhere, C++ from
``blip_fast._C`` on CPU, Triton on CUDA; there is no CUDA C++ kernel: Triton covers CUDA):
    blip_fast::lm_head_loss_fwd(hidden, weight, bias?, labels, label_smoothing, reduction,
                                need_grad) -> (loss, d_hidden, d_weight, d_bias)
    blip_fast::lm_head_loss_bwd(dloss, hidden, weight, bias?, labels, label_smoothing,
                                reduction) -> (d_hidden, d_weight, d_bias)
and the same pair named *_triton (a second family: both may want the CUDA key). loss is 0-d
('mean', 'sum') or (N,) ('none'), in fp32 (fp64 for fp64 inputs), as ``F.cross_entropy`` on
fp32 logits; the gradients come in the inputs' dtypes.

Math (torch's label smoothing, eps = label_smoothing): with z = h·Wᵀ + b and lse its log-sum-exp,
loss_i = (1 − eps)·(lse − z_y) + eps·(lse − mean_j z_j) and dloss_i/dz = softmax(z) −
(1 − eps)·onehot(y) − eps / V. 'mean' divides by the number of non-ignored rows, so with none it
is NaN (0 / 0) with zero gradients, as torch gives; an ignored row's 'none' loss is 0. A label
outside [0, V) other than -100 is an IndexError naming its position and value.

Algorithm: rows labelled -100 are dropped first (index_select), so they cost nothing; the rest
go through in chunks of rows. Per chunk one GEMM gives its logits (rows, V) in a reused buffer
(about 32 MiB at fp32, never (N, V)); a row kernel turns them into row losses and, for a
gradient, into g_i·dloss_i/dz in place, from which d_hidden rows = dz·W, d_weight += dzᵀ·h and
d_bias += Σ dz. Logits and GEMMs are in the inputs' dtype (what the Linear they replace gives),
the row math in fp32.

Gradient: with need_grad and a 0-d loss ('mean' / 'sum'), the forward gathers the gradients in
the same pass (g_i = 1 / count or 1; Liger's fused linear cross-entropy: 3 GEMMs per chunk
instead of the 4 of a backward that recomputes the logits), and the backward scales them by
dloss. That holds d_weight (V, H) from the forward to the backward, whose scaling makes a second
one (scaling in place would break retain_graph and AOT autograd): at 64 x 35 tokens on the CPU
fwd + bwd took 0.64 s and ~320 MiB this way, 0.82 s and ~170 MiB recomputing, 1.25 s and
~820 MiB unfused (benchmarks/bench_lm_head_loss.py). 'none' gets a different upstream gradient
per row, which d_weight mixes, so its backward (lm_head_loss_bwd, g_i = dloss_i) recomputes the
logits chunk by chunk.
"""

import torch

from blip_fast.ops import _backend, reference
from blip_fast.ops._library import lib, register_family

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")
_ARGS = (
    "Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, float label_smoothing, "
    "str reduction"
)
# Logit elements per chunk: 2^23 (32 MiB of fp32) is 274 rows at V = 30524. One fp32 forward
# gathering the gradients at BLIP's 64 x 35 tokens (1306 rows kept, H = 768; the eager kernel,
# best of 6 on 2 shared Xeon cores) took 4.8 s in chunks of 34 rows, 3.4 at 68, 2.6 at 137,
# 2.1 at 274, 2.1 at 549 and 2.0 unchunked: past ~256 rows the GEMMs are BLAS-bound.
_CHUNK_ELEMENTS = 1 << 23
# Two op families because both may want the CUDA key: lm_head_loss_fwd / _bwd get the C++ CPU
# kernels from _C, the *_triton pair the Triton chunk kernel of blip_fast.kernels.lm_head_loss.
_FAMILIES = {
    "": ("lm_head_loss_fwd", "lm_head_loss_bwd"),
    "_triton": ("lm_head_loss_fwd_triton", "lm_head_loss_bwd_triton"),
}


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab`` (the C++ kernel uses the same rule)."""
    return max(16, _CHUNK_ELEMENTS // max(vocab, 1))


def check_inputs(hidden, weight, bias, labels, label_smoothing, reduction):
    """Shape, dtype and argument errors naming the argument at fault."""
    op = "lm_head_loss"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden must be (N, H) and weight (V, H); got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if tuple(labels.shape) != (hidden.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(
            f"{op}: labels must be int64 of shape (N,) = ({hidden.shape[0]},), got "
            f"{labels.dtype} {tuple(labels.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but hidden has {hidden.dtype}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def kept_rows(labels, vocab: int):
    """(n,) indices of the rows whose label is not -100 and their labels; a label outside
    [0, vocab) is an IndexError naming the first such position and its value."""
    keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    kept = labels.index_select(0, keep)
    bad = ((kept < 0) | (kept >= vocab)).nonzero()
    if bad.numel():
        i = int(keep[bad[0, 0]])
        raise IndexError(
            f"lm_head_loss: labels[{i}] = {int(labels[i])} is outside the vocabulary "
            f"[0, {vocab}) (-100 marks an ignored row)"
        )
    return keep, kept


def ce_chunk_eager(logits, labels, label_smoothing, grad_scale):
    """Row losses (rows,) in fp32 (fp64) of a logits chunk (rows, V) with labels (rows,) in
    [0, V); with grad_scale (rows,), grad_scale_i · dloss_i/dz written over the logits."""
    eps, V = label_smoothing, logits.shape[1]
    z = logits.to(_acc_dtype(logits.dtype))  # the chunk itself for fp32 / fp64
    lse = torch.logsumexp(z, 1)
    loss = lse - (1.0 - eps) * z.gather(1, labels[:, None]).squeeze(1) - eps * z.mean(1)
    if grad_scale is not None:
        z.sub_(lse[:, None]).exp_().sub_(eps / V)
        z.scatter_add_(1, labels[:, None], z.new_full((z.shape[0], 1), eps - 1.0))
        z.mul_(grad_scale[:, None])
        if z is not logits:
            logits.copy_(z)
    return loss


def chunked(hidden, weight, bias, labels, label_smoothing, grad_scale, ce_chunk):
    """Row losses (N,) in fp32 (fp64) (0 at ignored rows) and, with grad_scale (N,), the
    gradients of Σ_i grad_scale_i · loss_i: d_hidden (N, H), d_weight (V, H), d_bias (V,) or
    None, in the inputs' dtypes. ``ce_chunk`` is ``ce_chunk_eager`` or the Triton launcher."""
    (N, H), V = hidden.shape, weight.shape[0]
    acc, dev = _acc_dtype(hidden.dtype), hidden.device
    keep, y = kept_rows(labels, V)
    h = hidden.index_select(0, keep)
    n, rows = h.shape[0], chunk_rows(V)
    loss = torch.empty(n, dtype=acc, device=dev)
    need_grad = grad_scale is not None
    if need_grad:
        g = grad_scale.to(acc).index_select(0, keep)
        d_h = torch.empty(n, H, dtype=hidden.dtype, device=dev)
        d_w = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        d_b = torch.zeros(V, dtype=acc, device=dev)
    buf = torch.empty(min(n, rows) * V, dtype=hidden.dtype, device=dev)
    for r0 in range(0, n, rows):
        hc = h[r0 : r0 + rows]
        z = buf[: hc.shape[0] * V].view(hc.shape[0], V)
        if bias is None:
            torch.mm(hc, weight.t(), out=z)
        else:
            torch.addmm(bias, hc, weight.t(), out=z)
        loss[r0 : r0 + rows] = ce_chunk(
            z, y[r0 : r0 + rows], label_smoothing, g[r0 : r0 + rows] if need_grad else None
        )
        if need_grad:
            torch.mm(z, weight, out=d_h[r0 : r0 + rows])
            d_w.addmm_(z.t(), hc)
            if bias is not None:
                d_b += z.sum(0, dtype=acc)
    row_loss = torch.zeros(N, dtype=acc, device=dev).index_copy_(0, keep, loss)
    if not need_grad:
        return row_loss, None
    d_hidden = torch.zeros(N, H, dtype=hidden.dtype, device=dev).index_copy_(0, keep, d_h)
    return row_loss, (d_hidden, d_w, None if bias is None else d_b.to(bias.dtype))


def _count(labels):
    return (labels != IGNORE_INDEX).sum()


def _row_scale(dloss, labels, reduction, acc):
    """(N,) d(reduced loss)/d(row loss) times the upstream gradient dloss."""
    if reduction == "none":
        return dloss.to(acc)
    g = dloss.to(acc).reshape(()).expand(labels.shape[0])
    return g / _count(labels).clamp(min=1) if reduction == "mean" else g


def _empty(x):
    return x.new_empty(0)


def kernels_with(ce_chunk):
    """The (forward, backward) kernels of the op pair over the chunk kernel ``ce_chunk``."""

    def fwd(hidden, weight, bias, labels, label_smoothing, reduction, need_grad):
        check_inputs(hidden, weight, bias, labels, label_smoothing, reduction)
        acc = _acc_dtype(hidden.dtype)
        scale = None
        if need_grad and reduction != "none":  # gather the gradients of the loss itself
            one = torch.ones((), dtype=acc, device=hidden.device)
            scale = _row_scale(one, labels, reduction, acc)
        rows, grads = chunked(hidden, weight, bias, labels, label_smoothing, scale, ce_chunk)
        if reduction == "none":
            loss = rows
        else:  # 'mean' over no rows is 0 / 0 = NaN, as torch gives
            loss = rows.sum() / _count(labels) if reduction == "mean" else rows.sum()
        if grads is None:
            return loss, _empty(hidden), _empty(weight), _empty(hidden)
        d_hidden, d_weight, d_bias = grads
        return loss, d_hidden, d_weight, _empty(hidden) if d_bias is None else d_bias

    def bwd(dloss, hidden, weight, bias, labels, label_smoothing, reduction):
        check_inputs(hidden, weight, bias, labels, label_smoothing, reduction)
        scale = _row_scale(dloss, labels, reduction, _acc_dtype(hidden.dtype))
        _, (d_hidden, d_weight, d_bias) = chunked(
            hidden, weight, bias, labels, label_smoothing, scale, ce_chunk
        )
        return d_hidden, d_weight, _empty(hidden) if d_bias is None else d_bias

    return fwd, bwd


_eager_fwd, _eager_bwd = kernels_with(ce_chunk_eager)
for _fwd, _bwd in _FAMILIES.values():
    lib.define(f"{_fwd}({_ARGS}, bool need_grad) -> (Tensor, Tensor, Tensor, Tensor)")
    lib.define(f"{_bwd}(Tensor dloss, {_ARGS}) -> (Tensor, Tensor, Tensor)")
    # Default kernels on every device; _C's CPU kernels and the Triton CUDA kernels below take
    # precedence on their device.
    lib.impl(_fwd, _eager_fwd, "CompositeExplicitAutograd")
    lib.impl(_bwd, _eager_bwd, "CompositeExplicitAutograd")

if _backend._triton_ok():
    from blip_fast.kernels import lm_head_loss as _k

    _triton_fwd, _triton_bwd = kernels_with(_k.lm_head_loss_chunk)
    lib.impl("lm_head_loss_fwd_triton", _triton_fwd, "CUDA")
    lib.impl("lm_head_loss_bwd_triton", _triton_bwd, "CUDA")

_backend.KERNEL_OPS.setdefault("cpu", {})["lm_head_loss"] = "lm_head_loss_fwd"
_backend.KERNEL_OPS.setdefault("triton", {})["lm_head_loss"] = "lm_head_loss_fwd_triton"


def _fwd_fake(hidden, weight, bias, labels, label_smoothing, reduction, need_grad):
    acc = _acc_dtype(hidden.dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=acc)
    if not (need_grad and reduction != "none"):
        return loss, _empty(hidden), _empty(weight), _empty(hidden)
    d_bias = _empty(hidden) if bias is None else bias.new_empty(bias.shape)
    return loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), d_bias


def _bwd_fake(dloss, hidden, weight, bias, labels, label_smoothing, reduction):
    d_bias = _empty(hidden) if bias is None else bias.new_empty(bias.shape)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), d_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, label_smoothing, reduction, need_grad = inputs
    _, d_hidden, d_weight, d_bias = output
    ctx.mark_non_differentiable(d_hidden, d_weight, d_bias)  # outputs for the backward
    ctx.gathered = need_grad and reduction != "none"
    if ctx.gathered:
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
    else:  # the backward recomputes
        ctx.save_for_backward(hidden, weight, bias, labels)
    ctx.has_bias, ctx.label_smoothing, ctx.reduction = bias is not None, label_smoothing, reduction


def _make_backward(bwd_name):
    def _backward(ctx, dloss, _d_hidden, _d_weight, _d_bias):
        if ctx.gathered:  # gradients of the loss itself, gathered by the forward
            d_hidden, d_weight, d_bias = (g * dloss.to(g.dtype) for g in ctx.saved_tensors)
        else:
            hidden, weight, bias, labels = ctx.saved_tensors
            d_hidden, d_weight, d_bias = getattr(torch.ops.blip_fast, bwd_name)(
                dloss, hidden, weight, bias, labels, ctx.label_smoothing, ctx.reduction
            )
        # labels, label_smoothing, reduction and need_grad get no gradient
        return d_hidden, d_weight, d_bias if ctx.has_bias else None, None, None, None, None

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


def lm_head_loss(hidden, weight, bias, labels, label_smoothing=0.0, reduction="mean", backend=None):
    """Cross-entropy of the logits hidden·weightᵀ + bias against labels without forming the
    (N, V) logits; gradients flow to hidden, weight and bias. See ``reference.lm_head_loss``
    for the exact math and the module docstring for the algorithm.

    Arguments: hidden: (tokens, hidden_size); weight: (vocab, hidden_size); bias: (vocab,) or
    None; labels: (tokens,) int64, -100 = ignored; label_smoothing: float in [0, 1];
    reduction: 'mean' (over non-ignored tokens), 'sum' or 'none' (per token). Under autocast
    the GEMMs run in the autocast dtype, as the Linear this replaces would.
    """
    backend = _backend.resolve("lm_head_loss", hidden.device, backend)
    if backend == "reference":
        return reference.lm_head_loss(hidden, weight, bias, labels, label_smoothing, reduction)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    op = getattr(torch.ops.blip_fast, _backend.KERNEL_OPS[backend]["lm_head_loss"])
    return op(hidden, weight, bias, labels, float(label_smoothing), reduction, need_grad)[0]
