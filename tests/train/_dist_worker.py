"""torchrun worker of test_distributed_training.py: STEPS real DDP steps on gloo, then rank 0
saves the model state to argv[1]."""

import sys

import torch

from blip_fast.train.distributed import init_distributed, shutdown
from blip_fast.train.loop import Trainer
from blip_fast.train.optim import LRSchedule, build_optimizer
from blip_fast.train.task import ContrastiveTask

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import _ranks  # noqa: E402


def main(out):
    info = init_distributed("cpu")
    assert info.world_size == _ranks.WORLD, info
    model = _ranks.make_model()
    trainer = Trainer(
        ContrastiveTask(model, negative_all_rank=True),
        None,
        None,
        build_optimizer(model, _ranks.LR),
        LRSchedule("cosine", _ranks.LR),
        _ranks.loop_config(),
        info,
        out + ".d",
    )
    for step in range(_ranks.STEPS):
        trainer.step(_ranks.batch(info.rank, step))
        trainer.global_step += 1
    if info.is_main:
        torch.save(model.state_dict(), out)
    trainer.close()
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
