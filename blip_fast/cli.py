"""``blip-fast`` command line: demo, info, convert, eval-retrieval, eval-video, eval-caption,
eval-nlvr, eval-vqa, capfilt, train."""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from blip_fast import envs
from blip_fast.cli_types import (
    device,
    non_negative_int,
    positive_float,
    positive_int,
    unit_interval,
)
from blip_fast.demo import print_retrieval_result
from blip_fast.demo import run as run_demo


def _info(args):
    import blip_fast
    from blip_fast.ops import _backend

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info = {
        "blip_fast": blip_fast.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "extension_C": blip_fast.HAS_C,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_bf16": {  # what the C++ attention kernels may run bf16 products on
            "amx": torch.cpu._is_amx_tile_supported(),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
            "BLIP_FAST_CPU_BF16_PRODUCTS": envs.cpu_bf16_products(),
        },
        "backends": {
            op: {
                d: [
                    b
                    for b in (
                        "reference",
                        "sdpa",
                        "onednn",
                        "cpu",
                        "cuda",
                        "triton",
                        "xformers",
                        "flash_attn",
                    )
                    if _backend.available(op, b, d)
                ]
                for d in devices
            }
            for op in _backend.PREFERENCE
        },
        "default": {
            op: {d: _backend.resolve(op, d) for d in devices} for op in _backend.PREFERENCE
        },
    }
    print(json.dumps(info, indent=2))


def _convert(args):
    from blip_fast.checkpoint import convert_checkpoint

    convert_checkpoint(args.src, args.dst, args.format)
    print(f"wrote {args.dst} ({args.format})")


def _load_retrieval(checkpoint, image_size):
    """(model, size): the retrieval model of ``checkpoint`` at ``image_size`` (None: its own;
    another size interpolates the position embeddings)."""
    import dataclasses

    from blip_fast.checkpoint import load

    model = load(checkpoint, task="retrieval")
    size = int(image_size or model.cfg.vision.image_size)
    if size != model.cfg.vision.image_size:  # position embeddings interpolated by load
        cfg = dataclasses.replace(
            model.cfg, vision=dataclasses.replace(model.cfg.vision, image_size=size)
        )
        model = load(checkpoint, task="retrieval", config=cfg)
    return model, size


def _eval_retrieval(args):
    from blip_fast import tokenizer
    from blip_fast.data import RetrievalEvalDataset, test_transform
    from blip_fast.eval.retrieval import evaluate
    from blip_fast.models.configs import load_yaml
    from blip_fast.train.distributed import init_distributed, shutdown

    y = load_yaml(args.config) if args.config else {}
    k_test = args.k_test if args.k_test is not None else _config_int(y, "k_test", 128, args)
    batch_size = args.batch_size or _config_int(y, "batch_size_test", 64, args)
    image_root = args.image_root or y.get("image_root")
    if image_root is None:
        sys.exit("eval-retrieval: no image root (--image-root or image_root in the config)")
    # under torchrun: one process group, one GPU per local rank; a rank that finishes its share
    # of a long re-ranking waits for the others in the final all-reduce (a long timeout)
    info = init_distributed(args.device, timeout_s=24 * 3600)
    device = info.device
    model, size = _load_retrieval(args.checkpoint, args.image_size or y.get("image_size"))
    model = model.to(device).eval()
    dataset = RetrievalEvalDataset(args.ann_file, image_root, test_transform(size))
    if info.is_main:
        ranks = f" x {info.world_size} ranks" if info.world_size > 1 else ""
        print(
            f"eval-retrieval: {len(dataset.image)} images, {len(dataset.text)} texts, k_test "
            f"{k_test}, mode {args.mode}, {args.precision} on {device}{ranks}",
            file=sys.stderr,
        )
    result = evaluate(
        model,
        dataset,
        tokenizer(),
        k_test=k_test,
        batch_size=batch_size,
        device=device,
        progress=info.is_main and sys.stderr.isatty(),
        mode=args.mode,
        precision=args.precision,
        return_scores=args.save_scores,
    )
    result.update(
        k_test=k_test,
        image_size=size,
        batch_size=batch_size,
        checkpoint=str(args.checkpoint),
        ann_file=str(args.ann_file),
    )
    if info.is_main:  # every rank holds the same result
        _write_result(result, args.out, args.save_scores)
    shutdown()


