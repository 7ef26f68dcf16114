"""The official learning-rate schedules (BLIP utils.py) at chosen points."""
import math

import pytest

from blip_fast.train.optim import LRSchedule


def test_pretrain_warmup_then_step_decay():
    s = LRSchedule("step", init_lr=3e-4, min_lr=1e-6, max_epoch=20, warmup_lr=1e-6,
                   warmup_steps=3000, lr_decay_rate=0.9)
    assert s(0, 0) == pytest.approx(1e-6)
    assert s(0, 1500) == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)
    assert s(0, 3000) == s(0, 9000) == pytest.approx(3e-4)
    assert s(1, 0) == pytest.approx(3e-4 * 0.9)
    assert s(5, 123) == pytest.approx(3e-4 * 0.9 ** 5)
    assert s(200, 0) == 1e-6  # floor


def test_finetune_cosine_per_epoch():
    s = LRSchedule("cosine", init_lr=1e-5, min_lr=0.0, max_epoch=6)
    assert s(0, 0) == s(0, 500) == pytest.approx(1e-5)
    assert s(3, 0) == pytest.approx(0.5e-5)
    assert s(5, 0) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="'step' or 'cosine'"):
        LRSchedule("linear", 1e-4)
