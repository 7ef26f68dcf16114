"""``--compile``: the torch.compile'd training step runs on the CPU and matches the
eager step within 1e-5 after a few steps."""

import torch
from _utils import assert_trained_states_close, largest_gradients, rounding_noise_elements
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


class _CastImages:
    """The trainer's loader with images in ``dtype`` (the float64 run)."""

    def __init__(self, loader, dtype):
        self.loader, self.dtype = loader, dtype

    def __iter__(self):
        for batch in self.loader:
            yield {**batch, "image": batch["image"].to(self.dtype)}


def _train(cfg, out_dir, compile: bool, dtype=torch.float32) -> tuple[dict, dict]:
    """The trained state and ``largest_gradients`` of STEPS steps."""
    trainer = build_trainer(
        "retrieval", cfg, out_dir, num_workers=0, max_steps=STEPS, compile=compile, seed=5
    )
    _no_dropout(trainer.model)
    trainer.model.to(dtype)
    trainer.loader = _CastImages(trainer.loader, dtype)
    with largest_gradients(trainer.model) as grads:
        trainer.train()
    return trainer.model.state_dict(), grads


def test_compiled_step_matches_eager(tiny_config, tmp_path):
    torch._dynamo.reset()
    compiled, _ = _train(tiny_config, tmp_path / "compiled", compile=True)
    eager, eager_gradients = _train(tiny_config, tmp_path / "eager", compile=False)
    _, exact_gradients = _train(tiny_config, tmp_path / "fp64", False, torch.float64)
    model = build_trainer("retrieval", tiny_config, tmp_path / "init", num_workers=0, seed=5).model
    noise = rounding_noise_elements(model, exact_gradients, eager_gradients)
    moved = assert_trained_states_close(compiled, eager, model.state_dict(), noise=noise, atol=1e-5)
    assert moved > 100  # the steps changed the weights