def _eval_video(args):
    from blip_fast import tokenizer
    from blip_fast.data import test_transform
    from blip_fast.data.video import VideoRetrievalDataset
    from blip_fast.eval.video import evaluate
    from blip_fast.models.configs import load_yaml

    y = load_yaml(args.config) if args.config else {}
    k_test = args.k_test if args.k_test is not None else _config_int(y, "k_test", 128, args)
    batch_size = args.batch_size or _config_int(y, "batch_size", 64, args)
    num_frames = args.num_frames or _config_int(y, "num_frm_test", 8, args)
    video_root = args.video_root or y.get("video_root")
    if video_root is None:
        sys.exit("eval-video: no video root (--video-root or video_root in the config)")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, size = _load_retrieval(args.checkpoint, args.image_size or y.get("image_size"))
    model = model.to(dev).eval()
    dataset = VideoRetrievalDataset(args.ann_file, video_root, test_transform(size), num_frames)
    result = evaluate(
        model,
        dataset,
        tokenizer(),
        k_test=k_test,
        batch_size=batch_size,
        device=dev,
        progress=sys.stderr.isatty(),
        mode=args.mode,
        precision=args.precision,
        num_workers=args.num_workers,
    )
    result.update(
        k_test=k_test,
        image_size=size,
        device=str(dev),
        checkpoint=str(args.checkpoint),
        ann_file=str(args.ann_file),
    )
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def _config_int(y: dict, key: str, default: int, args) -> int:
    value = y.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{args.config}: {key}: {value!r}: expected an integer >= 1")
    return value


def _write_result(result, out, save_scores):
    """Print the metrics; write the result JSON to ``out`` (or print it) and, with
    ``save_scores``, both score matrices beside it."""
    if save_scores:
        scores = {k: result.pop(k).cpu() for k in ("scores_i2t", "scores_t2i")}
        path = Path(out).with_suffix(".scores.pt") if out else Path("scores.pt")
        torch.save(scores, path)
        result["scores_file"] = str(path)
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    print_retrieval_result(result)
    if not out:
        print(text)


def _eval_caption(args):
    from blip_fast.eval.caption import evaluate

    summary = evaluate(
        args.model,
        args.ann,
        args.image_root,
        args.out,
        ground_truth=args.gt,
        nocaps=args.nocaps,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        progress=sys.stderr.isatty(),
    )
    print(json.dumps(summary, indent=2))


def _eval_nlvr(args):
    from blip_fast import tokenizer
    from blip_fast.checkpoint import load
    from blip_fast.data import test_transform
    from blip_fast.data.nlvr import NLVRDataset
    from blip_fast.eval.nlvr import evaluate

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load(args.model, task="nlvr").to(dev)
    dataset = NLVRDataset(args.ann, args.image_root, test_transform(model.cfg.vision.image_size))
    result = evaluate(
        model,
        dataset,
        tokenizer(),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=dev,
        progress=sys.stderr.isatty(),
    )
    print(json.dumps({**result, "model": str(args.model), "ann": str(args.ann)}, indent=2))


def _eval_vqa(args):
    from blip_fast.checkpoint import load
    from blip_fast.data import test_transform
    from blip_fast.data.vqa import VQADataset, read_answer_list
    from blip_fast.eval.vqa import evaluate_split

    if args.inference == "rank" and not args.answer_list:
        sys.exit("eval-vqa: rank inference needs --answer-list (answer_list.json)")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load(args.model, task="vqa").to(dev)
    transform = test_transform(model.cfg.vision.image_size)
    dataset = VQADataset(args.ann, args.image_root, transform, "test", args.vg_root)
    summary = evaluate_split(
        model,
        dataset,
        args.out,
        read_answer_list(args.answer_list) if args.inference == "rank" else None,
        args.inference,
        args.k_test,
        args.mode,
        args.batch_size,
        args.num_workers,
        dev,
        progress=sys.stderr.isatty(),
    )
    print(json.dumps({**summary, "model": str(args.model), "ann": str(args.ann)}, indent=2))


def _capfilt(args):
    from blip_fast.train.capfilt import run

    if args.shards and args.image_root:
        sys.exit("capfilt: --image-root is for --ann input; shards hold their images")
    summary = run(args)
    if summary is not None:
        print(json.dumps(summary, indent=2))


