"""``blip-fast train pretrain|retrieval|caption|nlvr|vqa --config CFG.yaml [key=value ...]``.

Reads the official YAML configs unchanged (pretrain.yaml, retrieval_flickr.yaml,
retrieval_coco.yaml, caption_coco.yaml, nlvr.yaml, vqa.yaml); ``key=value`` arguments override their
keys (values parsed as YAML). Keys beyond the official ones: ``model`` (a preset such as
blip_small_demo instead of ``vit`` / ``image_size``), ``train_file`` (annotation JSON(s) instead of
``ann_root`` + ``dataset``), ``image_root`` for pre-training JSONs with relative paths and
``train_shards`` (webdataset tar shards: a list, glob or ``{000..099}`` range) for pre-training,
``min_scale`` (random-resized-crop scale floor), ``train_augment: false`` (no augmentation),
``itc_warmup_steps`` (pre-training / retrieval: the first N steps train ITC alone, for models
trained from scratch whose ITM hard negatives and captions mean nothing before ITC aligns) and
``image_token_drop`` (pre-training: the fraction of patch tokens the online ViT drops, FLIP-
style; 0, the default, is the official objective; see ``ContrastiveTask``).
NLVR² fine-tuning ends with the dev and test accuracy (``ann_root``'s official files), logged.
VQA fine-tuning ends with the official test loop: answers to ``ann_root``'s vqa_test.json in
``output_dir/result/vqa_result.json`` (and their accuracy, logged, where the test file holds the
annotators' answers); ``image_root`` may stand for both ``vqa_root`` and ``vg_root``.
Run alone, or under torchrun for several processes / nodes.
"""

import dataclasses
import os
from pathlib import Path

import torch

from blip_fast.data import PretrainDataset, RetrievalTrainDataset, test_transform, train_transform
from blip_fast.data.nlvr import NLVRDataset
from blip_fast.data.shards import ShardDataset
from blip_fast.data.vqa import VQADataset, read_answer_list
from blip_fast.models.blip_base import backend_map
from blip_fast.models.configs import BlipConfig, load_yaml, parse_yaml_value
from blip_fast.models.med import BertSelfAttention
from blip_fast.train.config import validate_config
from blip_fast.train.data import Collate, NLVRCollate, SeededSamples, TrainSampler, VQACollate
from blip_fast.train.distributed import init_distributed, shutdown
from blip_fast.train.heap import keep_freed_memory
from blip_fast.train.loop import LoopConfig, Trainer
from blip_fast.train.optim import LRSchedule, build_optimizer
from blip_fast.train.task import CaptionTask, ContrastiveTask, NLVRTask, VQATask

TASKS = ("pretrain", "retrieval", "caption", "nlvr", "vqa")
# Official annotation file names under ``ann_root`` (BLIP data/*_dataset.py)
TRAIN_FILES = {
    ("retrieval", "flickr"): "flickr30k_train.json",
    ("retrieval", "coco"): "coco_karpathy_train.json",
    ("caption", "coco"): "coco_karpathy_train.json",
}
NLVR_FILES = {"train": "nlvr_train.json", "dev": "nlvr_dev.json", "test": "nlvr_test.json"}
VQA_FILES = {"test": "vqa_test.json", "answer_list": "answer_list.json"}


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"override {pair!r}: expected key=value")
        out[key] = parse_yaml_value(value)
    return out


def model_config(y: dict) -> BlipConfig:
    if "model" not in y:
        return BlipConfig.from_official(y)
    cfg = BlipConfig.preset(y["model"])
    vision = dataclasses.replace(
        cfg.vision,
        grad_checkpointing=bool(y.get("vit_grad_ckpt", False)),
        ckpt_layer=int(y.get("vit_ckpt_layer", 0)),
        image_size=int(y.get("image_size", cfg.vision.image_size)),
    )
    keys = ("queue_size", "alpha", "negative_all_rank", "momentum", "prompt", "label_smoothing")
    return dataclasses.replace(cfg, vision=vision, **{k: y[k] for k in keys if k in y})


