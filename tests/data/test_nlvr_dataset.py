"""NLVRDataset: the official annotation format, its errors, ``pre_caption(sentence, 40)``, the
training swap (images and the words left / right together) and deterministic evaluation."""

import json

import pytest
import torch
from PIL import Image

from blip_fast.data.datasets import MissingKeyError
from blip_fast.data.nlvr import NLVRDataset, collate_nlvr, swap_left_right
from blip_fast.data.uint8_transforms import normalize_uint8
from blip_fast.text import pre_caption

COLOURS = {"a.png": (255, 0, 0), "b.png": (0, 255, 0), "c.png": (0, 0, 255)}


def first_pixel(img):
    """A transform that says which image it was given: its colour."""
    return torch.tensor(img.getpixel((0, 0)))


@pytest.fixture
def root(tmp_path):
    for name, colour in COLOURS.items():
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    return tmp_path


def write_ann(path, entries):
    path.write_text(json.dumps(entries))
    return path


def entry(images=("a.png", "b.png"), sentence="The left image has a dog.", label="True"):
    return {"images": list(images), "sentence": sentence, "label": label}


def test_items_as_official(root):
    long = "Word " * 45 + "end."
    ann = write_ann(
        root / "dev.json",
        [entry(), entry(("c.png", "a.png"), sentence=long, label="False")],
    )
    ds = NLVRDataset(ann, root, first_pixel)
    image0, image1, sentence, label = ds[0]
    assert image0.tolist() == [255, 0, 0] and image1.tolist() == [0, 255, 0]
    assert (sentence, label) == ("the left image has a dog", 1)
    image0, image1, sentence, label = ds[1]
    assert image0.tolist() == [0, 0, 255] and label == 0
    assert sentence == pre_caption(long, 40) and len(sentence.split(" ")) == 40


@pytest.mark.parametrize("label", ["true", "TRUE", 1, True, None, "", ["True"]])
def test_bad_label_names_file_entry_and_value(root, label):
    ann = write_ann(root / "bad.json", [entry(), entry(label=label)])
    with pytest.raises(ValueError) as err:
        NLVRDataset(ann, root, first_pixel)
    msg = str(err.value)
    assert str(ann) in msg and "entry 1" in msg and "'label'" in msg and repr(label) in msg


@pytest.mark.parametrize(
    "bad, error, words",
    [
        ({"sentence": "x", "label": "True"}, MissingKeyError, "no 'images' key"),
        (entry(images=("a.png",)), TypeError, "'images' must be a list of 2 paths"),
        (entry(images=("a.png", 3)), TypeError, "'images' must be a list of 2 paths"),
        (entry(sentence=["x"]), TypeError, "'sentence' must be str, got list"),
        ("not an object", TypeError, "entry 0 must be an object"),
    ],
)
def test_bad_entries(root, bad, error, words):
    ann = write_ann(root / "bad.json", [bad])
    with pytest.raises(error, match=words):
        NLVRDataset(ann, root, first_pixel)


def test_empty_file_is_an_error(root):
    with pytest.raises(ValueError, match="has no entries"):
        NLVRDataset(write_ann(root / "empty.json", []), root, first_pixel)


def test_swap_left_right_whole_words_only():
    assert swap_left_right("the left dog is right of the left, cat") == (
        "the right dog is left of the left, cat"
    )
    assert swap_left_right("no sides here") == "no sides here"


@pytest.mark.parametrize("sentence", ["the dog on the left is right of a cat", "two dogs in total"])
def test_training_swap_moves_images_and_words_together(root, sentence):
    ann = write_ann(root / "train.json", [entry(sentence=sentence)])
    ds = NLVRDataset(ann, root, first_pixel, train=True)
    plain = pre_caption(sentence, 40)
    swapped_count = 0
    for _ in range(64):
        image0, image1, text, label = ds[0]
        swapped = image0.tolist() == [0, 255, 0]
        assert image1.tolist() == ([255, 0, 0] if swapped else [0, 255, 0])
        assert text == (swap_left_right(plain) if swapped else plain)
        assert label == 1
        swapped_count += swapped
    assert 16 < swapped_count < 48  # p = 0.5: both outcomes, about equally often


def test_evaluation_never_swaps(root):
    ann = write_ann(root / "dev.json", [entry()])
    ds = NLVRDataset(ann, root, first_pixel)
    for _ in range(32):
        image0, _, text, _ = ds[0]
        assert image0.tolist() == [255, 0, 0] and text == "the left image has a dog"


def test_collate_puts_first_images_then_second_images():
    items = [
        (
            torch.full((3, 2, 2), 10 * i, dtype=torch.uint8),
            torch.full((3, 2, 2), 10 * i + 1, dtype=torch.uint8),
            f"s{i}",
            i % 2,
        )
        for i in range(3)
    ]
    images, sentences, labels = collate_nlvr(items)
    firsts = torch.stack([item[0] for item in items])
    seconds = torch.stack([item[1] for item in items])
    assert torch.equal(images, normalize_uint8(torch.cat([firsts, seconds])))
    assert sentences == ["s0", "s1", "s2"]
    assert labels.dtype == torch.long and labels.tolist() == [0, 1, 0]
