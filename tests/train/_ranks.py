"""Shared by the distributed-training test and its torchrun worker: the model, the per-rank
batches and the loop settings, so both sides build exactly the same run."""

import dataclasses

import torch

from blip_fast import create_model
from blip_fast.models.configs import BlipConfig
from blip_fast.train.loop import LoopConfig

WORLD, STEPS, BATCH, SEED, LR = 2, 4, 4, 3, 2e-4
ITC_WARMUP = 1  # step 0 trains ITC alone: DDP must cope with the ITM head's missing gradient


def make_model():
    cfg = BlipConfig.preset("blip_tiny")
    # no dropout: each rank's dropout stream could not be replayed in one process
    text = dataclasses.replace(cfg.text, hidden_dropout=0.0, attention_dropout=0.0)
    # queue of 16 = 2 steps of the global batch 8: the test sees it wrap around
    cfg = dataclasses.replace(cfg, text=text, queue_size=16, negative_all_rank=True)
    torch.manual_seed(0)
    model = create_model("retrieval", cfg)
    model.copy_params()
    return model


def batch(rank: int, step: int) -> dict:
    """Rank ``rank``'s batch at ``step``: random pixels, token ids with ragged padding, and
    image ids from a small range so positives repeat within and across ranks."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    L = 12
    ids = torch.randint(1000, 5000, (BATCH, L), generator=g)
    ids[:, 0] = 101
    lengths = torch.randint(4, L + 1, (BATCH,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    return {
        "image": torch.randn(BATCH, 3, 64, 64, generator=g),
        "ids": ids * mask,
        "mask": mask,
        "idx": torch.randint(0, 6, (BATCH,), generator=g),
    }


def loop_config() -> LoopConfig:
    return LoopConfig(
        max_epoch=1, alpha=0.4, alpha_ramp=False, seed=SEED, itc_warmup_steps=ITC_WARMUP
    )