def train_files(task: str, y: dict) -> list[str]:
    files = y.get("train_file")
    if files is None and task == "vqa":  # official: train_files names JSONs of ann_root
        if "ann_root" not in y or "train_files" not in y:
            raise KeyError("vqa config: give 'train_file' or 'ann_root' + 'train_files'")
        names = y["train_files"]
        names = [names] if isinstance(names, str) else names
        return [os.path.join(y["ann_root"], f"{name}.json") for name in names]
    if files is None:
        if "ann_root" not in y:
            raise KeyError(f"{task} config: give 'train_file' or 'ann_root' (+ 'dataset')")
        if task == "nlvr":
            name = NLVR_FILES["train"]
        else:
            key = (task, y.get("dataset", "coco"))
            if key not in TRAIN_FILES:
                raise KeyError(f"{task} config: unknown dataset {key[1]!r}; give 'train_file'")
            name = TRAIN_FILES[key]
        files = os.path.join(y["ann_root"], name)
    return [files] if isinstance(files, str) else list(files)


def build_dataset(task: str, y: dict, image_size: int):
    # official: RandomResizedCrop scale (0.2, 1) in pre-training, (0.5, 1) in fine-tuning;
    # `train_augment: false` trains on the test transform (data whose captions name positions)
    min_scale = float(y.get("min_scale", 0.2 if task == "pretrain" else 0.5))
    transform = (
        train_transform(image_size, min_scale)
        if y.get("train_augment", True)
        else test_transform(image_size)
    )
    # in every task a missing or undecodable image is listed in corrupt_images.tsv and the next
    # sample takes its place (SeededSamples)
    if task == "pretrain" and "train_shards" in y:
        return ShardDataset(y["train_shards"], transform, skip_corrupt=True)
    if task == "pretrain":
        return PretrainDataset(
            train_files(task, y), y.get("image_root"), transform, skip_corrupt=True
        )
    if task == "vqa":
        vqa_root, vg_root = vqa_roots(y)
        return VQADataset(train_files(task, y), vqa_root, transform, "train", vg_root)
    if "image_root" not in y:
        raise KeyError(f"{task} config: 'image_root' is missing")
    if task == "nlvr":
        datasets = [
            NLVRDataset(f, y["image_root"], transform, train=True) for f in train_files(task, y)
        ]
        return datasets[0] if len(datasets) == 1 else torch.utils.data.ConcatDataset(datasets)
    return RetrievalTrainDataset(
        train_files(task, y), y["image_root"], transform, skip_corrupt=True
    )


def vqa_roots(y: dict) -> tuple[str, str | None]:
    """(vqa_root, vg_root) of a VQA config; ``image_root`` stands for either one not given."""
    vqa_root = y.get("vqa_root", y.get("image_root"))
    if vqa_root is None:
        raise KeyError("vqa config: 'vqa_root' (or 'image_root') is missing")
    return vqa_root, y.get("vg_root", y.get("image_root"))


def build_model(task: str, cfg: BlipConfig, y: dict, backend):
    from blip_fast import create_model, load

    if not y.get("pretrained"):
        return create_model(task, cfg, backend=backend)
    if task != "vqa":
        return load(y["pretrained"], task=task, config=cfg, backend=backend)
    # official VQA fine-tuning starts from a pre-trained checkpoint, whose ITC / ITM heads,
    # momentum encoders and queues the VQA model has no place for (ignored, logged); every key
    # of the VQA model must be in it
    model = load(y["pretrained"], task=task, config=cfg, backend=backend, strict=False)
    if model.load_report.missing:
        raise KeyError(
            f"{y['pretrained']}: {len(model.load_report.missing)} keys of the VQA model "
            f"missing, e.g. {model.load_report.missing[:3]}: give a pre-trained or VQA checkpoint"
        )
    return model


@dataclasses.dataclass(frozen=True)
class StepLevers:
    """The training step's speed levers that keep its math (docs/architecture.md, "Training
    step"); each can be switched off to measure its share, and ``official()`` switches off every
    one: the step as the official code computes it. Host synchronisation has no switch: no step
    ever waits for the device."""

    share_image_kv: bool = True  # image cross-attention K / V once per step (ContrastiveTask)
    itm_enc_only: bool = True  # ITM's last text layer for the [ENC] token alone (ContrastiveTask)
    fused_lm_head_loss: bool = True  # LM head + cross-entropy chunked (ops.lm_head_loss)
    foreach_momentum: bool = True  # momentum update in multi-tensor calls
    pad_to_longest: bool = True  # text trimmed to the batch's longest caption (Collate)
    # attention dropout inside the fused kernels (BertSelfAttention.fused_dropout): the ITM / LM
    # rows keep reading the shared image K / V, the text encoder's self-attention stays fused
    fused_attention_dropout: bool = True
    # CPU: glibc keeps the blocks a step frees for the next step (train.heap); process-wide
    keep_freed_memory: bool = True

    @classmethod
    def official(cls) -> "StepLevers":
        return cls(**{f.name: False for f in dataclasses.fields(cls)})


