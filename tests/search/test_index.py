"""Building an image index: what it stores, skipping bad files, adding, resuming a killed build."""

import copy
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from blip_fast.data import load_image, test_transform
from blip_fast.data.corrupt_report import read_corrupt_report
from blip_fast.search import Index, encode, store
from blip_fast.search.index import model_fingerprint
from blip_fast.search.store import Store

IMAGES = 8  # in the ``photos`` folder


def _build(model, src, out, **options):
    return Index.build(model, src, out, batch_size=3, chunk_size=3, progress=False, **options)


def test_build_stores_each_image_feature_and_round_trips(model, photos, tmp_path):
    index = _build(model, photos, tmp_path / "index")
    names = [os.path.relpath(p, photos) for p in index.paths]
    assert names == [f"{i:06d}.jpg" for i in range(6)] + ["trip/a.png", "trip/b.webp"]
    pixels = torch.stack([test_transform(64)(load_image(p)) for p in index.paths])
    with torch.no_grad():
        expected = model.image_features(pixels).half()
    feats = index.features()
    assert feats.dtype == torch.float16 and feats.shape == (IMAGES, model.cfg.embed_dim)
    torch.testing.assert_close(feats, expected, rtol=0, atol=1e-3)

    manifest = json.loads((tmp_path / "index" / "index.json").read_text())
    assert [c["items"] for c in manifest["chunks"]] == [3, 3, 2]
    loaded = Index.load(tmp_path / "index")
    assert loaded.paths == index.paths and torch.equal(loaded.features(), feats)

    copy = index.save(tmp_path / "copy")
    assert len(copy) == IMAGES
    assert len(json.loads((tmp_path / "copy" / "index.json").read_text())["chunks"]) == 1
    again = Index.load(tmp_path / "copy", model)
    assert again.paths == index.paths and torch.equal(again.features(), feats)
    hits, expected_hits = again.search("a red square", k=3), index.search("a red square", k=3)
    assert [h.path for h in hits] == [h.path for h in expected_hits]
    # other block shapes, other float32 summation order
    assert np.allclose([h.score for h in hits], [h.score for h in expected_hits], atol=1e-6)


