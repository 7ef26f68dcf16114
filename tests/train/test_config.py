"""The training config schema: official files pass unchanged, every bad key names itself."""

import subprocess
import sys

import pytest

from blip_fast.train.config import ConfigError, validate_config

# The official BLIP configs' keys and values (configs/*.yaml of the release).
OFFICIAL = {
    "pretrain": {
        "train_file": ["/data/coco.json", "/data/vg.json"], "laion_path": "",
        "vit": "base", "vit_grad_ckpt": False, "vit_ckpt_layer": 0, "image_size": 224,
        "batch_size": 75, "queue_size": 57600, "alpha": 0.4, "weight_decay": 0.05,
        "init_lr": 3e-4, "min_lr": 1e-6, "warmup_lr": 1e-6, "lr_decay_rate": 0.9,
        "max_epoch": 20, "warmup_steps": 3000,
    },
    "retrieval": {
        "image_root": "/data/flickr30k/", "ann_root": "annotation", "dataset": "flickr",
        "pretrained": "model_base_retrieval_flickr.pth", "vit": "base",
        "batch_size_train": 32, "batch_size_test": 64, "vit_grad_ckpt": True,
        "vit_ckpt_layer": 4, "init_lr": 1e-5, "image_size": 384, "queue_size": 57600,
        "alpha": 0.4, "k_test": 128, "negative_all_rank": False, "weight_decay": 0.05,
        "min_lr": 0, "max_epoch": 6,
    },
    "caption": {
        "image_root": "/data/coco/", "ann_root": "annotation", "coco_gt_root": "annotation/gt",
        "pretrained": "model_base_capfilt_large.pth", "vit": "base", "vit_grad_ckpt": False,
        "vit_ckpt_layer": 0, "batch_size": 32, "init_lr": 1e-5, "image_size": 384,
        "max_length": 20, "min_length": 5, "num_beams": 3, "prompt": "a picture of ",
        "weight_decay": 0.05, "min_lr": 0, "max_epoch": 5,
    },
}  # fmt: skip


@pytest.mark.parametrize("task", sorted(OFFICIAL))
def test_official_configs_pass(task):
    validate_config(task, OFFICIAL[task])


@pytest.mark.parametrize(
    "task,key,value,message",
    [
        ("retrieval", "batch_size_trian", 8,
         r"retrieval_flickr.yaml: unknown key 'batch_size_trian' for retrieval; "
         r"did you mean 'batch_size_train'\?"),
        ("pretrain", "k_test", 128,
         r"unknown key 'k_test' for pretrain \(a key of \['retrieval', 'vqa'\] configs\)"),
        ("retrieval", "batch_size_train", "eight",
         r"retrieval_flickr.yaml: batch_size_train: 'eight': expected an integer, got str"),
        ("retrieval", "batch_size_train", 0, r"batch_size_train: 0: must be >= 1"),
        ("retrieval", "init_lr", 0.0, r"init_lr: 0.0: must be in \(0.0, inf\]"),
        ("retrieval", "alpha", 1.5, r"alpha: 1.5: must be in \[0.0, 1.0\]"),
        ("retrieval", "vit_grad_ckpt", "yes", r"vit_grad_ckpt: 'yes': expected true or false"),
        ("retrieval", "k_test", -1, r"k_test: -1: must be >= 1"),
        ("retrieval", "vit", "huge", r"vit: 'huge': expected one of \['base', 'large'\]"),
        ("retrieval", "model", "blip_tinny", r"model: 'blip_tinny': unknown preset; known: "),
        ("pretrain", "train_file", [], r"train_file: \[\]: expected a path or a non-empty list"),
        ("pretrain", "min_lr", float("nan"), r"min_lr: nan: must be finite"),
    ],
)  # fmt: skip
def test_bad_key_is_named_with_value_and_origin(task, key, value, message):
    cfg = {**OFFICIAL[task], key: value}
    origins = dict.fromkeys(cfg, "retrieval_flickr.yaml")
    with pytest.raises(ConfigError, match=message):
        validate_config(task, cfg, origins)


def test_cli_names_the_override_and_builds_nothing(tmp_path):
    cfg = tmp_path / "retrieval_flickr.yaml"
    cfg.write_text("image_root: /nowhere\nann_root: /nowhere\ndataset: flickr\n")
    r = subprocess.run(
        [sys.executable, "-m", "blip_fast.cli", "train", "retrieval", "--config", str(cfg),
         "batch_size_trian=8", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode != 0
    assert "override batch_size_trian=8: unknown key 'batch_size_trian'" in r.stderr
    assert "did you mean 'batch_size_train'?" in r.stderr
    assert not (tmp_path / "out").exists()
