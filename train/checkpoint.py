"""Training checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint holds the model state (online and momentum weights, queues and their pointer),
optimiser, LR schedule, grad scaler, the RNG states of every rank and the data position
(epoch, next batch). It is written to a temporary file in the same folder, flushed to disk and
renamed over the previous one (``os.replace`` is atomic on POSIX), so a crash mid-write leaves
the last good checkpoint in place. It loads with ``torch.load(weights_only=True)``.
"""

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from blip_fast.train.distributed import gather_objects


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]):
    """``write(f)`` into a temporary file beside ``path``, flushed to disk, then renamed over
    ``path``: readers (and a resumed run) see the old file or the whole new one, never a torn
    one; a failure leaves the old file and no temporary one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself reaches the disk
    finally:
        os.close(dir_fd)


def save_atomic(obj, path: str | os.PathLike):
    atomic_write(path, lambda f: torch.save(obj, f))


def save_training(
    path,
    *,
    model,
    optimizer,
    schedule,
    scaler,
    epoch: int,
    batch: int,
    global_step: int,
    config: dict,
    is_main: bool,
):
    """Collective (every rank's RNG state is gathered); rank 0 writes."""
    rngs = gather_objects(rng_state())
    if not is_main:
        return
    save_atomic(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rngs,
            "epoch": epoch,
            "batch": batch,
            "global_step": global_step,
            "config": config,
        },
        path,
    )


def load_training(path, *, model, optimizer, schedule, scaler, rank: int, world_size: int) -> dict:
    """Restore the states in place; returns the position {epoch, batch, global_step}."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if len(ckpt["rng"]) != world_size:
        raise ValueError(
            f"{path}: written by {len(ckpt['rng'])} ranks, resumed with "
            f"{world_size}; an exact resume needs the same world size"
        )
    if ckpt["schedule"] != schedule.state_dict():
        raise ValueError(
            f"{path}: LR schedule {ckpt['schedule']} differs from this run's "
            f"{schedule.state_dict()}"
        )
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][rank])
    return {k: ckpt[k] for k in ("epoch", "batch", "global_step")}