def _train(args):
    from blip_fast.train.main import main as train_main

    train_main(args)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="blip-fast", description=__doc__)
    parser.add_argument(
        "--debug", action="store_true", help="full tracebacks (also: BLIP_FAST_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="synthetic data -> small model -> retrieval eval, captions, search"
    )
    demo.add_argument("--data", help="folder for the synthetic data (default: a temp dir)")
    demo.add_argument("--config", default="blip_demo")
    demo.add_argument("--train-images", type=positive_int, default=1000)
    demo.add_argument("--test-images", type=positive_int, default=100)
    demo.add_argument("--image-size", type=positive_int, default=128, help="rendered JPEG size")
    demo.add_argument("--steps", type=positive_int, default=680, help="training steps")
    demo.add_argument(
        "--itc-warmup-steps",
        type=non_negative_int,
        default=600,
        help="first steps that train ITC alone",
    )
    demo.add_argument("--batch-size", type=positive_int, default=32)
    demo.add_argument("--lr", type=positive_float, default=5e-4)
    # 0: batches are read in the main process; on 2 cores a worker process slows the two
    # compute threads more than it saves (560 steps: 120 s vs 129 s)
    demo.add_argument("--workers", type=non_negative_int, default=0, help="data loader processes")
    demo.add_argument("--k-test", type=positive_int, default=16)
    demo.add_argument("--captions", type=non_negative_int, default=3, help="test images to caption")
    demo.add_argument(
        "--search-queries",
        type=non_negative_int,
        default=2,
        help="index the test images and search for the first caption of the first N of them "
        "(0: no search)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="training, retrieval evaluation and search reranking (auto: bf16 on a GPU or a "
        "CPU with AMX / AVX512-BF16, else fp32)",
    )
    demo.add_argument("--save", help="save the trained model here (official .pth layout)")
    demo.add_argument(
        "--mode",
        choices=("fast", "reference"),
        default="fast",
        help="retrieval evaluation: batched (same scores) or the official loop",
    )
    demo.set_defaults(fn=run_demo)
    sub.add_parser("info", help="versions, devices, available backends").set_defaults(fn=_info)
    conv = sub.add_parser("convert", help="official .pth <-> HuggingFace BLIP directory")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--format", choices=("official", "hf"), required=True)
    conv.set_defaults(fn=_convert)
    ev = sub.add_parser(
        "eval-retrieval",
        help="official image-text retrieval evaluation (alone or under torchrun)",
    )
    ev.add_argument(
        "--config",
        help="official YAML (retrieval_flickr.yaml / retrieval_coco.yaml)"
        "; k_test, batch_size_test, image_size, image_root are read from it",
    )
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--image-root", help="overrides the config's image_root")
    ev.add_argument("--ann-file", required=True, help="test JSON [{image, caption: [...]}]")
    ev.add_argument("--k-test", type=positive_int)
    ev.add_argument("--image-size", type=positive_int)
    ev.add_argument("--batch-size", type=positive_int, help="image batch (config: batch_size_test)")
    ev.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32")
    ev.add_argument("--mode", choices=("fast", "reference"), default="fast")
    ev.add_argument("--device", type=device)
    ev.add_argument("--out", help="results JSON (default: printed)")
    ev.add_argument(
        "--save-scores",
        action="store_true",
        help="also save both score matrices (OUT with .scores.pt)",
    )
    ev.set_defaults(fn=_eval_retrieval)
    evv = sub.add_parser(
        "eval-video", help="official zero-shot text-to-video retrieval (MSRVTT test format)"
    )
    evv.add_argument(
        "--config",
        help="official YAML (retrieval_msrvtt.yaml); k_test, batch_size, num_frm_test, "
        "image_size, video_root are read from it",
    )
    evv.add_argument("--checkpoint", required=True, help="image-text retrieval checkpoint")
    evv.add_argument("--video-root", help="folder of <clip_name>.mp4 (overrides the config)")
    evv.add_argument(
        "--ann-file", required=True, help="msrvtt_test.jsonl: {clip_name, caption} per line"
    )
    evv.add_argument("--num-frames", type=positive_int, help="frames per video (config: 8)")
    evv.add_argument("--k-test", type=positive_int)
    evv.add_argument("--image-size", type=positive_int)
    evv.add_argument("--batch-size", type=positive_int, help="videos per ViT batch")
    evv.add_argument("--num-workers", type=non_negative_int, default=0, help="decoding processes")
    evv.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32")
    evv.add_argument("--mode", choices=("fast", "reference"), default="fast")
    evv.add_argument("--device", type=device)
    evv.add_argument("--out", help="results JSON (also printed)")
    evv.set_defaults(fn=_eval_video)
    ec = sub.add_parser(
        "eval-caption",
        help="official caption evaluation: beam search, results JSON, pycocoevalcap metrics",
    )
    ec.add_argument("model", help="caption checkpoint (.pth, .safetensors or HF directory)")
    ec.add_argument(
        "--ann",
        required=True,
        help="split JSON [{image, caption: [...]}] (NoCaps: [{image, img_id}])",
    )
    ec.add_argument("--image-root", required=True)
    ec.add_argument(
        "--gt", help="COCO caption-format ground truth (default: from the --ann captions)"
    )
    ec.add_argument(
        "--nocaps",
        action="store_true",
        help="NoCaps: repetition penalty 1.1, results for the evaluation server, no scoring",
    )
    ec.add_argument("--out", required=True, help="results JSON [{image_id, caption}]")
    ec.add_argument("--batch-size", type=positive_int, default=32)
    ec.add_argument("--num-workers", type=non_negative_int, default=4)
    ec.add_argument("--device", type=device)
    ec.set_defaults(fn=_eval_caption)
    en = sub.add_parser("eval-nlvr", help="NLVR² accuracy of a fine-tuned model on a split")
    en.add_argument("model", help="NLVR² checkpoint (.pth or .safetensors)")
    en.add_argument("--ann", required=True, help="split JSON [{images: [2], sentence, label}]")
    en.add_argument("--image-root", required=True)
    en.add_argument("--batch-size", type=positive_int, default=64)
    en.add_argument("--num-workers", type=non_negative_int, default=0)
    en.add_argument("--device", type=device)
    en.set_defaults(fn=_eval_nlvr)
    eq = sub.add_parser(
        "eval-vqa",
        help="VQA answers of a fine-tuned model (official result file; accuracy where known)",
    )
    eq.add_argument("model", help="VQA checkpoint (.pth, .safetensors or HF directory)")
    eq.add_argument("--ann", required=True, help="test JSON [{question_id, question, image, ...}]")
    eq.add_argument("--answer-list", help="answer_list.json: the candidates of rank inference")
    eq.add_argument("--image-root", required=True, help="root of 'vqa' images (vqa_root)")
    eq.add_argument("--vg-root", help="root of 'vg' images")
    eq.add_argument("--out", required=True, help="results JSON [{question_id, answer}]")
    eq.add_argument("--inference", choices=("rank", "generate"), default="rank")
    eq.add_argument("--k-test", type=positive_int, default=128, help="answers ranked in full")
    eq.add_argument(
        "--mode",
        choices=("fast", "reference"),
        default="fast",
        help="rank: batched candidates (same answers) or the official loop",
    )
    eq.add_argument("--batch-size", type=positive_int, default=32)
    eq.add_argument("--num-workers", type=non_negative_int, default=0)
    eq.add_argument("--device", type=device)
    eq.set_defaults(fn=_eval_vqa)
    cf = sub.add_parser(
        "capfilt",
        help="caption + filter web data (JSON or webdataset shards) "
        "into bootstrapped JSON or shards (alone or under torchrun)",
    )
    cf.add_argument("--captioner", required=True, help="caption checkpoint (decoder)")
    cf.add_argument("--filter", required=True, help="retrieval checkpoint (ITM head)")
    src = cf.add_mutually_exclusive_group(required=True)
    src.add_argument("--ann", nargs="+", help="pre-training JSON(s) -> OUT/bootstrapped.json")
    src.add_argument(
        "--shards",
        nargs="+",
        help="webdataset shards (list, glob or "
        "'web/{00000..00099}.tar') -> OUT/bootstrapped-NNNNNN.tar",
    )
    cf.add_argument("--image-root", help="prefix of relative image paths (with --ann)")
    cf.add_argument("--out", required=True, help="output folder (resumes what is there)")
    cf.add_argument(
        "--threshold", type=unit_interval, default=0.5, help="keep texts with P(match) above"
    )
    cf.add_argument(
        "--per-shard",
        type=positive_int,
        default=1000,
        help="samples per output shard (with --shards)",
    )
    cf.add_argument("--seed", type=int, default=0)
    cf.add_argument("--chunk-size", type=positive_int, default=1024)
    cf.add_argument("--batch-size", type=positive_int, default=64)
    cf.add_argument("--num-workers", type=non_negative_int, default=4)
    cf.add_argument("--device", type=device)
    cf.set_defaults(fn=_capfilt)
    # search over one's own images (blip_fast.search)
    from blip_fast.search import commands as search_commands

    ix = sub.add_parser("index", help="index a folder / JSON list / .tar shards of images")
    ix.add_argument("model", help="retrieval checkpoint (.pth, .safetensors or HF directory)")
    ix.add_argument(
        "src", help="image folder, JSON list of image paths, or .tar shards (captions: --texts)"
    )
    ix.add_argument("out", help="index folder (a rerun continues an interrupted build)")
    ix.add_argument("--add", action="store_true", help="add SRC's new images to index OUT")
    ix.add_argument("--batch-size", type=positive_int, default=32)
    ix.add_argument("--chunk-size", type=positive_int, default=1024, help="images per commit")
    ix.add_argument(
        "--num-workers", type=non_negative_int, default=4, help="image-decoding processes"
    )
    ix.add_argument(
        "--store-tokens",
        choices=("fp16", "int8"),
        help="keep each image's ViT tokens for reranking (fp16: 2 bytes a value; int8 ~1)",
    )
    ix.add_argument(
        "--videos",
        action="store_true",
        help="also index a folder's .mp4/.avi/.mov/.mkv/.webm (8 frames each; needs PyAV)",
    )
    ix.add_argument(
        "--texts",
        action="store_true",
        help="SRC is a JSON list of captions or a text file (one a line): a caption index, "
        "searched with --image",
    )
    ix.add_argument("--device", type=device)
    ix.set_defaults(fn=search_commands.index)
    se = sub.add_parser("search", help="the best images of an index for a text or an image")
    se.add_argument("index", help="index folder (blip-fast index)")
    se.add_argument("query", help="text, or an image file with --image")
    se.add_argument("--image", action="store_true", help="QUERY is an image file")
    se.add_argument("-k", type=positive_int, default=10, help="results")
    se.add_argument("--candidates", type=positive_int, default=128, help="reranked by ITM")
    se.add_argument("--no-rerank", action="store_true", help="ITC similarity only")
    se.add_argument(
        "--approximate",
        action="store_true",
        help="ITC candidates from a faiss index (pip install 'blip-fast[ann]'), not exact",
    )
    se.add_argument("--model", help="checkpoint (default: the one that built the index)")
    se.add_argument("--device", type=device)
    se.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="ITM reranking (bf16: a GPU or a CPU with AMX / AVX512-BF16; candidates stay fp32)",
    )
    se.add_argument("--json", action="store_true", help="results as JSON")
    se.add_argument("--html", metavar="OUT", help="also write the results as a contact sheet")
    se.set_defaults(fn=search_commands.search)
    sv = sub.add_parser("serve", help="a search page and JSON API over an index (extra: serve)")
    sv.add_argument("index", help="index folder (blip-fast index)")
    sv.add_argument("--model", help="checkpoint (default: the one that built the index)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=positive_int, default=8000)
    sv.add_argument("--candidates", type=positive_int, default=128, help="reranked by ITM")
    sv.add_argument("--no-rerank", action="store_true", help="ITC similarity only")
    sv.add_argument("--device", type=device)
    sv.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="as search's")
    sv.set_defaults(fn=search_commands.serve)
    tr = sub.add_parser(
        "train",
        help="pre-training / retrieval / caption / NLVR² / VQA fine-tuning (alone or under "
        "torchrun)",
    )
    tr.add_argument("task", choices=("pretrain", "retrieval", "caption", "nlvr", "vqa"))
    tr.add_argument("--config", help="official YAML (pretrain.yaml, retrieval_coco.yaml, ...)")
    tr.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override config keys (values parsed as YAML)",
    )
    tr.add_argument("--output-dir", help="checkpoint.pth and log.jsonl (config: output_dir)")
    tr.add_argument(
        "--resume",
        help="checkpoint to continue from exactly; 'auto': the "
        "output dir's checkpoint.pth if there is one",
    )
    tr.add_argument("--compile", action="store_true", help="torch.compile the training step")
    tr.add_argument("--device", type=device, help="cuda | cpu (default: cuda when available)")
    tr.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        help="autocast dtype (default: bf16 on GPU, fp32 on CPU)",
    )
    tr.add_argument("--backend", help="op backend for every op (default: best available)")
    tr.add_argument(
        "--save-every", type=non_negative_int, default=1000, help="steps between checkpoints"
    )
    tr.add_argument(
        "--max-steps", type=non_negative_int, default=0, help="stop after N steps (0: all)"
    )
    tr.add_argument("--num-workers", type=non_negative_int, default=4)
    tr.add_argument("--seed", type=int, default=42)
    tr.add_argument("--tensorboard", action="store_true")
    tr.set_defaults(fn=_train)
    # `train` takes key=value overrides anywhere among its options (argparse alone would only
    # take them right after the task)
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        args.overrides += [r for r in rest if "=" in r and not r.startswith("-")]
        rest = [r for r in rest if r not in args.overrides]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.debug or envs.debug():
        return args.fn(args)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        sys.exit(130)  # what was interrupted has said so (training: where to resume from)
    except Exception as err:  # one line naming the culprit; --debug shows the traceback
        message = str(err).strip().splitlines()
        sys.exit(f"blip-fast {args.command}: {type(err).__name__}: {' '.join(message)}")


if __name__ == "__main__":
    main()
