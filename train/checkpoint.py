"""Training checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint holds the model state (online and momentum weights, queues and their pointer),
optimiser, LR schedule, grad scaler, the RNG states of every rank and the data position
(epoch, next batch). It is written to a temporary file in the same folder, flushed to disk and
renamed over the previous one (``os.replace`` is atomic on POSIX), so a crash mid-write leaves
the last good checkpoint in place. It loads with ``torch.load(weights_only=True)``.
"""

import errno
import os
import random
import shutil
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
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        kept = "the previous file is kept" if path.exists() else "nothing was written"
        raise OSError(f"cannot write {path}: {_write_failure(err, path.parent)}; {kept}") from err
    finally:
        if tmp.exists():  # (unlink(missing_ok=True) raises EROFS on a read-only file system)
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself reaches the disk
    finally:
        os.close(dir_fd)


def _write_failure(err: Exception, folder: Path) -> str:
    """What stopped a write, in words: torch's writer hides the errno of a full disk."""
    code = getattr(err, "errno", None)
    if code == errno.EROFS:
        return f"{folder} is on a read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return f"no permission to write in {folder}"
    free = shutil.disk_usage(folder).free if folder.is_dir() else None
    if code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 1 << 20):
        return f"the disk is full ({free} bytes free in {folder})"
    return str(err)


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


# What a training checkpoint holds beyond the weights, and the run settings that must match for
# the resumed run to continue exactly (the model, and the data order: samples per step).
TRAINING_KEYS = ("model", "optimizer", "schedule", "rng", "epoch", "batch", "global_step", "config")
SAME_ON_RESUME = ("task", "model", "vit", "image_size", "embed_dim", "queue_size", "batch_size",
                  "batch_size_train", "train_file", "train_shards")  # fmt: skip


def check_resumable(path, ckpt, config: dict) -> None:
    """Raise, naming what differs, unless ``ckpt`` is a training checkpoint of ``config``'s run."""
    missing = [k for k in TRAINING_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(
            f"{path} is not a training checkpoint (no {', '.join(map(repr, missing))}): to start "
            f"from its weights, give it as 'pretrained=' instead of resuming"
        )
    for key in SAME_ON_RESUME:
        old, new = ckpt["config"].get(key), config.get(key)
        if old != new:
            raise ValueError(
                f"{path}: {key} was {old!r} when it was written and is {new!r} now; an exact "
                f"resume needs the same {key} (start a new output directory to change it)"
            )


def load_training(
    path, *, model, optimizer, schedule, scaler, rank: int, world_size: int, config: dict
) -> dict:
    """Restore the states in place; returns the position {epoch, batch, global_step}.
    ``config`` is this run's, checked against the one the checkpoint was written with."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    check_resumable(path, ckpt, config)
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
