"""The training loop shared by every task: epochs of steps, checkpoints, logs, resume.

One step (contrastive tasks): clamp temp, momentum update (m = 0.995), forward of the task
module (DDP- and optionally torch.compile-wrapped), backward, AdamW step, then the gathered
momentum features go into the queues (after the backward pass, which reads them in place).

A step never makes the host wait for the device: its losses and temperature come back as
device tensors, read as numbers when the step is logged. On an asynchronous device that happens
once the next step has been queued behind it, so the device always has the next step's work; on
the CPU a step is finished when it returns and is logged at once.
"""

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from blip_fast.train import checkpoint
from blip_fast.train.data import TrainSampler
from blip_fast.train.distributed import DistInfo
from blip_fast.train.optim import LRSchedule, set_lr


@dataclass
class LoopConfig:
    max_epoch: int
    alpha: float = 0.4
    alpha_ramp: bool = True  # alpha * min(1, step / steps_per_epoch) in epoch 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler)
    compile: bool = False
    save_every: int = 0  # steps between checkpoints (0: epoch ends only)
    seed: int = 0
    max_steps: int = 0  # stop after this many steps in all (0: run every epoch)
    tensorboard: bool = False
    itc_warmup_steps: int = 0  # contrastive tasks: the first N steps train ITC alone


