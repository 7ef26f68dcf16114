"""The fast training step converges as the official one does: 60 pre-training steps (ITC + ITM
+ LM) of the demo model from the same init and data, every op on its reference kernel and every
speed lever off (``StepLevers.official``) against the defaults, on the CPU in fp32."""

import json

import pytest

from blip_fast.train.main import StepLevers, build_trainer

STEPS = 60
BATCH = 8


def _losses(synthetic_train, out_dir, backend=None, levers=None, precision="fp32") -> list[dict]:
    """Each step's logged losses, training as ``blip-fast demo`` does: its hyper-parameters
    (blip_fast.cli), full steps from the first, seed 0."""
    y = {
        "model": "blip_demo",
        "train_file": str(synthetic_train["train"]),
        "image_root": str(synthetic_train["root"]),
        "batch_size": BATCH,
        "init_lr": 5e-4,
        "warmup_lr": 1e-6,
        "warmup_steps": 3,
        "lr_decay_rate": 1.0,
        "max_epoch": 1000,
        "momentum": 0.97,
        "train_augment": False,
        "queue_size": BATCH,
    }
    trainer = build_trainer(
        "pretrain",
        y,
        out_dir,
        num_workers=0,
        max_steps=STEPS,
        seed=0,
        backend=backend,
        levers=levers or StepLevers(),
        precision=precision,
    )
    trainer.train()
    trainer.close()
    return [json.loads(line) for line in open(out_dir / "log.jsonl")]


def test_fast_and_official_steps_agree_within_2_percent_for_60_steps(synthetic_train, tmp_path):
    official = _losses(synthetic_train, tmp_path / "official", "reference", StepLevers.official())
    fast = _losses(synthetic_train, tmp_path / "fast", None, StepLevers())
    assert len(official) == len(fast) == STEPS
    for step, (o, f) in enumerate(zip(official, fast)):
        for key in ("itc", "itm", "lm", "loss"):
            assert f[key] == pytest.approx(o[key], rel=0.02), f"step {step} {key}"
    # the run learned something, so agreement is not two flat lines
    assert official[-1]["itc"] < 0.8 * official[0]["itc"]
