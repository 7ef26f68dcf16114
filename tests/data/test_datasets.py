"""Datasets over the official annotation formats: numbering as official BLIP, and
every malformed input raises with a message that names the problem."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from blip_fast.data.datasets import (
    MissingKeyError,
    PretrainDataset,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    load_annotations,
)
from blip_fast.data.images import load_image
from blip_fast.data.transforms import test_transform as eval_tf


@pytest.fixture()
def root(tmp_path):
    (tmp_path / "img").mkdir()
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (20, 10 + k), colour).save(tmp_path / "img" / f"{k}.jpg")
    return tmp_path


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_retrieval_train_numbering(root):
    ann = [
        {"image": "img/1.jpg", "caption": "A Dog.", "image_id": "b"},
        {"image": "img/0.jpg", "caption": "a cat", "image_id": "a"},
        {"image": "img/1.jpg", "caption": "Dog   running!", "image_id": "b"},
    ]
    more = [{"image": "img/2.jpg", "caption": "a bird", "image_id": 7}]
    ds = RetrievalTrainDataset(
        [_write(root / "t1.json", ann), _write(root / "t2.json", more)], root, eval_tf(8)
    )
    assert len(ds) == 4
    assert ds.img_ids == {"b": 0, "a": 1, 7: 2}  # order of first appearance, as official img_ids
    image, caption, idx = ds[2]
    assert image.shape == (3, 8, 8) and caption == "dog running" and idx == 0
    assert ds[3][1:] == ("a bird", 2)


def test_retrieval_train_max_words(root):
    ann = [{"image": "img/0.jpg", "caption": " ".join(["w"] * 40), "image_id": "a"}]
    assert (
        len(RetrievalTrainDataset(_write(root / "t.json", ann), root, eval_tf(8))[0][1].split())
        == 30
    )


def test_retrieval_eval_maps(root):
    ann = [
        {"image": "img/0.jpg", "caption": ["A red image.", "red"]},
        {"image": "img/1.jpg", "caption": ["green", "Green!", "GREEN (bright)"]},
        {"image": "img/2.jpg", "caption": ["blue"]},
    ]
    ds = RetrievalEvalDataset(_write(root / "test.json", ann), root, eval_tf(8))
    assert len(ds) == 3
    assert ds.text == ["a red image", "red", "green", "green", "green bright", "blue"]
    assert ds.image == ["img/0.jpg", "img/1.jpg", "img/2.jpg"]
    assert ds.img2txt == {0: [0, 1], 1: [2, 3, 4], 2: [5]}
    assert ds.txt2img == {0: 0, 1: 0, 2: 1, 3: 1, 4: 1, 5: 2}
    image, index = ds[1]
    assert index == 1
    assert torch.equal(image, eval_tf(8)(Image.open(root / "img/1.jpg").convert("RGB")))


def test_pretrain_str_and_list_captions(root):
    ann = [
        {"image": str(root / "img/0.jpg"), "caption": "An absolute path."},
        {"image": "img/1.jpg", "caption": ["one", "two", "three"]},
    ]
    ds = PretrainDataset(_write(root / "p.json", ann), transform=eval_tf(8))
    assert ds[0][1] == "an absolute path" and ds[0][0].shape == (3, 8, 8)
    ds = PretrainDataset(_write(root / "p.json", ann), image_root=root, transform=eval_tf(8))
    torch.manual_seed(0)
    assert {ds[1][1] for _ in range(50)} == {"one", "two", "three"}
    raw = PretrainDataset(root / "p.json", image_root=root)  # no transform: the PIL image
    assert isinstance(raw[1][0], Image.Image) and raw[1][0].mode == "RGB"


def test_missing_annotation_file(root):
    missing = root / "nope.json"
    with pytest.raises(FileNotFoundError, match="annotation file not found") as err:
        RetrievalEvalDataset(missing, root, eval_tf(8))
    assert str(missing) in str(err.value)


def test_invalid_json_names_file_and_position(root):
    bad = root / "bad.json"
    bad.write_text('[{"image": "img/0.jpg",\n  "caption": "x" "image_id": "a"}]')
    with pytest.raises(ValueError, match="invalid JSON") as err:
        RetrievalTrainDataset(bad, root, eval_tf(8))
    assert str(bad) in str(err.value) and "line 2 column 18" in str(err.value)


def test_top_level_not_a_list(root):
    with pytest.raises(TypeError, match="top level must be a list.*got dict"):
        PretrainDataset(_write(root / "d.json", {"image": "x", "caption": "y"}), root)


@pytest.mark.parametrize(
    "cls, entry, key",
    [
        (RetrievalTrainDataset, {"image": "img/0.jpg", "caption": "x"}, "image_id"),
        (RetrievalTrainDataset, {"caption": "x", "image_id": "a"}, "image"),
        (RetrievalEvalDataset, {"image": "img/0.jpg"}, "caption"),
        (PretrainDataset, {"image": "img/0.jpg", "captions": "x"}, "caption"),
    ],
)
def test_missing_key_names_file_entry_and_key(root, cls, entry, key):
    good = {
        RetrievalTrainDataset: {"image": "img/0.jpg", "caption": "x", "image_id": "a"},
        RetrievalEvalDataset: {"image": "img/0.jpg", "caption": ["x"]},
        PretrainDataset: {"image": "img/0.jpg", "caption": "x"},
    }[cls]
    path = _write(root / "a.json", [good, good, entry])
    with pytest.raises(MissingKeyError) as err:
        cls(path, root, eval_tf(8))
    msg = str(err.value)
    assert str(path) in msg and "entry 2" in msg and f"no '{key}' key" in msg
    assert isinstance(err.value, KeyError)


@pytest.mark.parametrize(
    "cls, entry, expect",
    [
        (
            RetrievalTrainDataset,
            {"image": "img/0.jpg", "caption": ["x"], "image_id": "a"},
            "'caption' must be str, got list",
        ),
        (
            RetrievalTrainDataset,
            {"image": "img/0.jpg", "caption": "x", "image_id": 1.5},
            "'image_id' must be str or int, got float",
        ),
        (
            RetrievalEvalDataset,
            {"image": "img/0.jpg", "caption": "x"},
            "'caption' must be list of str, got str",
        ),
        (
            RetrievalEvalDataset,
            {"image": "img/0.jpg", "caption": ["x", 3]},
            r"'caption'\[1\] must be str, got int",
        ),
        (
            PretrainDataset,
            {"image": "img/0.jpg", "caption": None},
            "'caption' must be str or list of str, got NoneType",
        ),
        (PretrainDataset, {"image": 0, "caption": "x"}, "'image' must be str, got int"),
        (PretrainDataset, "img/0.jpg", "entry 0 must be an object, got str"),
    ],
)
def test_wrong_type_names_it(root, cls, entry, expect):
    path = _write(root / "a.json", [entry])
    with pytest.raises(TypeError, match=expect) as err:
        cls(path, root, eval_tf(8))
    assert str(path) in str(err.value)


def test_empty_caption_list_rejected(root):
    path = _write(root / "a.json", [{"image": "img/0.jpg", "caption": []}])
    with pytest.raises(ValueError, match=f"{path}: entry 0: 'caption' is an empty list"):
        RetrievalEvalDataset(path, root, eval_tf(8))


def test_missing_image_raises_with_full_path(root):
    ann = [{"image": "img/0.jpg", "caption": ["x"]}, {"image": "img/gone.jpg", "caption": ["y"]}]
    ds = RetrievalEvalDataset(_write(root / "a.json", ann), root, eval_tf(8))
    ds[0]
    with pytest.raises(FileNotFoundError, match="image not found") as err:
        ds[1]
    assert str(root / "img/gone.jpg") in str(err.value)


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_undecodable_image_raises_with_full_path(root, content):
    bad = root / "img" / "bad.jpg"
    if content == "truncated":
        Image.fromarray(
            np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        ).save(bad)
        content = bad.read_bytes()[:400]
    bad.write_bytes(content)
    ds = RetrievalTrainDataset(
        _write(root / "a.json", [{"image": "img/bad.jpg", "caption": "x", "image_id": "a"}]),
        root,
        eval_tf(8),
    )
    with pytest.raises(OSError, match="cannot decode image") as err:
        ds[0]
    assert str(bad) in str(err.value)


def test_load_image_converts_to_rgb(root):
    Image.new("L", (5, 4), 77).save(root / "grey.png")
    img = load_image(root / "grey.png")
    assert img.mode == "RGB" and img.size == (5, 4) and img.getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize("caption", ["str", "list", "str|list"])
def test_empty_annotation_file_rejected(root, caption):
    path = root / "empty.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match=f"annotation file {path} has no entries"):
        load_annotations(path, caption)
