"""Training-step input that has no sensible loss gets a clear error or a documented, tested
behaviour, never a silent NaN: a batch of one (no hard negative), a batch of one image's
captions, a caption that is empty after normalisation, images of one colour."""

import json

import pytest
import torch
from test_step_levers import _model, _samples

from blip_fast import tokenizer
from blip_fast.data.corrupt_report import read_corrupt_report
from blip_fast.data.datasets import EMPTY_CAPTION
from blip_fast.train.data import Collate
from blip_fast.train.loop import negative_uniforms
from blip_fast.train.main import build_trainer
from blip_fast.train.task import ContrastiveTask


def _step(task: str, samples):
    model = _model(task)
    batch = {**Collate(tokenizer(), task)(samples), "alpha": 0.4}
    batch["neg_u"] = negative_uniforms(0, 0, 0, len(samples))
    out = ContrastiveTask(model, lm=task == "pretrain")(batch)
    out["loss"].backward()
    return out


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_a_batch_of_one_is_refused_by_name(task):
    with pytest.raises(ValueError, match="a batch of 1 has none; train with batch_size >= 2"):
        _step(task, _samples(0)[:1])


def test_a_batch_of_one_images_captions_has_no_negative_to_draw():
    samples = [(image, caption, 7) for image, caption, _ in _samples(0)]  # one image id
    with pytest.raises(RuntimeError, match="no candidate of positive weight"):
        _step("retrieval", samples)


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_one_colour_images_and_an_empty_caption_train_to_finite_losses(task):
    samples = [
        (torch.full((3, 64, 64), float(i % 2)), caption, i)  # two flat colours
        for i, (_, caption, _) in enumerate(_samples(0))
    ]
    samples[1] = (samples[1][0], "", 1)  # [CLS] [SEP]
    out = _step(task, samples)
    assert all(torch.isfinite(v) for k, v in out.items() if k != "queue")


def test_training_lists_and_replaces_a_caption_empty_after_normalisation(synthetic_train, tmp_path):
    ann = json.loads(open(synthetic_train["train"]).read())
    ann[2]["caption"] = " !!! ... "  # official pre_caption blanks all of it
    (tmp_path / "train.json").write_text(json.dumps(ann))
    cfg = {
        "model": "blip_tiny",
        "train_file": str(tmp_path / "train.json"),
        "image_root": str(synthetic_train["image_root"]),
        "batch_size": 4,
        "init_lr": 1e-4,
        "max_epoch": 1,
        "queue_size": 16,
    }
    trainer = build_trainer("retrieval", cfg, tmp_path / "out", num_workers=0)
    trainer.train()
    report = read_corrupt_report(tmp_path / "out" / "corrupt_images.tsv")
    assert [(r["index"], r["error"]) for r in report] == [(2, EMPTY_CAPTION)]
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert len(log) == len(ann) // 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
