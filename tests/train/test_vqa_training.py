"""VQA fine-tuning: ``VQATask``'s loss and gradients against the official ``BLIP_VQA`` training
loss written out by hand, the official vqa.yaml keys, ``blip-fast train vqa`` through the
training loop (steps, exact resume, the official result file of the test split) and ``blip-fast
eval-vqa``.

How far a short fine-tune from the demo's pre-trained weights gets above chance is measured by
hand (README), not here: the demo's pre-training alone takes minutes on a CPU."""

import json

import pytest
import torch
import torch.nn.functional as F

from blip_fast import tokenizer
from blip_fast.models import create_model
from blip_fast.train.config import validate_config
from blip_fast.train.data import VQACollate
from blip_fast.train.main import build_trainer
from blip_fast.train.task import VQATask

ENC, BOS, PAD = 30523, 30522, 0
# configs/vqa.yaml of the official release, unchanged
OFFICIAL_VQA = {
    "vqa_root": "/export/share/datasets/vision/VQA/Images/mscoco/",
    "vg_root": "/export/share/datasets/vision/visual-genome/",
    "train_files": ["vqa_train", "vqa_val", "vg_qa"],
    "ann_root": "annotation",
    "pretrained": "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
    "model_base_vqa_capfilt_large.pth",
    "vit": "base",
    "batch_size_train": 16,
    "batch_size_test": 32,
    "vit_grad_ckpt": False,
    "vit_ckpt_layer": 0,
    "init_lr": 2e-5,
    "image_size": 480,
    "k_test": 128,
    "inference": "rank",
    "weight_decay": 0.05,
    "min_lr": 0,
    "max_epoch": 10,
}
# (question, answers, weights) as the official dataset gives them: distinct answers, VG's 0.2
ITEMS = [
    ("what color is the cat?", ["red", "dark red"], [0.7, 0.3]),
    ("how many", ["2"], [0.2]),
    ("is this a dog in the park with a ball?", ["yes", "no", "yes it is"], [0.5, 0.3, 0.2]),
]


def official_loss(model, pixels, questions, answers, n, weights):
    """``BLIP_VQA.forward(train=True)`` step by step: question states repeated per answer in a
    Python loop, decoder logits, the shifted label-smoothed (0.1) cross-entropy with reduction
    'none' summed per answer, weighted, summed, divided by the batch size."""
    tok = tokenizer()
    question = tok(questions, padding="longest", truncation=True, max_length=35)
    q_ids = question["input_ids"].clone()
    q_ids[:, 0] = ENC
    answer = tok(answers, padding="longest")
    a_ids = answer["input_ids"].clone()
    a_ids[:, 0] = BOS
    targets = a_ids.masked_fill(a_ids == PAD, -100)
    image_embeds = model.visual_encoder(pixels)
    output = model.text_encoder(q_ids, question["attention_mask"], image_embeds, mode="multimodal")
    states, atts = [], []
    for b, count in enumerate(n):
        states += [output[b]] * count
        atts += [question["attention_mask"][b]] * count
    logits = model.text_decoder(
        a_ids, answer["attention_mask"], torch.stack(states), torch.stack(atts).bool()
    )
    ce = F.cross_entropy(
        logits[:, :-1].flatten(0, 1),
        targets[:, 1:].flatten(),
        reduction="none",
        label_smoothing=0.1,
    )
    return (weights * ce.view(len(answers), -1).sum(1)).sum() / pixels.shape[0]


def test_task_loss_and_gradients_match_the_official_loss():
    torch.manual_seed(0)
    model = create_model("vqa", "blip_tiny").eval()  # no dropout: the same function twice
    pixels = torch.randn(len(ITEMS), 3, 64, 64)
    batch = VQACollate(tokenizer())([(p, *item) for p, item in zip(pixels, ITEMS, strict=True)])
    assert batch["n"].tolist() == [2, 1, 3] and batch["answer_ids"].shape[0] == 6
    params = [p for p in model.parameters() if p.requires_grad]

    loss = VQATask(model)(batch)["loss"]
    questions = [q for q, _, _ in ITEMS]
    answers = [a for _, item_answers, _ in ITEMS for a in item_answers]
    weights = torch.tensor([w for *_, item_weights in ITEMS for w in item_weights])
    want = official_loss(model, pixels, questions, answers, [2, 1, 3], weights)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    as_strings = model.loss(pixels, questions, answers, [2, 1, 3], weights)
    torch.testing.assert_close(as_strings, want, rtol=1e-5, atol=1e-6)

    grads = torch.autograd.grad(loss, params, allow_unused=True)
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, g, w in zip(names, grads, want_grads, strict=True):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)
    for part in ("visual_encoder.", "text_encoder.", "text_decoder."):
        norms = [
            g.norm()
            for n, g in zip(names, grads, strict=True)
            if n.startswith(part) and g is not None
        ]
        assert norms and sum(norms) > 0, part

    # the loss is linear in the weights: doubling them doubles it
    doubled = VQATask(model)({**batch, "weights": 2 * batch["weights"]})["loss"]
    torch.testing.assert_close(doubled, 2 * loss, rtol=1e-5, atol=1e-6)


