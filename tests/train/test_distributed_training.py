"""A 2-process gloo run under torchrun equals a single-process simulation of the same two ranks:
same per-rank batches, gradients averaged, queues written with the gathered momentum features
in rank order, ITM hard negatives drawn from both ranks; the first step trains ITC alone
(``itc_warmup_steps``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _utils import assert_trained_states_close, largest_gradients, rounding_noise_elements

from blip_fast.train.loop import negative_uniforms
from blip_fast.train.optim import build_optimizer
from blip_fast.train.task import ContrastiveTask

sys.path.insert(0, str(Path(__file__).parent))
import _ranks  # noqa: E402

HERE = Path(__file__).parent


def simulate(dtype: torch.dtype) -> tuple[dict, dict]:
    """The two ranks' steps in one process: each rank encodes its batch, the 'gathers' are
    concatenations, the loss is the mean of the ranks' losses (DDP averages gradients).
    Returns the trained state and ``largest_gradients`` of the run."""
    model = _ranks.make_model().to(dtype)
    task = ContrastiveTask(model, negative_all_rank=True).train()
    opt = build_optimizer(model, _ranks.LR)
    with largest_gradients(model) as grads:
        for step in range(_ranks.STEPS):
            batches = [_ranks.batch(r, step) for r in range(_ranks.WORLD)]
            for r, b in enumerate(batches):
                b["image"] = b["image"].to(dtype)
                b["alpha"] = 0.4
                b["neg_u"] = negative_uniforms(_ranks.SEED, r, step, _ranks.BATCH)
                b["itc_only"] = step < _ranks.ITC_WARMUP
            model.clamp_temp()
            model.momentum_update()
            local = [task.encode(b) for b in batches]
            world = {
                k: torch.cat([loc[k] for loc in local])
                for k in ("image_feat", "text_feat", "ids", "mask", "idx", "image_embeds")
            }
            world = {k: v.detach() if k != "image_embeds" else v for k, v in world.items()}
            losses = [task.objectives(loc, world, b) for loc, b in zip(local, batches)]
            (sum(out["loss"] for out in losses) / _ranks.WORLD).backward()
            opt.step()
            opt.zero_grad()
            model.enqueue(*(torch.cat([out["queue"][i] for out in losses]) for i in range(3)))
    return model.state_dict(), grads


@pytest.fixture(scope="module")
def exact_gradients() -> dict:
    return simulate(torch.float64)[1]


@pytest.fixture
def threads(request):
    """Torch's intra-op threads for this test (summation orders change with them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_two_rank_gloo_run_matches_single_process_simulation(tmp_path, threads, exact_gradients):
    out = tmp_path / "rank0.pt"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(_ranks.WORLD),
        str(HERE / "_dist_worker.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dist_state = torch.load(out, weights_only=True)
    sim_state, sim_gradients = simulate(torch.float32)
    model = _ranks.make_model()
    noise = rounding_noise_elements(model, exact_gradients, sim_gradients)
    moved = assert_trained_states_close(dist_state, sim_state, model.state_dict(), noise=noise)
    # the steps trained something: online weights, momentum weights and queues all moved
    assert moved > 0.9 * sum(v.is_floating_point() for v in sim_state.values())
    assert int(sim_state["ptr_queue"]) == (_ranks.STEPS * _ranks.WORLD * _ranks.BATCH) % 16
