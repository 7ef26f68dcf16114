"""``--compile`` (issue 6): the torch.compile'd training step runs on the CPU and matches the
eager step within 1e-5 after a few steps."""

import torch
from _utils import assert_trained_states_close
from torch import nn

from blip_fast.train.main import build_trainer

STEPS = 3


def _no_dropout(model):
    """Dropout off: a compiled graph may draw its masks in another order than eager (and
    inductor uses its own RNG), so only the deterministic math can be compared."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0


def _train(cfg, out_dir, compile: bool) -> dict:
    trainer = build_trainer(
        "retrieval", cfg, out_dir, num_workers=0, max_steps=STEPS, compile=compile, seed=5
    )
    _no_dropout(trainer.model)
    trainer.train()
    return trainer.model.state_dict()


def test_compiled_step_matches_eager(tiny_config, tmp_path):
    torch._dynamo.reset()
    compiled = _train(tiny_config, tmp_path / "compiled", compile=True)
    eager = _train(tiny_config, tmp_path / "eager", compile=False)
    init = build_trainer(
        "retrieval", tiny_config, tmp_path / "init", num_workers=0, seed=5
    ).model.state_dict()
    moved = assert_trained_states_close(compiled, eager, init, atol=1e-5)
    assert moved > 100  # the steps changed the weights