def _with_levers(backend, levers: StepLevers):
    """``backend`` (None, a name or an op -> backend dict) with the LM head loss on its
    reference kernel when that lever is off."""
    if levers.fused_lm_head_loss:
        return backend
    return {**backend_map(backend), "lm_head_loss": "reference"}


def build_trainer(
    task: str,
    y: dict,
    out_dir,
    *,
    device=None,
    compile=False,
    precision=None,
    save_every=0,
    num_workers=2,
    seed=0,
    max_steps=0,
    backend=None,
    tensorboard=False,
    resume=None,
    origins: dict[str, str] | None = None,
    levers: StepLevers = StepLevers(),
) -> Trainer:
    """Everything ``blip-fast train`` runs, from a config dict ``y`` (official keys), checked
    first by ``validate_config`` (``origins``: where each key was set, for its messages)."""

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    validate_config(task, y, origins)
    itc_warmup = int(y.get("itc_warmup_steps", 0))
    dist_info = init_distributed(device)
    if levers.keep_freed_memory and dist_info.device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(seed + dist_info.rank)  # official: seed + rank
    cfg = model_config(y)
    model = build_model(task, cfg, y, _with_levers(backend, levers)).to(dist_info.device)
    if task in ("pretrain", "retrieval"):
        model.copy_params()  # momentum copies start as the online weights (official)
        model.foreach_momentum = levers.foreach_momentum
    for module in model.modules():
        if isinstance(module, BertSelfAttention):
            module.fused_dropout = levers.fused_attention_dropout
    batch_size = int(y.get("batch_size_train", y.get("batch_size", 32)))
    dataset = build_dataset(task, y, cfg.vision.image_size)
    sampler = TrainSampler(len(dataset), batch_size, dist_info.rank, dist_info.world_size, seed)
    report = Path(out_dir) / "corrupt_images.tsv"
    loader = torch.utils.data.DataLoader(
        SeededSamples(dataset, seed, report),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=dist_info.device.type == "cuda",
        collate_fn=_collate(task, cfg, levers),
        generator=torch.Generator(),
    )  # leaves the global RNG (dropout) untouched
    max_epoch = int(y.get("max_epoch", 1))
    init_lr = float(y.get("init_lr", 1e-5))
    if task == "pretrain":
        schedule = LRSchedule(
            "step",
            init_lr,
            float(y.get("min_lr", 0.0)),
            max_epoch,
            float(y.get("warmup_lr", init_lr)),
            int(y.get("warmup_steps", 0)),
            float(y.get("lr_decay_rate", 1.0)),
        )
        step_module = ContrastiveTask(
            model,
            lm=True,
            image_token_drop=float(y.get("image_token_drop", 0.0)),
            share_image_kv=levers.share_image_kv,
            itm_enc_only=levers.itm_enc_only,
        )
    else:
        schedule = LRSchedule("cosine", init_lr, float(y.get("min_lr", 0.0)), max_epoch)
        if task == "caption":
            step_module = CaptionTask(model)
        elif task == "nlvr":
            step_module = NLVRTask(model)
        elif task == "vqa":
            step_module = VQATask(model)
        else:
            step_module = ContrastiveTask(
                model,
                negative_all_rank=cfg.negative_all_rank,
                share_image_kv=levers.share_image_kv,
                itm_enc_only=levers.itm_enc_only,
            )
    optimizer = build_optimizer(model, init_lr, float(y.get("weight_decay", 0.05)))
    precision = precision or ("bf16" if dist_info.device.type == "cuda" else "fp32")
    loop_cfg = LoopConfig(
        max_epoch=max_epoch,
        alpha=cfg.alpha,
        precision=precision,
        compile=compile,
        save_every=save_every,
        seed=seed,
        max_steps=max_steps,
        tensorboard=tensorboard,
        itc_warmup_steps=itc_warmup,
    )
    trainer = Trainer(
        step_module,
        loader,
        sampler,
        optimizer,
        schedule,
        loop_cfg,
        dist_info,
        out_dir,
        run_config={"task": task, **y},
    )
    if resume:
        trainer.resume(resume)
    return trainer


