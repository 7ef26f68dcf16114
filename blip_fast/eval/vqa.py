"""VQA inference over a test set and the result file of the VQA v2 evaluation server.

``evaluate`` runs the official test loop: the answer list is tokenised once ([DEC] first,
padded to its longest answer), then per batch the questions are encoded against their images
and answered by ``rank`` (``BlipVQA.rank_answers``, fast or reference) or ``generate`` (beam
search). ``write_results`` writes ``[{"question_id": int, "answer": str}, ...]``; ``accuracy``
scores them where the annotators' answers are known (the VQA v2 metric, without its answer
normalisation). ``evaluate_split`` runs all three on a ``VQADataset`` test split.
"""

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from blip_fast.data.vqa import collate_vqa_test

__all__ = [
    "INFERENCE",
    "accuracy",
    "answer_accuracy",
    "evaluate",
    "evaluate_split",
    "write_results",
]

INFERENCE = ("rank", "generate")


@torch.no_grad()
def evaluate(
    model,
    batches,
    answer_list=None,
    inference="rank",
    k_test=128,
    mode="fast",
    device="cpu",
    progress=False,
) -> list[dict]:
    """Answers of a ``BlipVQA`` to every question of ``batches``, an iterable of (pixels
    (B, 3, S, S), B questions normalised by ``pre_question``, B question ids) as the official
    VQA test loader yields them. ``inference`` "rank" picks from ``answer_list`` (k_test
    candidates, ``mode`` "fast" or "reference"); "generate" decodes free text."""
    if inference not in INFERENCE:
        raise ValueError(f"inference must be one of {INFERENCE}, got {inference!r}")
    if inference == "rank":
        if not answer_list:
            raise ValueError("rank inference needs a non-empty answer_list")
        answer_ids, answer_mask = model.tokenize_answers(list(answer_list), device)
    results = []
    for pixels, questions, question_ids in tqdm(batches, desc="vqa", disable=not progress):
        pixels = pixels.to(device)
        if len(questions) != pixels.shape[0] or len(question_ids) != pixels.shape[0]:
            raise ValueError(
                f"a batch of {pixels.shape[0]} images has {len(questions)} questions and "
                f"{len(question_ids)} question ids: need one of each per image"
            )
        if inference == "generate":
            answers = model.generate(pixels, list(questions))
        else:
            ids, mask = model.tokenize_questions(list(questions), device)
            states = model.encode_questions(pixels, ids, mask)
            best = model.rank_answers(states, mask, answer_ids, answer_mask, k_test, mode)
            answers = [answer_list[i] for i in best.tolist()]
        results += [
            {"question_id": int(q), "answer": a} for q, a in zip(question_ids, answers, strict=True)
        ]
    return results


def write_results(results: list[dict], path) -> Path:
    """``results`` as the VQA v2 server's JSON list; every entry must be exactly
    {"question_id": int, "answer": str}."""
    for i, r in enumerate(results):
        if (
            not isinstance(r, dict)
            or set(r) != {"question_id", "answer"}
            or isinstance(r["question_id"], bool)
            or not isinstance(r["question_id"], int)
            or not isinstance(r["answer"], str)
        ):
            raise ValueError(
                f"{path}: result {i} is {r!r}; expected {{'question_id': int, 'answer': str}}"
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results), encoding="utf-8")
    return path


def answer_accuracy(answer: str, annotators: list[str]) -> float:
    """The VQA v2 accuracy of ``answer``: min(1, matching annotators / 3), averaged over the
    sets of annotators that leave one out; strings compared exactly."""
    matches = sum(a == answer for a in annotators)
    return sum(min(1.0, (matches - (a == answer)) / 3) for a in annotators) / len(annotators)


def accuracy(results: list[dict], annotation: list[dict]) -> float:
    """Mean ``answer_accuracy`` (%) of ``results`` against the ``answer`` lists of
    ``annotation`` entries (matched by question_id); every result needs one."""
    truth = {e["question_id"]: e.get("answer") for e in annotation}
    unscored = [r["question_id"] for r in results if not truth.get(r["question_id"])]
    if not results or unscored:
        raise ValueError(
            f"{len(results)} results, {len(unscored)} without annotator answers "
            f"(question ids {unscored[:5]}): cannot score"
        )
    scores = [answer_accuracy(r["answer"], truth[r["question_id"]]) for r in results]
    return 100.0 * sum(scores) / len(scores)


def evaluate_split(
    model,
    dataset,
    out,
    answer_list=None,
    inference="rank",
    k_test=128,
    mode="fast",
    batch_size=32,
    num_workers=0,
    device="cpu",
    progress=False,
) -> dict:
    """``evaluate`` ``model`` (in eval mode, restored after) on a ``VQADataset`` test split,
    ``write_results`` to ``out``: ``{"n": questions, "result_file": out}``, with ``"acc"``
    (``accuracy``, %) when every entry carries its annotators' answers (VQA v2 test-dev has
    none: its server scores the file). Official test batch size 32."""
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_vqa_test
    )
    was_training = model.training
    model.eval()
    try:
        results = evaluate(model, loader, answer_list, inference, k_test, mode, device, progress)
    finally:
        model.train(was_training)
    summary = {"n": len(results), "result_file": str(write_results(results, out))}
    if all("answer" in entry for entry in dataset.annotation):
        summary["acc"] = accuracy(results, dataset.annotation)
    return summary
