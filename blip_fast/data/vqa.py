"""VQA v2 + Visual Genome QA over the official BLIP annotation files.

Train files (``vqa_train.json``, ``vqa_val.json``, ``vg_qa.json``): entries ``{"question_id",
"question", "answer", "image", "dataset"}``; ``dataset`` "vqa" (``answer``: the annotators'
answers, a list with repeats) or "vg" (``answer``: one string). Test file ``vqa_test.json``:
``{"question_id": int, "question", "image", "dataset"}`` (an ``answer`` list, where present, is
kept for scoring). ``answer_list.json``: the candidate answers of rank inference. Image paths
are relative to the root of their entry's data set (official ``vqa_root`` / ``vg_root``).

Annotations are read and checked whole at construction: a bad entry raises with the file, the
entry index, the key and the value. Images are opened in ``__getitem__``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from blip_fast.data.datasets import MissingKeyError, _read_json
from blip_fast.data.images import load_image
from blip_fast.data.uint8_transforms import normalize_uint8
from blip_fast.text import pre_question

__all__ = [
    "SPLITS",
    "VG_WEIGHT",
    "VQADataset",
    "answer_weights",
    "collate_vqa",
    "collate_vqa_test",
    "read_answer_list",
]

SPLITS = ("train", "test")
VG_WEIGHT = 0.2  # official: a Visual Genome question's one answer
PathLike = str | os.PathLike


def answer_weights(answers: list[str]) -> tuple[list[str], list[float]]:
    """A VQA question's distinct answers (in order of first appearance) and their weights: the
    share of the annotators who gave each, summed 1/len(answers) at a time as official."""
    weights: dict[str, float] = {}
    for answer in answers:
        weights[answer] = weights.get(answer, 0.0) + 1 / len(answers)
    return list(weights), list(weights.values())


def read_answer_list(path: PathLike) -> list[str]:
    """The candidate answers of ``answer_list.json``: a non-empty list of str."""
    answers = _read_json(Path(path))
    if not answers:
        raise ValueError(f"answer list {path} is empty")
    for i, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise TypeError(f"answer list {path}: entry {i} must be str, got {answer!r}")
    return answers


def _check_answers(value, dataset: str, where: str) -> None:
    if dataset == "vg":
        if not isinstance(value, str):
            raise TypeError(f"{where}: a 'vg' entry's 'answer' must be str, got {value!r}")
        return
    if not isinstance(value, list):
        raise TypeError(f"{where}: a 'vqa' entry's 'answer' must be a list of str, got {value!r}")
    if not value:
        raise ValueError(f"{where}: 'answer' is an empty list")
    for j, answer in enumerate(value):
        if not isinstance(answer, str):
            raise TypeError(f"{where}: 'answer'[{j}] must be str, got {answer!r}")


def _check_entry(entry, split: str, roots: dict, where: str) -> None:
    if not isinstance(entry, dict):
        raise TypeError(f"{where} must be an object, got {type(entry).__name__}")
    keys = ("question", "answer", "image", "dataset")
    if split == "test":
        keys = ("question_id", "question", "image", "dataset")
    for key in keys:
        if key not in entry:
            raise MissingKeyError(f"{where} has no '{key}' key (keys: {sorted(entry)})")
    dataset = entry["dataset"]
    if dataset not in roots:
        raise ValueError(f"{where}: 'dataset' must be 'vqa' or 'vg', got {dataset!r}")
    if roots[dataset] is None:
        raise ValueError(f"{where}: a {dataset!r} entry, but no {dataset}_root was given")
    for key in ("question", "image"):
        if not isinstance(entry[key], str):
            raise TypeError(f"{where}: '{key}' must be str, got {entry[key]!r}")
    if split == "train":
        _check_answers(entry["answer"], dataset, where)
        return
    qid = entry["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, int):
        raise TypeError(f"{where}: 'question_id' must be an int, got {qid!r}")
    if "answer" in entry:  # ground truth of a scored test split
        _check_answers(entry["answer"], "vqa", where)


class VQADataset(Dataset):
    """Official ``vqa_dataset``. ``split="train"``: item = (image, question, answers, weights),
    a "vqa" entry's distinct answers weighted by ``answer_weights``, a "vg" entry's one answer
    by ``VG_WEIGHT``. ``split="test"``: item = (image, question, question_id). Questions are
    normalised by ``pre_question``. ``vg_root`` may stay None when no entry is "vg"."""

    def __init__(
        self,
        ann_files: PathLike | Sequence[PathLike],
        vqa_root: PathLike,
        transform: Callable[[Image.Image], torch.Tensor],
        split: str = "train",
        vg_root: PathLike | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(ann_files, (str, os.PathLike)):
            ann_files = [ann_files]
        self.roots = {"vqa": vqa_root, "vg": vg_root}
        self.annotation = []
        for f in ann_files:
            path = Path(f)
            entries = _read_json(path)
            if not entries:
                raise ValueError(f"annotation file {path} has no entries")
            for i, entry in enumerate(entries):
                _check_entry(entry, split, self.roots, f"{path}: entry {i}")
            self.annotation += entries
        self.transform, self.split = transform, split

    def __len__(self) -> int:
        return len(self.annotation)

    def entry(self, index: int) -> tuple:
        """The item's image path and its other fields, as ``__getitem__`` returns them."""
        ann = self.annotation[index]
        path = os.path.join(self.roots[ann["dataset"]], ann["image"])
        question = pre_question(ann["question"])
        if self.split == "test":
            return path, question, ann["question_id"]
        if ann["dataset"] == "vg":
            return path, question, [ann["answer"]], [VG_WEIGHT]
        return path, question, *answer_weights(ann["answer"])

    def __getitem__(self, index: int):
        path, *fields = self.entry(index)
        return self.transform(load_image(path)), *fields


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    """(B, 3, S, S) float32; uint8 images (``Uint8TestTransform`` / ``Uint8TrainTransform``)
    normalised here."""
    images = torch.stack(images)
    return normalize_uint8(images) if images.dtype == torch.uint8 else images


def collate_vqa(batch: list[tuple]) -> tuple:
    """Train items -> the official ``vqa_collate_fn`` batch: images (B, 3, S, S), questions
    (B str), answers (every question's answers in turn, sum(n) str), weights (sum(n),)
    float32, n (B int: each question's number of answers)."""
    answers, weights, n = [], [], []
    for _, _, item_answers, item_weights in batch:
        answers += item_answers
        weights += item_weights
        n.append(len(item_answers))
    images = _stack([item[0] for item in batch])
    return images, [item[1] for item in batch], answers, torch.tensor(weights), n


def collate_vqa_test(batch: list[tuple]) -> tuple:
    """Test items -> (images (B, 3, S, S), questions (B str), question ids (B int)), the
    batches ``blip_fast.eval.vqa.evaluate`` takes."""
    images = _stack([item[0] for item in batch])
    return images, [item[1] for item in batch], [item[2] for item in batch]
