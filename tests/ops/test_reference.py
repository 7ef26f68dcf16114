"""Properties of the reference oracle itself (the fast paths are tested against it)."""

import math

import torch

from blip_fast.models import create_model
from blip_fast.ops import reference


def _feats(n, d=16):
    return torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1)


def test_attention_mask_semantics_match_official():
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    pad = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    # causal with a KV cache: 3 queries are the last 3 of 5 positions
    allowed = reference.allowed_mask(pad, True, 3, 5, "cpu")
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed[1, 0], want) and torch.equal(allowed[0, 0], want & pad[0])
    add = reference.additive_mask(pad, True, 3, 5, torch.float32, "cpu")
    assert set(add.unique().tolist()) == {0.0, -10000.0}  # never -20000
    out = reference.attention(q, k, v, pad, causal=True)
    scores = (q @ k.transpose(-1, -2)) / 8**0.5 + add
    torch.testing.assert_close(out, scores.softmax(-1) @ v)


def test_cross_attention_fwd_bwd_pair_matches_autograd():
    q = torch.randn(2, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    pad = torch.rand(2, 7) > 0.3
    pad[:, 0] = True
    out = reference.cross_attention(q, k, v, pad)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    o2, lse = reference.cross_attention_fwd(q, k, v, pad, 8**-0.5)
    torch.testing.assert_close(o2, out)
    got = reference.cross_attention_bwd(dout, q, k, v, pad, o2, lse, 8**-0.5)
    for g, w in zip(got, (dq, dk, dv)):
        torch.testing.assert_close(g, w)


def test_dropout_keep_drops_p_of_the_elements_independently():
    """The fused kernels' dropout mask (the counter hash): a fraction p dropped, within five
    standard deviations over 1.4M elements, for every p trained with; neighbours along each
    axis independent (both kept as often as (1 - p)²); the seed alone decides it."""
    seed = torch.tensor([123456789])
    shape = (48, 4, 35, 197)
    n = math.prod(shape)
    for p in (0.1, 0.5):
        keep = reference.dropout_keep(seed, shape, p)
        assert abs((1 - keep.double().mean().item()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    keep = reference.dropout_keep(seed, shape, 0.1)
    for dim in range(4):
        a, b = keep.narrow(dim, 0, shape[dim] - 1), keep.narrow(dim, 1, shape[dim] - 1)
        both = (a & b).double().mean().item()
        assert abs(both - 0.81) < 5 * math.sqrt(0.81 * 0.19 / a.numel()), dim
    assert torch.equal(keep, reference.dropout_keep(seed.clone(), shape, 0.1))
    assert not torch.equal(keep, reference.dropout_keep(seed + 1, shape, 0.1))


def test_cross_attention_fwd_bwd_pair_with_dropout_matches_autograd():
    """attention_bwd's dropout recurrence (dP through the mask, delta = rowsum(dO ∘ O)) is the
    gradient of attention_fwd with the same mask."""
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64, requires_grad=True) for n in (4, 7, 7))
    seed = torch.tensor([99])
    out, lse = reference.cross_attention_fwd(q, k, v, None, 8**-0.5, 0.3, seed)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), dout)
    got = reference.cross_attention_bwd(dout, q, k, v, None, out, lse, 8**-0.5, 0.3, seed)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_itc_idx_with_unique_ids_equals_identity_targets():
    B, Q = 5, 12
    img, txt, img_m, txt_m = (_feats(B) for _ in range(4))
    iq, tq = _feats(Q).T.contiguous(), _feats(Q).T.contiguous()
    temp = torch.tensor(0.07, dtype=torch.float64)
    a = reference.itc_loss(img, txt, img_m, txt_m, iq, tq, temp, 0.4)
    b = reference.itc_loss(
        img, txt, img_m, txt_m, iq, tq, temp, 0.4, torch.arange(B), torch.full((1, Q), -100)
    )
    torch.testing.assert_close(a, b)


def test_itc_equals_the_official_formula_row_by_row():
    """alpha 0.4 with ids repeated in the batch and the queue: the loss and its gradients equal
    official BLIP's ITC written out one row at a time (hard targets spread evenly over the
    positives listed by hand, mixed with the momentum teacher's softmax at the same temp)."""
    B, Q, alpha = 4, 6, 0.4
    img, txt = _feats(B).requires_grad_(), _feats(B).requires_grad_()
    img_m, txt_m = _feats(B), _feats(B)
    iq, tq = _feats(Q).T.contiguous(), _feats(Q).T.contiguous()
    temp = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    idx, idx_q = torch.tensor([3, 3, 1, 2]), torch.tensor([3, 9, 9, 1, 0, 0])
    # columns [batch ; queue]: rows 0, 1 (id 3) match texts 0, 1 and queue 0; row 2 (id 1)
    # matches text 2 and queue 3; row 3 (id 2) only itself
    positives = [[0, 1, B + 0], [0, 1, B + 0], [2, B + 3], [3]]

    def direction(query, query_m, batch_m, queue):
        columns = torch.cat([batch_m, queue.T])  # (B + Q, D)
        loss = 0
        for i, pos in enumerate(positives):
            hard = torch.zeros(B + Q, dtype=torch.float64)
            hard[pos] = 1 / len(pos)
            teacher = (query_m[i] @ columns.T / temp.detach()).softmax(0)
            target = alpha * teacher + (1 - alpha) * hard
            loss = loss - (target * (query[i] @ columns.T / temp).log_softmax(0)).sum()
        return loss / B

    want = (direction(img, img_m, txt_m, tq) + direction(txt, txt_m, img_m, iq)) / 2
    got = reference.itc_loss(img, txt, img_m, txt_m, iq, tq, temp, alpha, idx, idx_q)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(got, (img, txt, temp))
    for name, g, w in zip(
        ("img", "txt", "temp"), grads, torch.autograd.grad(want, (img, txt, temp))
    ):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)
    assert grads[2].abs() > 0  # the gradient reaches temp


def test_enqueue_writes_gathered_features_at_pointer():
    torch.manual_seed(0)
    m = create_model("retrieval", "blip_tiny", backend="reference")
    q = m.cfg.queue_size
    f_img, f_txt = _feats(16, 32).float(), _feats(16, 32).float()
    idx = torch.arange(16) + 5
    m.enqueue(f_img, f_txt, idx)
    assert int(m.ptr_queue) == 16
    torch.testing.assert_close(m.image_queue[:, :16], f_img.T)
    torch.testing.assert_close(m.text_queue[:, :16], f_txt.T)
    assert m.idx_queue[0, :16].tolist() == idx.tolist() and (m.idx_queue[0, 16:] == -100).all()
    for _ in range(q // 16 - 1):
        m.enqueue(f_img, f_txt, idx)
    assert int(m.ptr_queue) == 0  # wrapped around
