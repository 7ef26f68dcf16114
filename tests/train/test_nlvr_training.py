"""NLVR² fine-tuning through ``build_trainer("nlvr", ...)`` (the code behind ``blip-fast train
nlvr``) on the synthetic NLVR² split: finite losses, an exact resume, dev / test accuracy logged
after training, the official nlvr.yaml keys, and ``blip-fast eval-nlvr``.

How far a short fine-tune from the demo's pre-trained weights gets above chance is measured by
hand, not here: the demo's pre-training alone takes minutes on a CPU."""

import json

import pytest
import torch

from blip_fast.train.config import validate_config
from blip_fast.train.main import build_trainer, evaluate_nlvr

# configs/nlvr.yaml of the official release, unchanged
OFFICIAL_NLVR = {
    "image_root": "/export/share/datasets/vision/NLVR2/",
    "ann_root": "annotation",
    "pretrained": "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
    "model_base_nlvr.pth",
    "vit": "base",
    "batch_size_train": 16,
    "batch_size_test": 64,
    "vit_grad_ckpt": False,
    "vit_ckpt_layer": 0,
    "max_epoch": 15,
    "image_size": 384,
    "weight_decay": 0.05,
    "init_lr": 3e-5,
    "min_lr": 0,
}


@pytest.fixture
def nlvr_config(synthetic_train):
    return {
        "model": "blip_tiny",
        "ann_root": str(synthetic_train["root"]),
        "image_root": str(synthetic_train["image_root"]),
        "batch_size_train": 4,
        "batch_size_test": 8,
        "init_lr": 1e-4,
        "max_epoch": 2,
        "train_augment": False,
    }


def _log(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(out_dir / "log.jsonl")]


def test_official_nlvr_config_passes_and_rejects_other_tasks_keys():
    validate_config("nlvr", OFFICIAL_NLVR)
    with pytest.raises(ValueError, match="unknown key 'queue_size' for nlvr"):
        validate_config("nlvr", {**OFFICIAL_NLVR, "queue_size": 16})


def test_fine_tune_logs_finite_losses_resumes_exactly_and_evaluates(nlvr_config, tmp_path):
    straight = build_trainer("nlvr", nlvr_config, tmp_path / "straight", num_workers=0, max_steps=4)
    straight.train()
    want = _log(tmp_path / "straight")
    assert [r["global_step"] for r in want] == [1, 2, 3, 4]
    assert {"nlvr", "loss", "acc", "lr"} <= want[0].keys() and "itc" not in want[0]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in want)
    assert all(r["loss"] == r["nlvr"] and 0 <= r["acc"] <= 1 for r in want)

    first = build_trainer("nlvr", nlvr_config, tmp_path / "split", num_workers=0, max_steps=2)
    first.train()
    ckpt = tmp_path / "split" / "checkpoint.pth"
    again = build_trainer(
        "nlvr", nlvr_config, tmp_path / "split", num_workers=0, max_steps=4, resume=ckpt
    )
    assert again.global_step == 2
    again.train()
    got = _log(tmp_path / "split")
    assert [r["global_step"] for r in got] == [1, 2, 3, 4]
    for r, w in zip(got, want, strict=True):  # same samples, swaps, dropout: same losses
        assert r["loss"] == pytest.approx(w["loss"], rel=1e-5, abs=1e-6), r["global_step"]

    accuracy = evaluate_nlvr(again, nlvr_config)
    evals = [r for r in _log(tmp_path / "split") if "split" in r]
    assert [(r["split"], r["global_step"]) for r in evals] == [("dev", 4), ("test", 4)]
    assert accuracy == {r["split"]: r["acc"] for r in evals}
    assert [r["n"] for r in evals] == [20, 80]  # 10 entries per image of 2 val / 8 test images


def test_train_and_eval_nlvr_cli(nlvr_config, synthetic_train, tmp_path, capsys):
    """``blip-fast train nlvr --config nlvr.yaml`` reads the official keys (the model and image
    size overridden to fit a test), then ``eval-nlvr`` scores the saved model."""
    from blip_fast import load
    from blip_fast.checkpoint import save
    from blip_fast.cli import main

    config = {**OFFICIAL_NLVR, "image_root": nlvr_config["image_root"]}
    config["ann_root"] = nlvr_config["ann_root"]
    del config["pretrained"]
    (tmp_path / "nlvr.yaml").write_text("".join(f"{k}: {v!r}\n" for k, v in config.items()))
    main(
        ["train", "nlvr", "--config", str(tmp_path / "nlvr.yaml"), "model=blip_tiny",
         "image_size=64", "batch_size_train=4", "--output-dir", str(tmp_path / "out"),
         "--max-steps", "1", "--num-workers", "0"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "trained 1 steps" in printed and "dev accuracy" in printed
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert ckpt["schedule"]["max_epoch"] == 15 and ckpt["schedule"]["kind"] == "cosine"
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0.05
    dev = [r for r in _log(tmp_path / "out") if r.get("split") == "dev"][0]

    model = load(tmp_path / "out" / "checkpoint.pth", task="nlvr")
    save(model, tmp_path / "nlvr.pth")
    ann = str(synthetic_train["nlvr_dev"])
    main(
        [
            "eval-nlvr",
            str(tmp_path / "nlvr.pth"),
            "--ann",
            ann,
            "--image-root",
            config["image_root"],
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == dev["n"] and result["acc"] == pytest.approx(dev["acc"])
