"""NLVR² evaluation: accuracy over a split, batches that do not divide it, the official text
handling (no truncation) and the real model's predictions."""

import json

import pytest
import torch
from PIL import Image
from torch import nn

from blip_fast.data import test_transform
from blip_fast.data.nlvr import NLVRDataset, collate_nlvr
from blip_fast.eval.nlvr import accuracy, evaluate, tokenize
from blip_fast.models import BlipConfig, create_model
from blip_fast.tokenization import tokenizer

RED, GREEN = (255, 0, 0), (0, 255, 0)


class RedFirstModel(nn.Module):
    """Says "True" exactly when the first image is red; records what it was given."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, images, ids, mask):
        B = ids.shape[0]
        self.calls.append((images.clone(), ids.clone(), mask.clone()))
        red_first = images[:B, 0].mean((1, 2)) > images[:B, 1].mean((1, 2))
        return torch.stack([~red_first, red_first], dim=1).float()


@pytest.fixture
def split(tmp_path):
    """Five pairs: three labelled as RedFirstModel answers, two against it (accuracy 60 %)."""
    Image.new("RGB", (16, 16), RED).save(tmp_path / "red.png")
    Image.new("RGB", (16, 16), GREEN).save(tmp_path / "green.png")
    red, green = ["red.png", "green.png"], ["green.png", "red.png"]
    long = "the left one " * 15  # 45 words: 40 kept, 42 tokens with [CLS] and [SEP]
    entries = [
        {"images": red, "sentence": "the left image is red", "label": "True"},
        {"images": green, "sentence": "the left image is red", "label": "False"},
        {"images": red, "sentence": long, "label": "True"},
        {"images": green, "sentence": "the left image is green", "label": "True"},
        {"images": red, "sentence": "the right image is red", "label": "False"},
    ]
    (tmp_path / "dev.json").write_text(json.dumps(entries))
    return NLVRDataset(tmp_path / "dev.json", tmp_path, test_transform(16))


@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_accuracy_of_a_tiny_split(split, batch_size):
    model = RedFirstModel()
    result = evaluate(model, split, batch_size=batch_size)
    assert result == {"acc": pytest.approx(60.0), "n": 5}
    images, ids, mask = model.calls[0]
    B = ids.shape[0]
    assert images.shape[0] == 2 * B
    # first images, then second images: pair 0 is (red, green)
    assert images[0, 0].mean() > images[0, 1].mean() and images[B, 1].mean() > images[B, 0].mean()
    longest = max(call[1].shape[1] for call in model.calls)
    assert longest == 2 + 40  # never truncated to 35 tokens as retrieval texts are


def test_accuracy_checks_its_inputs():
    assert accuracy(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 1, 0])) == 50.0
    with pytest.raises(ValueError, match="must be the same non-empty"):
        accuracy(torch.tensor([1, 0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="must be the same non-empty"):
        accuracy(torch.tensor([]), torch.tensor([]))


def test_real_model_accuracy_is_its_predictions(split):
    cfg = BlipConfig.preset("blip_tiny")
    cfg.vision.image_size = 16
    model = create_model("nlvr", cfg).train()
    with torch.no_grad():
        for p in model.cls_head.parameters():
            p.normal_(0.0, 1.0)
    result = evaluate(model, split, batch_size=2)
    assert model.training  # evaluation put it back as it was
    model.eval()
    images, sentences, labels = collate_nlvr([split[i] for i in range(len(split))])
    with torch.no_grad():
        preds = model(images, *tokenize(tokenizer(), sentences, "cpu")).argmax(-1)
    assert result["acc"] == pytest.approx(100.0 * (preds == labels).float().mean().item())
