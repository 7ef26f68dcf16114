"""``blip-fast index`` under torchrun: 2 gloo ranks encode a share each into their own part,
merged into the index a single process builds (same rows, same order); a merge cut short and
rerun adds nothing twice."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import blip_fast
from blip_fast.search import Index
from blip_fast.search.encode import index_items
from blip_fast.search.ranks import PARTS, merge_parts, share
from blip_fast.search.store import Store

IMAGES = 9  # odd: the two shares differ in size


@pytest.fixture
def folder(synthetic_images, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(IMAGES):
        shutil.copy(synthetic_images[i % len(synthetic_images)], src / f"{i:03d}.jpg")
    (src / "003-broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return src


def _index(checkpoint, src, out, nproc=None, *extra):
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        if nproc
        else []
    )
    cmd = [sys.executable, *launcher, "-m", "blip_fast.cli", "index", checkpoint, src, out]
    cmd += ["--chunk-size", "2", "--batch-size", "2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default per rank, for both runs
    proc = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _assert_same_index(got: Index, want: Index):
    assert got.paths == want.paths and len(set(got.paths)) == len(got)
    assert got.skipped == want.skipped
    # other batch compositions: the same fp32 features up to GEMM blocking, one fp16 step apart
    np.testing.assert_allclose(got.features().numpy(), want.features().numpy(), rtol=0, atol=1e-3)


def test_two_gloo_ranks_build_the_single_process_index(model, folder, tmp_path):
    checkpoint = tmp_path / "tiny.pth"
    blip_fast.save(model, checkpoint, format="official")
    _index(checkpoint, folder, tmp_path / "one")
    proc = _index(checkpoint, folder, tmp_path / "two", 2)
    assert proc.stdout.count(f"{tmp_path / 'two'}: {IMAGES} images") == 1  # rank 0 alone
    assert "built by 2 ranks" in proc.stdout
    assert not (tmp_path / "two" / PARTS).exists()
    one, two = Index.load(tmp_path / "one"), Index.load(tmp_path / "two")
    _assert_same_index(two, one)
    assert (tmp_path / "two" / "corrupt_images.tsv").read_text() == (
        tmp_path / "one" / "corrupt_images.tsv"
    ).read_text()

    # --add under torchrun: only the new files, appended in source order
    for name in ("new1.jpg", "new2.jpg", "new3.jpg"):
        shutil.copy(folder / "000.jpg", folder / name)
    proc = _index(checkpoint, folder, tmp_path / "two", 2, "--add")
    assert "(3 added)" in proc.stdout
    _index(checkpoint, folder, tmp_path / "one", None, "--add")
    _assert_same_index(Index.load(tmp_path / "two"), Index.load(tmp_path / "one"))


def test_a_merge_cut_short_then_rerun_commits_nothing_twice(model, folder, tmp_path):
    whole = Index.build(model, folder, tmp_path / "whole", chunk_size=2, progress=False)
    index, items = Index.prepare(model, folder, tmp_path / "index")
    parts = []
    for rank in range(3):
        part = Store.create(tmp_path / "parts" / f"rank-{rank}", {"embed_dim": model.cfg.embed_dim})
        index_items(model, part, share(items, rank, 3), chunk_size=2, progress=False)
        parts.append(part)
    merge_parts(index.store, parts[:2], items)  # killed before the last part
    assert len(index) == len(share(items, 0, 3) + share(items, 1, 3)) - 1  # one is unreadable
    merge_parts(index.store, parts, items)  # the rerun
    _assert_same_index(Index.load(tmp_path / "index"), whole)
    assert (tmp_path / "index" / "corrupt_images.tsv").read_text() == (
        tmp_path / "whole" / "corrupt_images.tsv"
    ).read_text()
