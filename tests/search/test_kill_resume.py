"""A real kill: ``blip-fast index`` SIGKILLed in a subprocess mid-build, then rerun, ends with
the index an uninterrupted build writes (same rows in the same order, same features)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

import blip_fast
from blip_fast.search import Index
from blip_fast.search.store import Store

IMAGES, CHUNK = 24, 2

# The CLI with each encoded batch slowed down, so the kill lands in the middle of a chunk on
# any machine; everything else (the process, the writes, the signal) is the real thing.
SLOW_CLI = """
import sys, time
from blip_fast import cli
from blip_fast.search import encode
real = encode.encode_pixels
def slow(*args, **kwargs):
    time.sleep(0.2)
    return real(*args, **kwargs)
encode.encode_pixels = slow
cli.main(sys.argv[1:])
"""


def _index_cmd(checkpoint, src, out, slow=False):
    args = ["index", checkpoint, src, out, "--chunk-size", CHUNK, "--batch-size", 1]
    entry = ["-c", SLOW_CLI] if slow else ["-m", "blip_fast.cli"]
    return [sys.executable, *entry, *map(str, args)]


def _committed(out) -> int:
    try:
        return len(Store.open(out))
    except (FileNotFoundError, ValueError):  # not created yet
        return 0


def test_sigkill_mid_build_then_rerun_equals_uninterrupted_build(model, synthetic_images, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(IMAGES):
        shutil.copy(synthetic_images[i % len(synthetic_images)], src / f"{i:03d}.jpg")
    checkpoint = tmp_path / "tiny.pth"
    blip_fast.save(model, checkpoint, format="official")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _index_cmd(checkpoint, src, killed, slow=True),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while _committed(killed) == 0:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no chunk committed in 240 s"
        time.sleep(0.02)
    time.sleep(0.3)  # into a later chunk's batches: encoded but uncommitted work is lost
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stderr.close()
    at_kill = _committed(killed)
    assert 0 < at_kill < IMAGES and at_kill % CHUNK == 0

    reruns = {}
    for out in (killed, tmp_path / "whole"):
        reruns[out] = subprocess.run(
            _index_cmd(checkpoint, src, out), env=env, capture_output=True, text=True, timeout=300
        )
        assert reruns[out].returncode == 0, reruns[out].stderr[-3000:]
        assert f"{out}: {IMAGES} images" in reruns[out].stdout
    left = IMAGES - at_kill  # the rerun encodes only what the kill left undone
    assert f"index: {left}/{left} new items" in reruns[killed].stderr

    resumed, whole = Index.load(killed), Index.load(tmp_path / "whole")
    assert len(resumed) == IMAGES and len(set(resumed.paths)) == IMAGES
    assert resumed.paths == whole.paths == [str(src / f"{i:03d}.jpg") for i in range(IMAGES)]
    assert np.array_equal(resumed.features().numpy(), whole.features().numpy())
    assert sorted(f.name for f in killed.iterdir()) == sorted(
        f.name for f in (tmp_path / "whole").iterdir()
    )