def test_unreadable_files_are_listed_and_skipped(model, photos, tmp_path):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    good = (photos / "000001.jpg").read_bytes()
    (photos / "trip" / "cut.jpg").write_bytes(good[: len(good) // 2])
    index = _build(model, photos, tmp_path / "index")
    assert len(index) == IMAGES
    bad = {str(photos / "broken.jpg"), str(photos / "trip" / "cut.jpg")}
    assert {path for path, _ in index.skipped} == bad
    report = read_corrupt_report(tmp_path / "index" / "corrupt_images.tsv")
    assert {row["path"] for row in report} == bad
    assert all("cannot decode image" in row["error"] for row in report)
    # a rerun neither retries nor reports them again
    assert len(_build(model, photos, tmp_path / "index")) == IMAGES
    assert len(read_corrupt_report(tmp_path / "index" / "corrupt_images.tsv")) == 2


def test_add_encodes_only_new_files(model, photos, synthetic_images, tmp_path, monkeypatch):
    index = _build(model, photos, tmp_path / "index")
    before = index.features()
    shutil.copy(synthetic_images[0], photos / "new1.jpg")
    shutil.copy(synthetic_images[1], photos / "trip" / "new2.jpg")
    opened = []
    real_open = encode.open_item
    monkeypatch.setattr(encode, "open_item", lambda item: opened.append(item) or real_open(item))
    assert index.add(photos, batch_size=2, progress=False) == 2
    assert sorted(os.path.basename(i.path) for i in opened) == ["new1.jpg", "new2.jpg"]
    assert len(index) == IMAGES + 2
    assert torch.equal(index.features()[:IMAGES], before)
    reloaded = Index.load(tmp_path / "index", model)
    assert reloaded.paths == index.paths and len(set(reloaded.paths)) == IMAGES + 2
    assert index.add(photos, progress=False) == 0


def test_json_lists_and_tar_shards_are_sources(model, photos, tmp_path):
    """A JSON list (paths relative to its folder) and a shard give the folder's features."""
    folder = _build(model, photos, tmp_path / "folder")
    names = ["000003.jpg", "trip/a.png", "000001.jpg"]
    (photos / "list.json").write_text(json.dumps(names))
    listed = _build(model, photos / "list.json", tmp_path / "listed")
    assert listed.paths == [str(photos / n) for n in names]
    rows = [folder.paths.index(p) for p in listed.paths]
    assert torch.equal(listed.features(), folder.features()[rows])

    shard = tmp_path / "web-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for n in names:
            tar.add(photos / n, arcname=f"sample/{n.replace('/', '_')}")
        tar.add(photos / "notes.txt", arcname="sample/notes.txt")  # a caption: not an image
        bad = tarfile.TarInfo("sample/broken.jpg")
        bad.size = 4
        tar.addfile(bad, io.BytesIO(b"junk"))
    sharded = _build(model, shard, tmp_path / "sharded")
    assert sharded.paths == [f"{shard}:sample/{n.replace('/', '_')}" for n in names]
    assert sharded.skipped[0][0] == f"{shard}:sample/broken.jpg"
    assert torch.equal(sharded.features(), listed.features())
    # reranking reads the candidates back out of the shard
    assert sharded.search("a red square", k=2, candidates=3)[0].path.startswith(f"{shard}:")


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, no ``except Exception`` catches it."""


@pytest.mark.parametrize(
    "kill_at",
    [5, 6, 7],  # atomic writes: 1 manifest (create), then per chunk .npy, .json, manifest
    ids=["before-chunk-2", "chunk-2-features-written", "chunk-2-written-uncommitted"],
)
def test_rerun_after_kill_equals_uninterrupted_build(model, photos, tmp_path, monkeypatch, kill_at):
    whole = _build(model, photos, tmp_path / "whole")
    writes = []
    real_write = store.atomic_write

    def dying_write(path, write):
        writes.append(path)
        if len(writes) == kill_at:
            raise Killed
        real_write(path, write)

    monkeypatch.setattr(store, "atomic_write", dying_write)
    with pytest.raises(Killed):
        _build(model, photos, tmp_path / "killed")
    monkeypatch.setattr(store, "atomic_write", real_write)
    assert len(Store.open(tmp_path / "killed")) == 3  # the first chunk's commit survived
    resumed = _build(model, photos, tmp_path / "killed")
    assert resumed.paths == whole.paths
    assert np.array_equal(resumed.features().numpy(), whole.features().numpy())
    assert sorted(f.name for f in (tmp_path / "killed").iterdir()) == sorted(
        f.name for f in (tmp_path / "whole").iterdir()
    )


def test_bad_input_is_refused_with_the_culprit_named(model, photos, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"not an index: {tmp_path / 'nowhere'}"):
        Index.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no images"):
        _build(model, tmp_path / "empty", tmp_path / "index")
    with pytest.raises(FileNotFoundError, match="image source not found: .*missing"):
        _build(model, tmp_path / "missing", tmp_path / "index")
    index = _build(model, photos, tmp_path / "index")
    for k in (0, -1, 2.5):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            index.search("a dog", k=k)
    other = type(model)(model.cfg).eval()  # same architecture, other random weights
    with pytest.raises(ValueError, match="built with another model"):
        Index.load(tmp_path / "index", other)
    changed = copy.deepcopy(model)  # the fingerprint remembered on a model follows its weights
    assert model_fingerprint(changed) == model_fingerprint(model)
    with torch.no_grad():
        changed.vision_proj.bias.add_(1e-3)
    with pytest.raises(ValueError, match="built with another model"):
        Index.load(tmp_path / "index", changed)
    (tmp_path / "other").mkdir()
    shutil.copy(photos / "000000.jpg", tmp_path / "other")
    with pytest.raises(FileExistsError, match="use add"):
        _build(model, tmp_path / "other", tmp_path / "index")
    with pytest.raises(ValueError, match="load the index with its model"):
        Index.load(tmp_path / "index").search("a dog")
