"""VQA evaluation: official question normalisation, the test loop (rank and generate) and the
result file of the VQA v2 server."""

import json

import pytest
import torch

from blip_fast.eval.vqa import evaluate, write_results
from blip_fast.models import create_model
from blip_fast.text import pre_question

QUESTIONS = ["what is this?", "how many dogs are there", "is it red, or blue?", "where is it"]
ANSWER_LIST = ["yes", "no", "2", "red", "a red dog", "in the park", "tennis racket"]


@pytest.mark.parametrize(
    "question, expected",
    [
        ("What is THIS?", "what is this?"),
        # deleted, not replaced by a space: "a.b" -> "ab"
        ('a.b!c"d(e)f*g#h:i;j~k', "abcdefghijk"),
        # ? , ' and inner runs of spaces are kept; trailing spaces stripped, leading kept
        ("  is it red,  or   blue's?   ", "  is it red,  or   blue's?"),
        ("ends with a dot. ", "ends with a dot"),
        ("trailing newline\n", "trailing newline\n"),  # only spaces are stripped
        ("...", ""),
    ],
)
def test_pre_question(question, expected):
    assert pre_question(question) == expected


def test_pre_question_keeps_max_words():
    words = [f"w{i}" for i in range(60)]
    assert pre_question(" ".join(words)) == " ".join(words[:50])
    assert pre_question(" ".join(words), max_words=3) == "w0 w1 w2"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("vqa", "blip_tiny").eval()


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(len(QUESTIONS), 3, 64, 64, generator=g)
    return [(pixels[:3], QUESTIONS[:3], torch.tensor([7, 8, 9])), (pixels[3:], QUESTIONS[3:], [10])]


def test_rank_and_generate_results(model, batches, tmp_path):
    fast = evaluate(model, batches, ANSWER_LIST, k_test=3)
    assert fast == evaluate(model, batches, ANSWER_LIST, k_test=3, mode="reference")
    assert [r["question_id"] for r in fast] == [7, 8, 9, 10]
    pixels = torch.cat([b[0] for b in batches])
    want = model.rank(pixels, QUESTIONS, ANSWER_LIST, k_test=3)
    assert [r["answer"] for r in fast] == [ANSWER_LIST[i] for i in want]
    generated = evaluate(model, batches, inference="generate")
    assert [r["answer"] for r in generated] == model.generate(pixels, QUESTIONS)
    path = write_results(fast, tmp_path / "out" / "vqa_result.json")
    assert json.loads(path.read_text()) == fast
    assert all(type(r["question_id"]) is int for r in fast)


def test_bad_input(model, batches, tmp_path):
    with pytest.raises(ValueError, match="non-empty answer_list"):
        evaluate(model, batches, [], k_test=3)
    with pytest.raises(ValueError, match="inference must be one of"):
        evaluate(model, batches, ANSWER_LIST, inference="beam")
    pixels, questions, ids = batches[0]
    with pytest.raises(ValueError, match="3 images has 2 questions"):
        evaluate(model, [(pixels, questions[:2], ids)], ANSWER_LIST)
    with pytest.raises(ValueError, match="result 1 is .*expected"):
        write_results(
            [{"question_id": 1, "answer": "a"}, {"question_id": "2", "answer": "b"}],
            tmp_path / "bad.json",
        )