def test_official_vqa_config_passes_and_rejects_other_tasks_keys():
    validate_config("vqa", OFFICIAL_VQA)
    with pytest.raises(ValueError, match="unknown key 'queue_size' for vqa"):
        validate_config("vqa", {**OFFICIAL_VQA, "queue_size": 16})
    with pytest.raises(ValueError, match="inference: 'beam': expected one of"):
        validate_config("vqa", {**OFFICIAL_VQA, "inference": "beam"})


@pytest.fixture
def vqa_config(synthetic_train):
    root = str(synthetic_train["root"])
    return {
        "model": "blip_tiny",
        "ann_root": root,
        "vqa_root": root,
        "train_files": ["vqa_train"],
        "batch_size_train": 4,
        "batch_size_test": 8,
        "k_test": 8,
        "init_lr": 1e-4,
        "max_epoch": 2,
        "train_augment": False,
    }


def _log(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(out_dir / "log.jsonl")]


def test_fine_tune_resumes_exactly(vqa_config, tmp_path):
    straight = build_trainer("vqa", vqa_config, tmp_path / "straight", num_workers=0, max_steps=4)
    straight.train()
    want = _log(tmp_path / "straight")
    assert [r["global_step"] for r in want] == [1, 2, 3, 4]
    assert all(r["loss"] == r["vqa"] and torch.isfinite(torch.tensor(r["loss"])) for r in want)

    first = build_trainer("vqa", vqa_config, tmp_path / "split", num_workers=0, max_steps=2)
    first.train()
    again = build_trainer(
        "vqa",
        vqa_config,
        tmp_path / "split",
        num_workers=0,
        max_steps=4,
        resume=tmp_path / "split" / "checkpoint.pth",
    )
    assert again.global_step == 2
    again.train()
    for r, w in zip(_log(tmp_path / "split"), want, strict=True):  # same samples and dropout
        assert r["loss"] == pytest.approx(w["loss"], rel=1e-5, abs=1e-6), r["global_step"]


def test_train_vqa_cli_writes_the_official_result_then_eval_vqa(
    vqa_config, synthetic_train, tmp_path, capsys
):
    """``blip-fast train vqa --config vqa.yaml`` (the official keys, the model and sizes
    overridden to fit a test) trains 2 steps and answers the test split into
    result/vqa_result.json; ``eval-vqa`` gives the saved model's same answers."""
    from blip_fast import load
    from blip_fast.checkpoint import save
    from blip_fast.cli import main

    config = {k: v for k, v in OFFICIAL_VQA.items() if k != "pretrained"}
    config.update({k: vqa_config[k] for k in ("ann_root", "vqa_root", "train_files")})
    config["vg_root"] = vqa_config["vqa_root"]
    (tmp_path / "vqa.yaml").write_text("".join(f"{k}: {v!r}\n" for k, v in config.items()))
    main(
        ["train", "vqa", "--config", str(tmp_path / "vqa.yaml"), "model=blip_tiny",
         "image_size=64", "batch_size_train=4", "k_test=8", "--output-dir",
         str(tmp_path / "out"), "--max-steps", "2", "--num-workers", "0"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "trained 2 steps" in printed and "accuracy" in printed
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert ckpt["schedule"]["max_epoch"] == 10 and ckpt["schedule"]["kind"] == "cosine"
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0.05

    results = json.loads((tmp_path / "out" / "result" / "vqa_result.json").read_text())
    test = json.loads(synthetic_train["vqa_test"].read_text())
    answer_list = json.loads(synthetic_train["answer_list"].read_text())
    assert [r["question_id"] for r in results] == [e["question_id"] for e in test]
    assert all(set(r) == {"question_id", "answer"} and r["answer"] in answer_list for r in results)
    log = _log(tmp_path / "out")
    assert [r["global_step"] for r in log[:2]] == [1, 2] and log[2]["split"] == "test"
    assert log[2]["n"] == len(test) == 24  # 3 questions per image of 8 test images

    model = load(tmp_path / "out" / "checkpoint.pth", task="vqa")
    save(model, tmp_path / "vqa.pth")
    main(
        ["eval-vqa", str(tmp_path / "vqa.pth"), "--ann", str(synthetic_train["vqa_test"]),
         "--answer-list", str(synthetic_train["answer_list"]), "--image-root",
         config["vqa_root"], "--k-test", "8", "--out", str(tmp_path / "eval.json")]
    )  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "eval.json").read_text()) == results
    assert summary["n"] == 24 and summary["acc"] == pytest.approx(log[2]["acc"])
