"""Checkpoints: a run SIGKILLed in the middle and resumed ends bit-identical to an
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
    assert_bit_identical(a, b)


def assert_bit_identical(a: dict, b: dict):
    """Two training checkpoints at STEPS: weights, queues and AdamW moments equal to the bit."""
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[i][name], opt_b[i][name]), (i, name)
    assert (a["model"]["idx_queue"] != -100).all()  # the queues were written during training


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


def _wait_for_steps(out_dir, proc, steps: int):
    deadline = time.monotonic() + 300
    while _steps_logged(out_dir) < steps and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def test_ctrl_c_says_where_to_resume_and_leaves_the_checkpoint_whole(tiny_config, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _cmd(tiny_config, tmp_path),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # a runner started in the background (`cmd &`, nohup) hands its children SIGINT
        # ignored, and Python then installs no KeyboardInterrupt: give the run the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_for_steps(tmp_path, proc, 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the run ended before it could be interrupted"
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["global_step"]
    assert saved >= 2
    assert f"{tmp_path / 'checkpoint.pth'} holds step {saved}: continue with --resume auto" in (
        err.decode()
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file


def _worker_pids(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun's agent started (read from /proc)."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, ValueError, IndexError):
            continue
        if parent == agent_pid and b"RANK" in env:
            ranks[int(env[b"RANK"])] = int(entry)
    return ranks


def test_killed_rank_restarts_from_the_checkpoint_and_ends_bit_exact(tiny_config, tmp_path):
    """2 gloo ranks under torchrun --max-restarts 1: SIGKILL rank 1 mid-epoch, torchrun restarts
    both, ``--resume auto`` continues from the last checkpoint, and the run ends bit-identical
    to an uninterrupted one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out_dir):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc_per_node", "2", "--max-restarts", "1", "-m", "blip_fast.cli"]
        return launcher + _cmd(tiny_config, out_dir, "--resume", "auto")[3:]

    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(torchrun(full), env=env, check=True, capture_output=True, timeout=600)
    log = open(tmp_path / "torchrun.log", "w+")  # a pipe left unread while we poll could fill
    proc = subprocess.Popen(torchrun(killed), env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 300  # kill right after the first checkpoint (step 2 of 8)
    while not (killed / "checkpoint.pth").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = _worker_pids(proc.pid)
    assert sorted(workers) == [0, 1], f"torchrun's workers not found: {workers}"
    os.kill(workers[1], signal.SIGKILL)
    restarted = {}
    while proc.poll() is None and not restarted:  # torchrun starts both ranks again
        pids = _worker_pids(proc.pid)
        restarted = pids if sorted(pids) == [0, 1] and workers[0] not in pids.values() else {}
        time.sleep(0.01)
    proc.wait(timeout=600)
    log.seek(0)
    assert proc.returncode == 0, log.read()[-8000:]
    assert restarted, "torchrun did not restart the workers"
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(killed / "checkpoint.pth", weights_only=True)
    assert_bit_identical(a, b)
