"""The synthetic data set: official formats, real JPEGs, unique scenes, deterministic bytes."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from blip_fast.data import synthetic
from blip_fast.data.datasets import PretrainDataset, RetrievalEvalDataset, RetrievalTrainDataset
from blip_fast.data.synthetic import make_synthetic
from blip_fast.data.transforms import test_transform as eval_tf

SMALL = dict(
    n_train_images=40, n_test_images=20, n_val_images=10, image_size=48, captions_per_train_image=3
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn"), **SMALL)


def _load(path):
    return json.loads(path.read_text())


def _digest(paths):
    h = hashlib.sha256()
    root = paths["root"]
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


def test_official_formats(data):
    train, test, val = _load(data["train"]), _load(data["test"]), _load(data["val"])
    assert len(train) == 40 * 3 and len(test) == 20 and len(val) == 10
    for e in train:
        assert set(e) == {"image", "caption", "image_id"}
        assert isinstance(e["caption"], str) and isinstance(e["image_id"], str)
    assert len({e["image_id"] for e in train}) == 40
    for e in test + val:
        assert set(e) == {"image", "caption"} and len(e["caption"]) == 5
        assert len(set(e["caption"])) == 5  # five different phrasings
    pretrain = _load(data["pretrain"])
    assert len(pretrain) == 40 and all(set(e) == {"image", "caption"} for e in pretrain)
    assert _load(data["pretrain_noisy"]) == sorted(_load(data["pretrain_noisy"]))
    assert len(_load(data["pretrain_noisy"])) == 8  # 20 % of 40


def test_real_jpegs(data):
    for e in _load(data["test"])[:5]:
        with Image.open(data["image_root"] / e["image"]) as img:
            assert img.format == "JPEG" and img.size == (48, 48) and img.mode == "RGB"


def test_datasets_read_it(data):
    tf = eval_tf(32)
    train = RetrievalTrainDataset(data["train"], data["image_root"], tf)
    assert len(train) == 120 and len(train.img_ids) == 40 and train[5][0].shape == (3, 32, 32)
    test = RetrievalEvalDataset(data["test"], data["image_root"], tf)
    assert len(test.text) == 100 and test[19][1] == 19
    assert len(PretrainDataset(data["pretrain"], data["image_root"], tf)[0][1]) > 0
    assert max(len(t.split(" ")) for t in test.text) <= 30  # retrieval captions are not cut


def test_captions_are_discriminative(data):
    """No scene repeats across splits, and a caption names only its own image's objects."""
    captions = {}
    for split in ("train", "val", "test"):
        for e in _load(data[split]):
            caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
            captions.setdefault(e["image"], []).extend(caps)
    owners = {}
    for image, caps in captions.items():
        for c in caps:
            owners.setdefault(c, set()).add(image)
    assert all(len(images) == 1 for images in owners.values())


def test_noisy_pretrain_captions_belong_elsewhere(data):
    pretrain, noisy = _load(data["pretrain"]), set(_load(data["pretrain_noisy"]))
    size = {w: k for k, words in synthetic.SIZE_WORDS.items() for w in words}

    def objects(caption):  # the (size, colour, shape) triples a caption names, order-free
        w = caption.replace(",", "").split()
        return {
            (size[a], b, c)
            for a, b, c in zip(w, w[1:], w[2:])
            if a in size and b in synthetic.COLOURS and c in synthetic.SHAPES
        }

    own = {e["image"]: objects(e["caption"]) for e in _load(data["train"])}
    for i, e in enumerate(pretrain):
        assert (objects(e["caption"]) == own[e["image"]]) == (i not in noisy), (i, e)


def test_scene_caption_content():
    scene = synthetic.Scene(
        ("white", "gray"), (("small", "red", "circle"), ("large", "blue", "square"))
    )
    caps = synthetic.scene_captions(scene, np.random.default_rng(0), 7)
    assert len(set(caps)) == 7
    for c in caps:
        assert "red circle" in c and "blue square" in c
        assert c.index("red circle") < c.index("blue square") or "to the right of" in c
    assert any("white and gray background" in c for c in caps)


def test_render_draws_objects_in_their_slots():
    scene = synthetic.Scene(("black",), (("large", "red", "square"), ("large", "cyan", "square")))
    arr = np.asarray(synthetic.render(scene, 64, np.random.default_rng(0))).astype(int)
    red = (arr[..., 0] > 150) & (arr[..., 1] < 100)
    cyan = (arr[..., 2] > 150) & (arr[..., 0] < 100)
    assert red.sum() > 50 and cyan.sum() > 50
    assert np.nonzero(red)[1].max() < 32 <= np.nonzero(cyan)[1].min()


def test_deterministic_bytes(tmp_path, data):
    again = make_synthetic(tmp_path / "a", **SMALL)
    assert _digest(again) == _digest(data)
    other = make_synthetic(tmp_path / "b", **{**SMALL, "n_train_images": 5}, seed=0)
    # test images depend only on the seed and n_test_images
    assert _load(other["test"]) == _load(data["test"])
    assert (other["root"] / "images/test/000003.jpg").read_bytes() == (
        data["root"] / "images/test/000003.jpg"
    ).read_bytes()
    reseeded = make_synthetic(tmp_path / "c", **SMALL, seed=1)
    assert _load(reseeded["test"]) != _load(data["test"])
