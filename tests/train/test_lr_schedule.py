"""The official learning-rate schedules (BLIP utils.py) at chosen points."""

import math

import pytest

from blip_fast.train.optim import LRSchedule


def test_pretrain_warmup_then_step_decay():
    s = LRSchedule(
        "step",
        init_lr=3e-4,
        min_lr=1e-6,
        max_epoch=20,
        warmup_lr=1e-6,
        warmup_steps=3000,
        lr_decay_rate=0.9,
    )
    assert s(0, 0) == pytest.approx(1e-6)
    assert s(0, 1500) == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)
    assert s(0, 3000) == s(0, 9000) == pytest.approx(3e-4)
    assert s(1, 0) == pytest.approx(3e-4 * 0.9)
    assert s(5, 123) == pytest.approx(3e-4 * 0.9**5)
    assert s(200, 0) == 1e-6  # floor


def test_finetune_cosine_per_epoch():
    s = LRSchedule("cosine", init_lr=1e-5, min_lr=0.0, max_epoch=6)
    assert s(0, 0) == s(0, 500) == pytest.approx(1e-5)
    assert s(3, 0) == pytest.approx(0.5e-5)
    assert s(5, 0) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="'step' or 'cosine'"):
        LRSchedule("linear", 1e-4)


def test_fused_adamw_matches_torch_default_adamw():
    """``build_optimizer`` uses AdamW's fused kernel: after 5 steps on fresh random gradients
    (weight decay, bias correction) the weights equal those of torch's default AdamW, which
    official BLIP runs, within fp32 rounding; momentum copies stay out of it."""
    import torch

    from blip_fast import create_model
    from blip_fast.train.optim import build_optimizer

    torch.manual_seed(0)
    fused_model = create_model("retrieval", "blip_tiny")
    plain_model = create_model("retrieval", "blip_tiny")
    plain_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, 1e-3, 0.05)
    plain = torch.optim.AdamW(
        [q for q in plain_model.parameters() if q.requires_grad],
        lr=1e-3,
        weight_decay=0.05,
        foreach=False,
    )
    assert fused.defaults["fused"] and not any(
        q is r
        for g in fused.param_groups
        for q in g["params"]
        for r in fused_model.visual_encoder_m.parameters()
    )
    init = {k: v.clone() for k, v in fused_model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(fused_model.parameters(), plain_model.parameters()):
            if a.requires_grad:
                a.grad = torch.randn(a.shape, generator=g)
                b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(a, init[name]) != a.requires_grad, name  # trained iff trainable
