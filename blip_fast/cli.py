"""``blip-fast`` command line: demo, info, convert."""
import argparse
import json
import platform
import sys
import tempfile
import time

import torch


def _demo(args):
    from blip_fast import create_model, tokenizer
    from blip_fast.data import RetrievalEvalDataset, make_synthetic, test_transform
    from blip_fast.eval.retrieval import evaluate

    torch.manual_seed(args.seed)
    root = args.data or tempfile.mkdtemp(prefix="blip_fast_demo_")
    t0 = time.perf_counter()
    paths = make_synthetic(root, n_train_images=args.train_images, n_test_images=args.test_images,
                           image_size=args.image_size, seed=args.seed)
    print(f"synthetic data: {paths['root']} ({time.perf_counter() - t0:.1f} s)")
    model = create_model("retrieval", args.config)
    size = model.cfg.vision.image_size
    dataset = RetrievalEvalDataset(paths["test"], paths["image_root"], test_transform(size))
    print(f"model: {args.config} retrieval, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, random weights; test split: {len(dataset.image)} images, "
          f"{len(dataset.text)} texts, k_test {args.k_test}")
    result = evaluate(model, dataset, tokenizer(), k_test=args.k_test, progress=sys.stderr.isatty())
    _print_result(result)


def _print_result(result):
    print(" ".join(f"{k}={result[k]:.2f}" for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1",
                                                    "img_r5", "img_r10", "r_mean")))
    print("timing: " + ", ".join(f"{k} {v:.2f} s" for k, v in result["timing"].items())
          + f"; {result['pairs_scored']} ITM pairs scored")


def _info(args):
    import blip_fast
    from blip_fast.ops import _backend
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info = {"blip_fast": blip_fast.__version__, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "extension_C": blip_fast.HAS_C,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "backends": {op: {d: [b for b in ("reference", "sdpa", "cpu", "cuda", "triton",
                                              "xformers", "flash_attn")
                                  if _backend.available(op, b, d)] for d in devices}
                         for op in _backend.PREFERENCE},
            "default": {op: {d: _backend.resolve(op, d) for d in devices}
                        for op in _backend.PREFERENCE}}
    print(json.dumps(info, indent=2))


def _convert(args):
    from blip_fast.checkpoint import convert_checkpoint
    convert_checkpoint(args.src, args.dst, args.format)
    print(f"wrote {args.dst} ({args.format})")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="blip-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="synthetic data -> small model -> retrieval eval")
    demo.add_argument("--data", help="folder for the synthetic data (default: a temp dir)")
    demo.add_argument("--config", default="blip_small_demo")
    demo.add_argument("--train-images", type=int, default=200)
    demo.add_argument("--test-images", type=int, default=100)
    demo.add_argument("--image-size", type=int, default=128)
    demo.add_argument("--k-test", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(fn=_demo)
    sub.add_parser("info", help="versions, devices, available backends").set_defaults(fn=_info)
    conv = sub.add_parser("convert", help="official .pth <-> HuggingFace BLIP directory")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--format", choices=("official", "hf"), required=True)
    conv.set_defaults(fn=_convert)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
