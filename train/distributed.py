"""torch.distributed set-up for torchrun (single or multi-node) and the collectives the
objectives need. Without torchrun's environment everything runs as a world of one."""

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from blip_fast.models.blip_base import concat_all_gather

__all__ = [
    "DistInfo",
    "init_distributed",
    "all_gather_with_grad",
    "concat_all_gather",
    "gather_objects",
    "shutdown",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR /
    rendezvous): NCCL on GPUs (one per local rank), gloo on CPU. A plain ``python`` launch is a
    world of one and creates no group."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(want)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return DistInfo(device=dev)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun's agent keeps one store across restarts: without a per-attempt prefix, the
        # workers of a restart read the addresses the killed attempt published (gloo then
        # fails to connect to a dead port)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo",
            store=dist.PrefixStore(f"blip_fast/attempt_{attempt}", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def shutdown():
    """Leave the process group together: a rank that tears down while a peer is still busy
    can leave that peer blocked in its own teardown (seen with gloo). Drop the DDP wrapper
    (``Trainer.close``) first: a Reducer freed at interpreter exit destroys the group with the
    GIL held while a gloo thread may still need it to free a finished all_gather (a deadlock
    seen in CI); freed before the barrier, the group outlives it and the barrier, which waits
    without the GIL, lets those threads finish."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # wrappers already dropped must not be freed after the group
        dist.barrier()
        dist.destroy_process_group()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and returns
    this rank's slice (official BLIP ``GatherLayer``: a negative drawn on another rank sends
    its gradient home)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated in rank order, differentiable; identity in a world of one."""
    if _world() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order, on every rank (small metadata: RNG states...)."""
    if _world() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
