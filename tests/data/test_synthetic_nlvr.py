"""The synthetic NLVR² annotations: the official format, balanced labels, and every statement
true or false of its two scenes as labelled, checked by re-reading the scenes from their
retrieval captions (an evaluator independent of the generator), the left / right swap of the
training augmentation included."""

import json
import re
from collections import Counter

import pytest

from blip_fast.data import synthetic
from blip_fast.data.nlvr import NLVRDataset, swap_left_right
from blip_fast.data.synthetic import Scene, make_synthetic, nlvr_statements
from blip_fast.data.transforms import test_transform as eval_tf

SMALL = dict(n_train_images=30, n_test_images=40, n_val_images=12, image_size=48)
SIZE = {w: k for k, words in synthetic.SIZE_WORDS.items() for w in words}
PAIRS_PER_IMAGE = 10  # make_synthetic's default


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The small set with statements of every kind."""
    return make_synthetic(tmp_path_factory.mktemp("nlvr"), **SMALL, nlvr_kinds=synthetic.NLVR_KINDS)


def _load(path):
    return json.loads(path.read_text())


def _objects(caption: str) -> set[tuple[str, str, str]]:
    """The (size, colour, shape) of every object a retrieval caption names."""
    w = caption.replace(",", "").split()
    return {
        (SIZE[a], b, c)
        for a, b, c in zip(w, w[1:], w[2:])
        if a in SIZE and b in synthetic.COLOURS and c in synthetic.SHAPES
    }


def _kind(sentence: str) -> str:
    if sentence.startswith("both"):
        return "both"
    if "more" in sentence:
        return "more"
    return "colour" if sentence.endswith(" shape") else "contains"


def _truth(sentence: str, left: set, right: set) -> bool:
    images = {"left": left, "right": right}
    if m := re.fullmatch(r"the (left|right) image contains a (\w+) shape", sentence):
        return m[2] in {colour for _, colour, _ in images[m[1]]}
    if m := re.fullmatch(r"the (left|right) image contains a (\w+) (\w+)", sentence):
        return (m[2], m[3]) in {(colour, shape) for _, colour, shape in images[m[1]]}
    if m := re.fullmatch(
        r"the (left|right) image has more shapes than the (left|right) image", sentence
    ):
        return len(images[m[1]]) > len(images[m[2]])
    if m := re.fullmatch(r"both images contain a (\w+)", sentence):
        return all(m[1] in {shape for *_, shape in objs} for objs in (left, right))
    raise AssertionError(f"unexpected statement {sentence!r}")


@pytest.mark.parametrize("split,images", [("nlvr_train", 30), ("nlvr_dev", 12), ("nlvr_test", 40)])
def test_official_format_and_balanced_labels(data, split, images):
    ann = _load(data[split])
    half = PAIRS_PER_IMAGE * images // 2
    assert Counter(e["label"] for e in ann) == {"True": half, "False": half}
    folder = {"nlvr_train": "train", "nlvr_dev": "val", "nlvr_test": "test"}[split]
    assert all(p.startswith(f"images/{folder}/") for e in ann for p in e["images"])
    dataset = NLVRDataset(data[split], data["image_root"], eval_tf(32))
    image0, image1, sentence, label = dataset[0]
    assert image0.shape == image1.shape == (3, 32, 32)
    assert sentence == ann[0]["sentence"] and label == (ann[0]["label"] == "True")


def test_statements_are_true_as_labelled_swapped_or_not(data):
    objects = {
        e["image"]: _objects(e["caption"][0])
        for split in ("val", "test")
        for e in _load(data[split])
    }
    kinds = Counter()
    for split in ("nlvr_dev", "nlvr_test"):
        for e in _load(data[split]):
            left, right = (objects[p] for p in e["images"])
            label = e["label"] == "True"
            assert _truth(e["sentence"], left, right) == label, e
            assert _truth(swap_left_right(e["sentence"]), right, left) == label, e
            kinds[_kind(e["sentence"]), label] += 1
    # each kind of statement is about as often true as false: the sentence alone says nothing
    for kind in synthetic.NLVR_KINDS:
        true, false = kinds[kind, True], kinds[kind, False]
        assert true + false > 0 and abs(true - false) <= 0.5 * (true + false), kinds


def test_nlvr_statements_of_a_pair():
    left = Scene(("white",), (("small", "red", "circle"), ("large", "blue", "square")))
    right = Scene(
        ("black",),
        (("large", "red", "square"), ("small", "green", "star"), ("small", "blue", "square")),
    )
    assert nlvr_statements(left, right, "contains", True) == [
        "the left image contains a blue square",
        "the left image contains a red circle",
        "the right image contains a blue square",
        "the right image contains a green star",
        "the right image contains a red square",
    ]
    # false: an object neither image holds, named for either side
    false = nlvr_statements(left, right, "contains", False)
    assert len(false) == 2 * (len(synthetic.COLOURS) * len(synthetic.SHAPES) - 4)
    assert "the left image contains a green circle" in false
    for named in ("red circle", "blue square", "red square", "green star"):
        assert not any(sentence.endswith(named) for sentence in false), named
    assert nlvr_statements(left, right, "colour", True) == [
        "the left image contains a blue shape",
        "the left image contains a red shape",
        "the right image contains a blue shape",
        "the right image contains a green shape",
        "the right image contains a red shape",
    ]
    # false: a colour neither image holds
    assert nlvr_statements(left, right, "colour", False) == [
        f"the {side} image contains a {colour} shape"
        for side in ("left", "right")
        for colour in ("cyan", "orange", "pink", "purple", "yellow")
    ]
    assert nlvr_statements(left, right, "more", True) == [
        "the right image has more shapes than the left image"
    ]
    assert nlvr_statements(left, left, "more", True) == []
    assert nlvr_statements(left, right, "both", True) == ["both images contain a square"]
    assert nlvr_statements(left, right, "both", False) == [
        "both images contain a circle",
        "both images contain a star",
    ]
    with pytest.raises(ValueError, match="unknown NLVR statement kind 'most'"):
        nlvr_statements(left, right, "most", True)


def test_other_files_do_not_depend_on_the_nlvr_annotations(data, tmp_path):
    without = make_synthetic(tmp_path, **SMALL, nlvr_pairs_per_image=0)
    for name in ("train", "val", "test", "pretrain", "pretrain_noisy"):
        assert without[name].read_bytes() == data[name].read_bytes(), name
    assert _load(without["nlvr_test"]) == []
    for image in ("images/test/000007.jpg", "images/train/000029.jpg"):
        assert (without["root"] / image).read_bytes() == (data["root"] / image).read_bytes()


def test_nlvr_kinds_choose_the_statements(tmp_path):
    default = make_synthetic(tmp_path / "default", **SMALL)
    ann = _load(default["nlvr_train"])
    assert synthetic.DEFAULT_NLVR_KINDS == ("colour", "contains")
    assert Counter(_kind(e["sentence"]) for e in ann).keys() == {"colour", "contains"}
    colour = make_synthetic(tmp_path / "colour", **SMALL, nlvr_kinds=("colour",))
    ann = _load(colour["nlvr_train"])
    assert {_kind(e["sentence"]) for e in ann} == {"colour"}
    assert Counter(e["label"] for e in ann) == {"True": 150, "False": 150}
    with pytest.raises(ValueError, match="kinds must be some of .* got \\('most',\\)"):
        make_synthetic(tmp_path / "bad", **SMALL, nlvr_kinds=("most",))
