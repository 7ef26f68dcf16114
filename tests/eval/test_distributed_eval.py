"""``blip-fast eval-retrieval`` under torchrun, as README runs it: 2 gloo ranks split the ITM
re-ranking, rank 0 alone reports, and the result (metrics, score matrices) is the one-process
result."""

import json
import os
import subprocess
import sys

import pytest
import torch

import blip_fast
from blip_fast.data import make_synthetic
from blip_fast.eval.metrics import KEYS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_eval")
    paths = make_synthetic(
        root / "data", n_train_images=2, n_test_images=8, n_val_images=1, image_size=64, seed=0
    )
    torch.manual_seed(0)
    model = blip_fast.create_model("retrieval", "blip_tiny")
    blip_fast.save(model, root / "tiny.pth", format="official")
    return root / "tiny.pth", paths


def _eval(setup, out, mode, nproc=None):
    """The CLI alone (``nproc`` None) or under torchrun; -> (process, result JSON, scores)."""
    checkpoint, paths = setup
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        if nproc
        else []
    )
    cmd = [
        sys.executable,
        *launcher,
        "-m",
        "blip_fast.cli",
        "eval-retrieval",
        "--checkpoint",
        str(checkpoint),
        "--image-root",
        str(paths["image_root"]),
        "--ann-file",
        str(paths["test"]),
        "--k-test",
        "4",
        "--mode",
        mode,
        "--out",
        str(out),
        "--save-scores",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default per rank, for both runs
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text()), torch.load(out.with_suffix(".scores.pt"))


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_two_gloo_ranks_split_the_pairs_and_equal_one_process(setup, tmp_path, mode):
    _, one, one_scores = _eval(setup, tmp_path / "one.json", mode)
    proc, two, two_scores = _eval(setup, tmp_path / "two.json", mode, nproc=2)
    assert one["world_size"] == 1 and one["itm_pairs_per_rank"] == [one["itm_pairs"]]
    assert two["world_size"] == 2 and two["mode"] == mode
    # each rank ran a share: together exactly the one-process pairs, none twice
    shares = two["itm_pairs_per_rank"]
    assert len(shares) == 2 and min(shares) > 0 and sum(shares) == one["itm_pairs"]
    if mode == "reference":  # the official split: half the query rows each
        assert shares == [one["itm_pairs"] // 2] * 2
    assert f"(ranks ran {shares})" in proc.stdout
    # rank 0 alone reports
    assert proc.stdout.count("txt_r1=") == 1 and proc.stderr.count("eval-retrieval:") == 1
    assert "x 2 ranks" in proc.stderr
    assert {k: two[k] for k in KEYS} == {k: one[k] for k in KEYS}
    for key in ("scores_i2t", "scores_t2i"):
        assert torch.equal(two_scores[key] == -100, one_scores[key] == -100)
        torch.testing.assert_close(two_scores[key], one_scores[key], rtol=0, atol=1e-5)
