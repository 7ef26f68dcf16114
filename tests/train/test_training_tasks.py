"""Every task trains through ``build_trainer`` (the code behind ``blip-fast train``): losses
finite and falling on a repeated batch is not asserted here (see the demo test); what is:
the losses each task must produce, the queue writes, and pre-training over a missing image."""

import json
import shutil

import pytest
import torch

from blip_fast.data.corrupt_report import read_corrupt_report
from blip_fast.train.main import build_trainer


def _log(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(out_dir / "log.jsonl")]


def test_pretrain_lists_and_replaces_a_missing_image(synthetic_train, tmp_path):
    ann = json.loads(open(synthetic_train["pretrain"]).read())
    ann[3]["image"] = "images/train/missing.jpg"
    (tmp_path / "pretrain.json").write_text(json.dumps(ann))
    cfg = {
        "model": "blip_tiny",
        "train_file": str(tmp_path / "pretrain.json"),
        "image_root": str(synthetic_train["image_root"]),
        "batch_size": 6,
        "init_lr": 1e-4,
        "warmup_lr": 1e-6,
        "warmup_steps": 2,
        "max_epoch": 1,
        "queue_size": 12,
    }
    trainer = build_trainer("pretrain", cfg, tmp_path / "out", num_workers=0)
    trainer.train()
    log = _log(tmp_path / "out")
    assert len(log) == len(ann) // 6  # every batch full although one image is missing
    assert {"itc", "itm", "lm", "loss"} <= log[0].keys()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert log[0]["lr"] == 1e-6 and log[-1]["lr"] == 1e-4  # warm-up
    assert [
        r["path"].endswith("missing.jpg")
        for r in read_corrupt_report(tmp_path / "out" / "corrupt_images.tsv")
    ] == [True]
    assert int(trainer.model.queue_ptr) == (len(log) * 6) % 12


def test_caption_fine_tuning_masks_the_prompt(synthetic_train, tmp_path):
    cfg = {
        "model": "blip_tiny",
        "train_file": str(synthetic_train["train"]),
        "image_root": str(synthetic_train["image_root"]),
        "batch_size": 4,
        "init_lr": 1e-4,
        "max_epoch": 1,
    }
    trainer = build_trainer("caption", cfg, tmp_path, num_workers=0, max_steps=2)
    assert trainer.task.prompt_length == 4  # [DEC] a picture of
    trainer.train()
    log = _log(tmp_path)
    assert len(log) == 2 and set(log[0]) >= {"lm", "loss"} and "itc" not in log[0]


def test_train_cli_reads_official_yaml_keys(synthetic_train, tmp_path):
    from blip_fast.cli import main

    root = synthetic_train["root"]
    shutil.copy(synthetic_train["train"], tmp_path / "flickr30k_train.json")
    (tmp_path / "retrieval_flickr.yaml").write_text(
        f"image_root: '{root}'\nann_root: '{tmp_path}'\ndataset: 'flickr'\n"
        "vit: 'base'\nbatch_size_train: 4\ninit_lr: 1e-5\nimage_size: 384\nqueue_size: 57600\n"
        "alpha: 0.4\nk_test: 128\nnegative_all_rank: False\nweight_decay: 0.05\nmin_lr: 0\n"
        "max_epoch: 6\n"
    )
    main(
        [
            "train",
            "retrieval",
            "--config",
            str(tmp_path / "retrieval_flickr.yaml"),
            "model=blip_tiny",
            "image_size=64",
            "queue_size=16",
            "--output-dir",
            str(tmp_path / "out"),
            "--max-steps",
            "1",
            "--num-workers",
            "0",
        ]
    )
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert ckpt["global_step"] == 1 and ckpt["config"]["dataset"] == "flickr"
    assert ckpt["schedule"]["kind"] == "cosine" and ckpt["schedule"]["max_epoch"] == 6
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0.05


def test_pretrain_from_webdataset_shards(synthetic_train, tmp_path):
    from blip_fast.data.shards import ShardDataset, write_shards

    ann = json.loads(open(synthetic_train["pretrain"]).read())
    root = synthetic_train["image_root"]
    samples = [
        (f"{i:06d}", (root / a["image"]).read_bytes(), a["caption"]) for i, a in enumerate(ann)
    ]
    samples[5] = (samples[5][0], b"not a jpeg", samples[5][2])
    paths = write_shards(samples, str(tmp_path / "shard-%05d.tar"), per_shard=10)
    assert len(paths) == 3
    ds = ShardDataset(str(tmp_path / "shard-{00000..00002}.tar"))
    assert len(ds) == len(ann)
    image, caption = ds[7]
    assert caption == ann[7]["caption"] and image.size == (64, 64)
    cfg = {
        "model": "blip_tiny",
        "train_shards": str(tmp_path / "shard-*.tar"),
        "batch_size": 6,
        "init_lr": 1e-4,
        "max_epoch": 1,
        "queue_size": 12,
    }
    build_trainer("pretrain", cfg, tmp_path / "out", num_workers=0).train()
    assert len(_log(tmp_path / "out")) == len(ann) // 6
    assert [r["path"] for r in read_corrupt_report(tmp_path / "out" / "corrupt_images.tsv")] == [
        f"{paths[0]}@{ds.samples[5][1]}"
    ]


