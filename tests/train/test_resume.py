"""Checkpoints (issue 6): a run SIGKILLed in the middle and resumed ends bit-identical to an
uninterrupted run; a checkpoint write that dies half-way never replaces the good one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from blip_fast.train import checkpoint

STEPS = 8


def _cmd(cfg: dict, out_dir, *extra):
    overrides = [f"{k}={json.dumps(v)}" for k, v in cfg.items()]
    return [
        sys.executable,
        "-m",
        "blip_fast.cli",
        "train",
        "retrieval",
        *overrides,
        "--output-dir",
        str(out_dir),
        "--num-workers",
        "0",
        "--save-every",
        "2",
        "--max-steps",
        str(STEPS),
        "--seed",
        "7",
        *extra,
    ]


def _steps_logged(out_dir) -> int:
    try:
        return sum(1 for _ in open(out_dir / "log.jsonl"))
    except FileNotFoundError:
        return 0


def test_sigkill_then_resume_is_bit_exact(tiny_config, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(tiny_config, full), env=env, check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(
        _cmd(tiny_config, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while _steps_logged(killed) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = torch.load(killed / "checkpoint.pth", weights_only=True)
    assert 2 <= saved["global_step"] < STEPS  # killed in the middle, after a checkpoint

    subprocess.run(
        _cmd(tiny_config, killed, "--resume", "auto"),
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(killed / "checkpoint.pth", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[i][name], opt_b[i][name]), (i, name)
    # the queues were written during training (the pointer moved on from 0)
    assert int(a["model"]["ptr_queue"]) == (STEPS * 4) % 16


def test_checkpoint_dying_mid_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    checkpoint.save_atomic({"step": torch.tensor(1)}, path)

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temp file left


@pytest.fixture()
def mount_tmpfs(tmp_path):
    """Mounts a tmpfs with the given options (a real full or read-only disk); needs root, which
    CI runs as."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(options: str):
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_is_named_and_the_last_checkpoint_kept(mount_tmpfs):
    disk = mount_tmpfs("size=256k")
    path = disk / "checkpoint.pth"
    checkpoint.save_atomic({"step": torch.tensor(1)}, path)
    with pytest.raises(OSError, match=rf"cannot write {path}: the disk is full \(\d+ bytes free "
                       rf"in {disk}\); the previous file is kept"):  # fmt: skip
        checkpoint.save_atomic({"weights": torch.randn(1 << 17)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in disk.iterdir()] == ["checkpoint.pth"]


def test_read_only_output_is_named(mount_tmpfs):
    disk = mount_tmpfs("ro,size=64k")
    with pytest.raises(OSError, match=rf"{disk} is on a read-only file system; nothing was"):
        checkpoint.save_atomic({"step": torch.tensor(1)}, disk / "checkpoint.pth")


def test_resume_with_another_world_size_is_refused(tiny_config, tmp_path):
    from blip_fast.train.main import build_trainer

    trainer = build_trainer("retrieval", tiny_config, tmp_path, num_workers=0, max_steps=1)
    trainer.train()
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    ckpt["rng"].append(ckpt["rng"][0])
    torch.save(ckpt, tmp_path / "two_ranks.pth")
    with pytest.raises(ValueError, match="written by 2 ranks, resumed with 1"):
        trainer.resume(tmp_path / "two_ranks.pth")


def test_resume_with_another_batch_size_or_a_weights_file_is_refused(tiny_config, tmp_path):
    from blip_fast.train.main import build_trainer

    build_trainer("retrieval", tiny_config, tmp_path, num_workers=0, max_steps=1).train()
    ckpt = tmp_path / "checkpoint.pth"
    smaller = {**tiny_config, "batch_size_train": 2}
    with pytest.raises(ValueError, match="batch_size_train was 4 when it was written and is 2 now"):
        build_trainer("retrieval", smaller, tmp_path / "b2", num_workers=0, resume=ckpt)
    with pytest.raises(ValueError, match="task was 'retrieval' when it was written and is 'pre"):
        build_trainer("pretrain", tiny_config, tmp_path / "pt", num_workers=0, resume=ckpt)
    weights = tmp_path / "weights.pth"
    torch.save({"model": torch.load(ckpt, weights_only=True)["model"]}, weights)
    with pytest.raises(ValueError, match=r"weights.pth is not a training checkpoint \(no "
                       r"'optimizer', 'schedule', 'rng'.*give it as 'pretrained='"):  # fmt: skip
        build_trainer("retrieval", tiny_config, tmp_path / "w", num_workers=0, resume=weights)