def negative_uniforms(seed: int, rank: int, step: int, batch_size: int) -> torch.Tensor:
    """(2, B) uniforms that draw a step's hard negatives, from (seed, rank, step) alone: the same
    draw eager, compiled or resumed, and in a single-process simulation of the ranks."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + rank) * 1_000_000_007 + step)
    return torch.rand(2, batch_size, generator=g)


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


class Trainer:
    def __init__(
        self,
        task: torch.nn.Module,
        loader,
        sampler: TrainSampler,
        optimizer,
        schedule: LRSchedule,
        cfg: LoopConfig,
        dist_info: DistInfo,
        out_dir,
        run_config: dict | None = None,
    ):
        self.task, self.model = task, task.model
        self.loader, self.sampler, self.optimizer, self.schedule = (
            loader,
            sampler,
            optimizer,
            schedule,
        )
        self.cfg, self.dist, self.out_dir = cfg, dist_info, Path(out_dir)
        self.run_config = run_config or {}
        self.scaler = (
            torch.amp.GradScaler(dist_info.device.type) if cfg.precision == "fp16" else None
        )
        self.contrastive = hasattr(self.model, "momentum_update")
        step_module = task
        if dist_info.world_size > 1:
            # The queues are written identically on every rank: no buffer broadcast (2 x 59 MB
            # per step at the official size).
            step_module = torch.nn.parallel.DistributedDataParallel(
                task,
                device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None,
                broadcast_buffers=False,
                # ITC-only warm-up steps leave the ITM head and decoder without gradients
                find_unused_parameters=cfg.itc_warmup_steps > 0,
            )
        self.step_module = torch.compile(step_module) if cfg.compile else step_module
        self.epoch, self.batch, self.global_step = 0, 0, 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out_dir / "checkpoint.pth"
        self.writer = None
        self.saved_step: int | None = None  # global step of the last checkpoint written or read
        self.unlogged: tuple[dict, dict] | None = None  # (position, stats) of a step not logged
        self.log_one_step_late = dist_info.device.type != "cpu"

    def close(self):
        """Drop the DDP / compiled wrapper (before ``distributed.shutdown``, which says why)."""
        self.step_module = None

    # -- state ---------------------------------------------------------------------------
    def save(self):
        checkpoint.save_training(
            self.ckpt_path,
            model=self.model,
            optimizer=self.optimizer,
            schedule=self.schedule,
            scaler=self.scaler,
            epoch=self.epoch,
            batch=self.batch,
            global_step=self.global_step,
            config=self.run_config,
            is_main=self.dist.is_main,
        )
        self.saved_step = self.global_step

    def resume(self, path):
        pos = checkpoint.load_training(
            path,
            model=self.model,
            optimizer=self.optimizer,
            schedule=self.schedule,
            scaler=self.scaler,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            config=self.run_config,
        )
        self.epoch, self.batch, self.global_step = pos["epoch"], pos["batch"], pos["global_step"]
        self.saved_step = self.global_step

    # -- one step ------------------------------------------------------------------------
    def _alpha(self) -> float:
        if self.cfg.alpha_ramp and self.epoch == 0:
            return self.cfg.alpha * min(1.0, self.batch / self.sampler.batches_per_epoch)
        return self.cfg.alpha

    def step(self, batch: dict) -> dict:
        """One optimisation step; returns its stats: ``lr`` and ``alpha`` as floats, ``temp``
        and the losses as 0-d device tensors (reading them would wait for the device)."""
        dev = self.dist.device
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        lr = self.schedule(self.epoch, self.batch)
        set_lr(self.optimizer, lr)
        stats = {"lr": lr}
        if self.contrastive:
            batch["neg_u"] = negative_uniforms(
                self.cfg.seed, self.dist.rank, self.global_step, batch["image"].shape[0]
            ).to(dev, non_blocking=True)
            batch["alpha"] = stats["alpha"] = self._alpha()
            batch["itc_only"] = self.global_step < self.cfg.itc_warmup_steps
            self.model.clamp_temp()
            stats["temp"] = self.model.temp.detach().clone()  # AdamW updates temp in place
            self.model.momentum_update()
        with _autocast(self.cfg.precision, dev):
            out = self.step_module(batch)
        loss = out["loss"]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.contrastive:
            image_feat_m, text_feat_m, idx = out["queue"]
            self.model.enqueue(
                image_feat_m.float(), text_feat_m.float(), *(() if idx is None else (idx,))
            )
        stats.update({k: v.detach() for k, v in out.items() if k != "queue"})
        return stats

    # -- the loop ------------------------------------------------------------------------
    def _log_unlogged(self) -> dict:
        """Log the step held back in ``self.unlogged`` (its tensors read as numbers now) and
        return its stats; {} when none is held."""
        if self.unlogged is None:
            return {}
        position, stats = self.unlogged
        self.unlogged = None
        stats = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in stats.items()}
        self._log({**position, **stats})
        return stats

    def _log(self, record: dict):
        if not self.dist.is_main:
            return
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, float):
                    self.writer.add_scalar(f"train/{k}", v, record["global_step"])

    def log_evaluation(self, split: str, metrics: dict):
        """Append an evaluation of the model as it stands (``split``'s metrics) to the log."""
        self._log({"global_step": self.global_step, "split": split, **metrics})

    def _done(self) -> bool:
        return bool(self.cfg.max_steps) and self.global_step >= self.cfg.max_steps

    def train(self) -> dict:
        if self.cfg.tensorboard and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.out_dir / "tensorboard")
        self.task.train()
        try:
            stats = self._epochs()
        except KeyboardInterrupt:  # nothing is saved now: the step may be half done
            self._log_unlogged()  # the last whole step
            if self.dist.is_main:
                print(
                    f"interrupted at step {self.global_step}; {self._last_save()}", file=sys.stderr
                )
            raise
        if self.writer is not None:
            self.writer.close()
        return stats

    def _last_save(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written yet"
        return f"{self.ckpt_path} holds step {self.saved_step}: continue with --resume auto"

    def _epochs(self) -> dict:
        stats: dict = {}
        while self.epoch < self.cfg.max_epoch and not self._done():
            self.sampler.set_epoch(self.epoch, self.batch)
            bar = tqdm(
                self.loader,
                desc=f"epoch {self.epoch}",
                file=sys.stderr,
                disable=not (self.dist.is_main and sys.stderr.isatty()),
            )
            t0 = time.perf_counter()
            for batch in bar:
                step_stats = self.step(batch)
                self.batch += 1
                self.global_step += 1
                position = {
                    "epoch": self.epoch,
                    "batch": self.batch,
                    "global_step": self.global_step,
                    "time": time.perf_counter() - t0,
                }
                if self.unlogged is not None:  # the previous step, now that this one is queued
                    stats = self._log_unlogged()
                self.unlogged = (position, step_stats)
                saving = self.cfg.save_every and self.global_step % self.cfg.save_every == 0
                if saving or not self.log_one_step_late:  # a checkpoint's steps are all logged
                    stats = self._log_unlogged()
                if stats:
                    bar.set_postfix(loss=f"{stats['loss']:.3f}")
                if saving:
                    self.save()
                if self._done():
                    break
            stats = self._log_unlogged() or stats
            if self.batch >= self.sampler.batches_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
            self.save()
        return stats
