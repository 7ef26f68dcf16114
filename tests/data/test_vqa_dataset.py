"""VQADataset: the official VQA v2 / Visual Genome formats, answer weights and collate, bad
input; the synthetic VQA files: format, answers true of their scenes, annotator votes, chance;
the VQA v2 accuracy."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from blip_fast.data import make_synthetic
from blip_fast.data.datasets import MissingKeyError
from blip_fast.data.synthetic import Scene
from blip_fast.data.synthetic_vqa import (
    ANNOTATORS,
    ANSWERS,
    KINDS,
    answer_kind,
    blind_accuracy,
    scene_questions,
)
from blip_fast.data.uint8_transforms import normalize_uint8
from blip_fast.data.vqa import (
    VG_WEIGHT,
    VQADataset,
    collate_vqa,
    collate_vqa_test,
    read_answer_list,
)
from blip_fast.eval.vqa import accuracy, answer_accuracy
from blip_fast.text import pre_question

COLOURS = {"a.png": (255, 0, 0), "b.png": (0, 255, 0)}


def first_pixel(img):
    """A transform that says which image it was given: its colour."""
    return torch.tensor(img.getpixel((0, 0)))


@pytest.fixture
def roots(tmp_path):
    out = {}
    for dataset, (name, colour) in zip(("vqa", "vg"), COLOURS.items(), strict=True):
        out[dataset] = tmp_path / dataset
        out[dataset].mkdir()
        Image.new("RGB", (8, 8), colour).save(out[dataset] / name)
    return out


def write_ann(path, entries):
    path.write_text(json.dumps(entries))
    return path


def vqa_entry(**kw):
    entry = {
        "question_id": 7,
        "question": 'What colour is "the" ball?',
        "answer": ["red", "red", "blue", "red", "dark red"],
        "image": "a.png",
        "dataset": "vqa",
    }
    return {**entry, **kw}


def vg_entry(**kw):
    entry = {"question": "Where is it.", "answer": "in the park", "image": "b.png", "dataset": "vg"}
    return {**entry, **kw}


def official_weights(answers):
    """The official ``vqa_dataset.__getitem__`` loop, verbatim in effect."""
    answer_weight = {}
    for answer in answers:
        if answer in answer_weight.keys():
            answer_weight[answer] += 1 / len(answers)
        else:
            answer_weight[answer] = 1 / len(answers)
    return list(answer_weight.keys()), list(answer_weight.values())


def test_train_items_and_collate_as_official(roots, tmp_path):
    ann = write_ann(tmp_path / "train.json", [vqa_entry(), vg_entry()])
    ds = VQADataset(ann, roots["vqa"], first_pixel, "train", vg_root=roots["vg"])
    image, question, answers, weights = ds[0]
    assert image.tolist() == [255, 0, 0] and question == pre_question(vqa_entry()["question"])
    assert (answers, weights) == official_weights(vqa_entry()["answer"])
    assert answers == ["red", "blue", "dark red"] and weights == pytest.approx([0.6, 0.2, 0.2])
    image, question, answers, weights = ds[1]
    assert image.tolist() == [0, 255, 0]
    assert (question, answers, weights) == ("where is it", ["in the park"], [VG_WEIGHT])

    images, questions, answers, weights, n = collate_vqa([ds[0], ds[1], ds[0]])
    assert images.shape == (3, 3) and questions == [ds[0][1], ds[1][1], ds[0][1]]
    assert answers == ["red", "blue", "dark red", "in the park", "red", "blue", "dark red"]
    assert n == [3, 1, 3] and weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx([0.6, 0.2, 0.2, 0.2, 0.6, 0.2, 0.2])


def test_test_items_collate_and_uint8_images(roots, tmp_path):
    ann = write_ann(
        tmp_path / "test.json",
        [  # official test entries: no answers
            {"question_id": i, "question": "Where is it.", "image": image, "dataset": dataset}
            for i, image, dataset in ((3, "a.png", "vqa"), (4, "b.png", "vg"), (5, "a.png", "vqa"))
        ],
    )
    uint8 = lambda img: torch.tensor(img.getpixel((0, 0)), dtype=torch.uint8).view(3, 1, 1)  # noqa: E731
    ds = VQADataset(ann, roots["vqa"], uint8, "test", vg_root=roots["vg"])
    images, questions, ids = collate_vqa_test([ds[i] for i in range(3)])
    assert ids == [3, 4, 5] and questions[1] == "where is it"
    raw = torch.tensor([[255, 0, 0], [0, 255, 0], [255, 0, 0]], dtype=torch.uint8).view(3, 3, 1, 1)
    assert images.dtype == torch.float32 and torch.equal(images, normalize_uint8(raw))


@pytest.mark.parametrize(
    "split, entry, error, match",
    [
        ("train", vqa_entry(answer=[]), ValueError, r"entry 1: 'answer' is an empty list"),
        ("train", vqa_entry(answer="red"), TypeError, r"entry 1: a 'vqa' entry's 'answer' must"),
        ("train", vg_entry(answer=["x"]), TypeError, r"entry 1: a 'vg' entry's 'answer' must be"),
        ("train", vqa_entry(dataset="coco"), ValueError, r"entry 1: 'dataset' must be 'vqa' or"),
        ("train", vqa_entry(answer=["a", 3]), TypeError, r"entry 1: 'answer'\[1\] must be str"),
        ("train", {"question": "q", "image": "a.png"}, MissingKeyError, "entry 1 has no 'answer'"),
        ("test", vqa_entry(question_id="7"), TypeError, r"entry 1: 'question_id' must be an int"),
        ("test", vg_entry(), MissingKeyError, "entry 1 has no 'question_id' key"),
    ],
)
def test_bad_entries_name_file_entry_and_key(roots, tmp_path, split, entry, error, match):
    ann = write_ann(tmp_path / "bad.json", [vqa_entry(), entry])
    with pytest.raises(error, match=f"bad.json: {match}"):
        VQADataset(ann, roots["vqa"], first_pixel, split, vg_root=roots["vg"])


def test_missing_image_root_image_and_answer_list(roots, tmp_path):
    ann = write_ann(tmp_path / "train.json", [vqa_entry(), vg_entry()])
    with pytest.raises(ValueError, match="train.json: entry 1: a 'vg' entry, but no vg_root"):
        VQADataset(ann, roots["vqa"], first_pixel)
    ds = VQADataset(
        write_ann(tmp_path / "t.json", [vqa_entry(image="gone.png")]), roots["vqa"], first_pixel
    )
    with pytest.raises(FileNotFoundError, match="image not found: .*vqa/gone.png"):
        ds[0]
    with pytest.raises(ValueError, match="answer list .*empty.json is empty"):
        read_answer_list(write_ann(tmp_path / "empty.json", []))
    with pytest.raises(TypeError, match="answers.json: entry 1 must be str"):
        read_answer_list(write_ann(tmp_path / "answers.json", ["yes", 2]))
    with pytest.raises(ValueError, match="split must be one of"):
        VQADataset(ann, roots["vqa"], first_pixel, "val")


@pytest.mark.parametrize(
    "matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_answer_accuracy_is_the_vqa_metric(matches, expected):
    annotators = ["yes"] * matches + ["no"] * (10 - matches)
    # min(1, matches among the other 9 / 3), averaged over the 10 left out
    assert answer_accuracy("yes", annotators) == pytest.approx(expected)


def test_accuracy_needs_every_answer_known():
    annotation = [
        {"question_id": 1, "answer": ["a"] * 10},
        {"question_id": 2, "answer": ["b"] * 10},
    ]
    results = [{"question_id": 1, "answer": "a"}, {"question_id": 2, "answer": "c"}]
    assert accuracy(results, annotation) == 50.0
    with pytest.raises(ValueError, match=r"1 without annotator answers \(question ids \[3\]\)"):
        accuracy(results + [{"question_id": 3, "answer": "a"}], annotation)


# Synthetic VQA ---------------------------------------------------------------------------------

TWO = Scene(("gray",), (("small", "red", "circle"), ("large", "blue", "circle")))
THREE = Scene(
    ("white", "black"),
    (("large", "red", "star"), ("small", "green", "square"), ("small", "red", "cross")),
)


def test_scene_questions_answer_what_the_scene_shows():
    rng = np.random.default_rng(0)
    asked = {}
    for _ in range(200):
        for scene in (TWO, THREE):
            for _, question, answer in scene_questions(scene, rng, len(KINDS)):
                asked.setdefault((scene, question), set()).add(answer)
    assert all(len(answers) == 1 for answers in asked.values())  # one truth per question
    truth = {q: answers.pop() for (s, q), answers in asked.items() if s == THREE}
    expected = {
        "what color is the star?": "red",
        "what color is the square?": "green",
        "what color is the cross?": "red",
        "how many shapes are there?": "3",
        "what shape is on the left?": "star",
        "what shape is in the middle?": "square",
        "what shape is on the right?": "cross",
        "what color is the top of the background?": "white",
        "what color is the bottom of the background?": "black",
        "is there a red star?": "yes",
        "is there a green square?": "yes",
        "is there a red cross?": "yes",
        "is the red star small or large?": "large",
        "is the green square small or large?": "small",
        "is the red cross small or large?": "small",
    }
    assert expected.items() <= truth.items()
    absent = {q: a for q, a in truth.items() if q not in expected}
    assert absent and set(absent.values()) == {"no"}
    present = {f"is there a {c} {s}?" for _, c, s in THREE.objects}
    assert all(q.startswith("is there a ") and q not in present for q in absent)
    two = {q for s, q in asked if s == TWO}
    # two circles: no question names "the circle"; two objects: no middle
    assert "what color is the circle?" not in two and "what shape is in the middle?" not in two
    assert {"is the red circle small or large?", "is the blue circle small or large?"} <= two


@pytest.fixture(scope="module")
def synthetic_vqa(tmp_path_factory):
    return make_synthetic(
        tmp_path_factory.mktemp("vqa"), n_train_images=200, n_test_images=60, image_size=32
    )


def test_synthetic_files_load_with_annotator_votes(synthetic_vqa):
    answer_list = read_answer_list(synthetic_vqa["answer_list"])
    assert sorted(answer_list) == sorted(a for kind in KINDS for a in ANSWERS[kind])
    train = VQADataset(synthetic_vqa["vqa_train"], synthetic_vqa["root"], first_pixel)
    test = VQADataset(synthetic_vqa["vqa_test"], synthetic_vqa["root"], first_pixel, "test")
    assert (len(train), len(test)) == (600, 180)  # 3 questions per image
    for entry in train.annotation + test.annotation:
        votes = Counter(entry["answer"]).most_common()
        assert len(entry["answer"]) == ANNOTATORS and votes[0][1] >= 7
        assert {a for a, _ in votes} <= set(ANSWERS[answer_kind(entry["answer"])])
    _, _, answers, weights = train.entry(0)
    assert sum(weights) == pytest.approx(1.0) and weights[0] >= 0.7
    kinds = Counter(answer_kind(e["answer"]) for e in train.annotation)
    assert set(kinds) == set(KINDS) and min(kinds.values()) > 60
    exists = Counter(Counter(e["answer"]).most_common(1)[0][0] for e in train.annotation)
    assert abs(exists["yes"] - exists["no"]) < 0.3 * (exists["yes"] + exists["no"])
    # the docstring's chance (about 45% VQA accuracy), within this small split's noise
    assert 35 < blind_accuracy(train.annotation, test.annotation) < 55


def test_vqa_files_leave_the_other_files_unchanged(tmp_path):
    small = dict(n_train_images=6, n_test_images=4, n_val_images=2, image_size=16)
    one = make_synthetic(tmp_path / "one", vqa_questions_per_image=1, **small)
    two = make_synthetic(tmp_path / "two", vqa_questions_per_image=4, **small)
    for name in ("train", "test", "val", "pretrain", "nlvr_train", "nlvr_test"):
        assert one[name].read_bytes() == two[name].read_bytes(), name
    assert len(json.loads(two["vqa_test"].read_text())) == 16
