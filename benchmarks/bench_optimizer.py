"""One AdamW step over a model's trainable parameters, same gradients: torch's default AdamW (the
reference: what official BLIP builds; a per-tensor loop on the CPU, ``foreach`` on CUDA),
``foreach=True``, and the fused kernel ``train.optim.build_optimizer`` uses (``fused=True``).

    python -m pytest benchmarks/bench_optimizer.py [--device cuda] [--allow-dirty]

Writes benchmarks/results/optimizer-<device>.json (see conftest.py).
"""

import _harness
import pytest
import torch

from blip_fast import create_model
from blip_fast.train.optim import build_optimizer

SOURCES = ["train/optim.py", *_harness.HARNESS_SOURCES]
BASELINES = ("reference", "foreach")
CONFIG, LR, WEIGHT_DECAY = "blip_demo", 1e-4, 0.05


def cases(device):
    return [{"case": f"{CONFIG} AdamW step", "config": CONFIG}]


def providers(device):
    return ["reference", "foreach", "fused"]


@pytest.fixture(scope="module")
def model(device):
    model = create_model("pretrain", CONFIG).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g, device=device)
    return model


def test_optimizer(case, provider, model, measure):
    params = [p for p in model.parameters() if p.requires_grad]
    if provider == "fused":
        optimizer = build_optimizer(model, LR, WEIGHT_DECAY)
    else:
        foreach = True if provider == "foreach" else None
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=foreach)
    measure(optimizer.step, params=sum(p.numel() for p in params))
