"""Synthetic VQA over the scenes of ``blip_fast.data.synthetic``, in the official BLIP VQA
formats (``blip_fast.data.vqa``), so that fine-tuning can be shown to learn without downloads.

Question kinds, each asked only where its answer is unambiguous:

- ``colour``: "what color is the {shape}?" (one object of that shape) -> one of 8 colours
- ``count``: "how many shapes are there?" -> "2" | "3"
- ``position``: "what shape is on the left?" (on the right, in the middle) -> one of 6 shapes
- ``background``: "what color is the background?" (one-colour) or "what color is the top
  (bottom) of the background?" (two-tone) -> one of 4 background colours
- ``exists``: "is there a {colour} {shape}?" -> "yes" | "no", half each
- ``size``: "is the {colour} {shape} small or large?" -> "small" | "large"

Every question has 10 annotator answers, as VQA v2: each annotator names another answer of the
same kind with probability 0.1 (at most 3 do), so the true answer has 7 to 10 votes and
training weights of 0.7 to 1.

Chance: every answer is uniform within its kind and the question's words tell nothing about
it, so a blind model can do no better than a kind's prior: 1/8, 1/2, 1/6, 1/4, 1/2 and 1/2,
34% exact matches with the kinds drawn equally often. VQA accuracy also credits a wrong answer
that dissenting annotators gave (up to 0.9 for 3 of 10), which lifts the blind answers to about
45% (44.6% on 30,000 questions). ``blind_accuracy`` measures it on a split: each test question
answered with the commonest training answer of its kind.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from blip_fast.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, Scene, _dump
from blip_fast.eval.vqa import answer_accuracy

__all__ = [
    "ANNOTATORS",
    "ANSWERS",
    "KINDS",
    "annotator_answers",
    "answer_kind",
    "blind_accuracy",
    "scene_questions",
    "write_synthetic_vqa",
]

ANNOTATORS = 10  # answers per question, as VQA v2
DISSENT = 0.1  # chance that an annotator gives another answer than the true one
MAX_DISSENT = 3  # at most 3 dissenters, so the truth wins outright
ANSWERS = {
    "colour": tuple(COLOURS),
    "count": ("2", "3"),
    "position": SHAPES,
    "background": tuple(BACKGROUNDS),
    "exists": ("yes", "no"),
    "size": ("small", "large"),
}
KINDS = tuple(ANSWERS)
POSITIONS = {
    2: ("on the left", "on the right"),
    3: ("on the left", "in the middle", "on the right"),
}


def _questions_of_kind(scene: Scene, kind: str, rng: np.random.Generator) -> list[tuple]:
    """Every (question, answer) of ``kind`` about ``scene`` ([] where none is unambiguous);
    ``exists`` draws its answer, yes or no, and an absent object from ``rng``."""
    objects = scene.objects
    shapes = Counter(shape for _, _, shape in objects)
    named = Counter((colour, shape) for _, colour, shape in objects)
    if kind == "colour":
        return [(f"what color is the {s}?", c) for _, c, s in objects if shapes[s] == 1]
    if kind == "count":
        return [("how many shapes are there?", str(len(objects)))]
    if kind == "position":
        where = POSITIONS[len(objects)]
        return [(f"what shape is {w}?", s) for w, (_, _, s) in zip(where, objects, strict=True)]
    if kind == "background":
        if len(scene.background) == 1:
            return [("what color is the background?", scene.background[0])]
        return [
            (f"what color is the {half} of the background?", colour)
            for half, colour in zip(("top", "bottom"), scene.background, strict=True)
        ]
    if kind == "exists":
        if rng.random() < 0.5:
            return [(f"is there a {c} {s}?", "yes") for c, s in sorted(named)]
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in named]
        c, s = absent[int(rng.integers(len(absent)))]
        return [(f"is there a {c} {s}?", "no")]
    if kind == "size":
        return [
            (f"is the {c} {s} small or large?", size)
            for size, c, s in objects
            if named[(c, s)] == 1
        ]
    raise ValueError(f"unknown question kind {kind!r}; known: {KINDS}")


def scene_questions(scene: Scene, rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """``n`` (kind, question, answer) about ``scene``, of distinct kinds while they last, each
    kind drawn uniformly among those with a question."""
    out = []
    for kind in [KINDS[i] for i in rng.permutation(len(KINDS))]:
        if len(out) == n:
            break
        options = _questions_of_kind(scene, kind, rng)
        if options:
            question, answer = options[int(rng.integers(len(options)))]
            out.append((kind, question, answer))
    return out


def annotator_answers(kind: str, answer: str, rng: np.random.Generator) -> list[str]:
    """``ANNOTATORS`` answers to a question whose true answer is ``answer``: each another
    answer of ``kind`` with probability ``DISSENT`` (at most ``MAX_DISSENT``), in random
    order."""
    others = [a for a in ANSWERS[kind] if a != answer]
    dissent = min(int(rng.binomial(ANNOTATORS, DISSENT)), MAX_DISSENT)
    answers = [answer] * (ANNOTATORS - dissent)
    answers += [others[int(rng.integers(len(others)))] for _ in range(dissent)]
    return [answers[i] for i in rng.permutation(ANNOTATORS)]


def answer_kind(annotators: list[str]) -> str:
    """The kind of a question, from its annotators' answers (the kinds' answers are disjoint)."""
    return next(kind for kind in KINDS if annotators[0] in ANSWERS[kind])


def blind_accuracy(train: list[dict], test: list[dict]) -> float:
    """Mean VQA accuracy (%) on ``test`` entries of answering each with the most voted
    ``train`` answer of its kind (which its words tell): the best a model that ignores the
    image can expect."""
    votes = {kind: Counter() for kind in KINDS}
    for entry in train:
        votes[answer_kind(entry["answer"])].update(entry["answer"])
    prior = {kind: v.most_common(1)[0][0] for kind, v in votes.items() if v}
    scores = [answer_accuracy(prior[answer_kind(e["answer"])], e["answer"]) for e in test]
    return 100.0 * sum(scores) / len(scores)


def _entries(images: list[tuple[str, Scene]], per_image: int, rng: np.random.Generator):
    """Official VQA entries (question ids image * 10 + k), their 10 answers included."""
    return [
        {
            "question_id": i * 10 + k,
            "question": question,
            "answer": annotator_answers(kind, answer, rng),
            "image": rel,
            "dataset": "vqa",
        }
        for i, (rel, scene) in enumerate(images)
        for k, (kind, question, answer) in enumerate(scene_questions(scene, rng, per_image))
    ]


def write_synthetic_vqa(
    root: Path,
    train_images: list[tuple[str, Scene]],
    test_images: list[tuple[str, Scene]],
    rng: np.random.Generator,
    questions_per_image: int = 3,
) -> dict[str, Path]:
    """Write ``vqa_train.json`` and ``vqa_test.json`` (``questions_per_image`` questions per
    (relpath, scene) of each split; test entries keep their annotators' answers for scoring)
    and ``answer_list.json`` (every answer of every kind) under ``root``; return their paths."""
    if not 1 <= questions_per_image <= len(KINDS):
        raise ValueError(f"questions_per_image must be in [1, {len(KINDS)}]")
    splits = {"vqa_train": train_images, "vqa_test": test_images}
    paths = {
        name: _dump(_entries(images, questions_per_image, rng), root / f"{name}.json")
        for name, images in splits.items()
    }
    answers = [answer for kind in KINDS for answer in ANSWERS[kind]]
    return {**paths, "answer_list": _dump(answers, root / "answer_list.json")}