def _collate(task: str, cfg: BlipConfig, levers: StepLevers):
    from blip_fast import tokenizer

    if task == "nlvr":
        return NLVRCollate(tokenizer())
    if task == "vqa":
        return VQACollate(tokenizer())
    return Collate(
        tokenizer(), task, cfg.prompt if task == "caption" else "", levers.pad_to_longest
    )


def evaluate_nlvr(trainer: Trainer, y: dict, num_workers: int = 0) -> dict[str, float]:
    """Accuracy (%) of the NLVR² model being trained on the dev and test files of ``ann_root``
    (official ``nlvr_dev.json`` / ``nlvr_test.json``), each logged; {} when the config gives
    no ``ann_root`` (a ``train_file`` alone names no evaluation split)."""
    from blip_fast import tokenizer
    from blip_fast.eval.nlvr import evaluate

    if "ann_root" not in y:
        return {}
    transform = test_transform(trainer.model.cfg.vision.image_size)
    accuracy = {}
    for split in ("dev", "test"):
        dataset = NLVRDataset(Path(y["ann_root"]) / NLVR_FILES[split], y["image_root"], transform)
        result = evaluate(
            trainer.model,
            dataset,
            tokenizer(),
            batch_size=int(y.get("batch_size_test", 64)),
            num_workers=num_workers,
            device=trainer.dist.device,
        )
        trainer.log_evaluation(split, result)
        accuracy[split] = result["acc"]
    return accuracy


def evaluate_vqa(trainer: Trainer, y: dict, num_workers: int = 0) -> dict:
    """The official test loop on the VQA model being trained: ``ann_root``'s vqa_test.json
    answered by ``inference`` (rank over answer_list.json, k_test, or generate) into
    ``output_dir/result/vqa_result.json``; ``blip_fast.eval.vqa.evaluate_split``'s summary,
    logged. {} when the config gives no ``ann_root``."""
    from blip_fast.eval.vqa import evaluate_split

    if "ann_root" not in y:
        return {}
    ann_root = Path(y["ann_root"])
    vqa_root, vg_root = vqa_roots(y)
    transform = test_transform(trainer.model.cfg.vision.image_size)
    dataset = VQADataset(ann_root / VQA_FILES["test"], vqa_root, transform, "test", vg_root)
    inference = y.get("inference", "rank")
    summary = evaluate_split(
        trainer.model,
        dataset,
        trainer.out_dir / "result" / "vqa_result.json",
        read_answer_list(ann_root / VQA_FILES["answer_list"]) if inference == "rank" else None,
        inference,
        int(y.get("k_test", 128)),
        batch_size=int(y.get("batch_size_test", 32)),
        num_workers=num_workers,
        device=trainer.dist.device,
    )
    trainer.log_evaluation("test", summary)
    return summary


def main(args):
    """Entry of ``blip-fast train`` (``args`` from the CLI parser in ``blip_fast.cli``)."""
    y = load_yaml(args.config) if args.config else {}
    origins = dict.fromkeys(y, str(args.config))
    origins.update({pair.partition("=")[0]: f"override {pair}" for pair in args.overrides})
    y.update(parse_overrides(args.overrides))
    out_dir = Path(args.output_dir or y.get("output_dir", f"output/{args.task}"))
    resume = args.resume
    if resume == "auto":
        resume = out_dir / "checkpoint.pth" if (out_dir / "checkpoint.pth").exists() else None
    trainer = build_trainer(
        args.task,
        y,
        out_dir,
        device=args.device,
        compile=args.compile,
        precision=args.precision,
        save_every=args.save_every,
        num_workers=args.num_workers,
        seed=args.seed,
        max_steps=args.max_steps,
        backend=args.backend,
        tensorboard=args.tensorboard,
        resume=resume,
        origins=origins,
    )
    stats = trainer.train()
    if trainer.dist.is_main:
        print(
            f"trained {trainer.global_step} steps; last: "
            + ", ".join(f"{k} {v:.4f}" for k, v in stats.items())
        )
        if args.task == "nlvr":
            accuracy = evaluate_nlvr(trainer, y, args.num_workers)
            print(
                ", ".join(f"{split} accuracy {acc:.2f}%" for split, acc in accuracy.items())
                or "no ann_root in the config: dev and test were not evaluated"
            )
        if args.task == "vqa":
            summary = evaluate_vqa(trainer, y, args.num_workers)
            print(
                (f"test answers: {summary['result_file']}" if summary else "")
                + (f", accuracy {summary['acc']:.2f}%" if "acc" in summary else "")
                or "no ann_root in the config: the test split was not answered"
            )
    trainer.close()
    shutdown()