def test_pretrain_and_retrieval_steps_run_under_bf16_autocast(synthetic_train, tmp_path):
    """bf16 autocast is the GPU default: features come out of the projections in bf16 while
    the queues stay fp32, and the ITC op needs one dtype (it raised here before). Same batch,
    same weights: the bf16 step's ITC loss is the fp32 one within bf16 rounding."""
    for task, extra in (("pretrain", {}), ("retrieval", {"alpha": 0.4})):
        losses = {}
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            cfg = {
                "model": "blip_tiny",
                "train_file": str(synthetic_train["train"]),
                "image_root": str(synthetic_train["image_root"]),
                "batch_size": 4,
                "init_lr": 1e-4,
                "max_epoch": 1,
                "queue_size": 8,
                **extra,
            }
            trainer = build_trainer(
                task,
                cfg,
                tmp_path / task / precision,
                num_workers=0,
                max_steps=1,
                precision=precision,
            )
            losses[precision] = trainer.train()
            assert trainer.model.image_queue.dtype == torch.float32
        for key in ("itc", "itm"):
            assert torch.isfinite(torch.tensor(losses["bf16"][key])), (task, key)
        assert abs(losses["bf16"]["itc"] - losses["fp32"]["itc"]) < 2e-2 * losses["fp32"]["itc"]


def test_itc_warmup_steps_train_itc_alone_then_everything(synthetic_train, tmp_path):
    """``itc_warmup_steps: 2``: steps 1-2 log ITC only and leave the ITM head and the decoder's
    own weights untouched (no gradient, so AdamW skips them, weight decay included); step 3
    trains all three objectives."""
    cfg = {
        "model": "blip_tiny",
        "train_file": str(synthetic_train["pretrain"]),
        "image_root": str(synthetic_train["image_root"]),
        "batch_size": 4,
        "init_lr": 1e-3,
        "max_epoch": 1,
        "queue_size": 8,
        "itc_warmup_steps": 2,
    }
    trainer = build_trainer("pretrain", cfg, tmp_path, num_workers=0, max_steps=2)
    m = trainer.model
    watched = {
        "itm_head": m.itm_head.weight,
        "decoder self-attention": m.text_decoder.bert.encoder.layer[0].attention.self.query.weight,
        "vision_proj": m.vision_proj.weight,
    }
    before = {k: w.detach().clone() for k, w in watched.items()}
    trainer.train()
    assert torch.equal(watched["itm_head"], before["itm_head"])
    assert torch.equal(watched["decoder self-attention"], before["decoder self-attention"])
    assert not torch.equal(watched["vision_proj"], before["vision_proj"])
    trainer.cfg.max_steps = 3
    trainer.train()
    log = _log(tmp_path)
    assert [sorted(set(r) & {"itc", "itm", "lm"}) for r in log] == [
        ["itc"],
        ["itc"],
        ["itc", "itm", "lm"],
    ]
    assert not torch.equal(watched["itm_head"], before["itm_head"])
    assert not torch.equal(watched["decoder self-attention"], before["decoder self-attention"])
    caption_cfg = {k: v for k, v in cfg.items() if k != "queue_size"}
    with pytest.raises(ValueError, match=r"unknown key 'itc_warmup_steps' for caption \(a key of"):
        build_trainer("caption", caption_cfg, tmp_path / "caption", num_workers=0)


@pytest.mark.parametrize("task", ["retrieval", "caption"])
def test_fine_tuning_lists_a_missing_image_and_trains_on(synthetic_train, tmp_path, task):
    ann = json.loads(open(synthetic_train["train"]).read())
    ann[3] = {**ann[3], "image": "missing.jpg"}
    (tmp_path / "train.json").write_text(json.dumps(ann))
    cfg = {
        "model": "blip_tiny",
        "train_file": str(tmp_path / "train.json"),
        "image_root": str(synthetic_train["image_root"]),
        "batch_size_train": 4,
        "init_lr": 1e-4,
        "max_epoch": 1,
        **({"queue_size": 8} if task == "retrieval" else {}),
    }
    build_trainer(task, cfg, tmp_path / "out", num_workers=0, max_steps=len(ann) // 4).train()
    assert len(_log(tmp_path / "out")) == len(ann) // 4
    report = read_corrupt_report(tmp_path / "out" / "corrupt_images.tsv")
    assert [r["path"] for r in report] == [str(synthetic_train["image_root"] / "missing.jpg")]
