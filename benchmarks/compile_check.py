"""Ahead-of-time compile check of the GPU kernels, on a machine without a GPU.

Triton: the launchers in kernels/ are called on meta tensors inside ``trace_launches`` for every
shape BLIP uses (head_dim 64 / 128, 1-77 queries over 197 / 577 / 8 x 577 keys, ITC at dim 256
with a 57,600-column queue, the LM-head loss over BLIP's 30,524-token vocabulary, each with and
without its optional inputs) in fp32 / fp16 / bf16, so the configurations compiled are the ones
the launchers' own selection code picks for sm_80 and sm_90. Each distinct launch is
specialised as Triton's JIT would specialise it and compiled with ``triton.compile`` for that
target; Triton's ptxas reports its registers and spills.
CUDA C++ (where nvcc and cmake exist): CMakeLists.txt builds csrc/cuda for the same targets with
``ptxas -v``.

A kernel that does not compile, needs more shared memory than its target's per-block limit, or
more registers than a block of its size can have fails the check (exit status 1); spills are
reported. The table of every kernel (config, dtype, arch, shared memory, registers, spills) goes
to <out>/triton.json and <out>/cuda.json, a summary to stdout. Triton's compile cache
(TRITON_CACHE_DIR, default ~/.triton/cache) makes a rerun take seconds.

    python benchmarks/compile_check.py [--jobs N] [--out build/compile-check] [--no-cuda]
"""

import argparse
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # interpreted kernels have nothing to compile
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v's report as it compiles

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.cache import get_cache_manager  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from blip_fast.kernels import (  # noqa: E402
    cross_attention,
    gathered_cross_attention,
    itc,
    lm_head_loss,
)
from blip_fast.kernels._utils import TARGETS, GpuLimits, KernelLaunch, trace_launches  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEADS = 12
HEAD_DIMS = (64, 128)  # BLIP's (ViT-B/L, BERT-base), and the largest the kernels take
QUERY_LENS = range(1, 78)  # one decoding step up to 77 text tokens
KEY_LENS = (197, 577, 8 * 577)  # ViT-B/16 tokens at 224 / 384 px, 8 video frames at 384 px
ITC_BATCH, ITC_DIM, ITC_QUEUE = 256, 256, 57600
# BLIP's vocabulary, and one a multiple of 16 (Triton specialises the row length on it).
LM_VOCABS = (30524, 30528)
REGISTERS_PER_BLOCK = 65536  # sm_80 and sm_90
PTXAS_LOG = "ptxas-v.log"  # kept beside each kernel in Triton's cache, for cached reruns


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def attention_calls(dtype, head_dim, q_len, k_len):
    """Every launcher of kernels/cross_attention.py and gathered_cross_attention.py, with and
    without each optional input (training's dropout included)."""
    q, dout = (
        meta(2, HEADS, q_len, head_dim, dtype=dtype),
        meta(2, HEADS, q_len, head_dim, dtype=dtype),
    )
    k, v = (meta(2, HEADS, k_len, head_dim, dtype=dtype) for _ in range(2))
    scale = head_dim**-0.5
    seed = meta(1, dtype=torch.int64)
    for mask, p in itertools.product((None, meta(2, k_len, dtype=torch.bool)), (0.0, 0.1)):
        out, lse = cross_attention.cross_attention_fwd(q, k, v, mask, scale, p, seed)
        cross_attention.cross_attention_bwd(dout, q, k, v, mask, out, lse, scale, p, seed)
    for mask in (None, meta(2, k_len, dtype=torch.bool)):
        for causal in (False, True):
            out, lse = cross_attention.attention_fwd(q, k, v, mask, scale, causal)
            cross_attention.attention_bwd(dout, q, k, v, mask, out, lse, scale, causal)
    index = meta(2, dtype=torch.int64)
    for p in (0.0, 0.1):
        out, lse = gathered_cross_attention.gathered_cross_attention_fwd(
            q, k, v, index, scale, p, seed
        )
        gathered_cross_attention.gathered_cross_attention_bwd(
            dout, q, k, v, index, out, lse, scale, p, seed
        )


def itc_calls(dtype):
    """kernels/itc.py's launchers with and without ids and teacher (alpha = 0 switches it off)."""
    feats = [meta(ITC_BATCH, ITC_DIM, dtype=dtype) for _ in range(4)]
    queues = [meta(ITC_DIM, ITC_QUEUE, dtype=dtype) for _ in range(2)]
    temp = meta()
    for with_idx, alpha in itertools.product((False, True), (0.0, 0.4)):
        ids = (meta(ITC_BATCH, dtype=torch.int64), meta(ITC_QUEUE, dtype=torch.int64))
        ids = ids if with_idx else (None, None)
        _, stats = itc.itc_fwd(*feats, *queues, temp, alpha, *ids)
        itc.itc_bwd(meta(), *feats, *queues, temp, alpha, *ids, True, stats)


def lm_head_loss_calls(dtype):
    """kernels/lm_head_loss.py's chunk launcher, with and without a gradient."""
    for vocab in LM_VOCABS:
        labels = meta(64, dtype=torch.int64)
        for grad_scale in (None, meta(64)):
            lm_head_loss.lm_head_loss_chunk(meta(64, vocab, dtype=dtype), labels, 0.1, grad_scale)


def traced_launches(limits: GpuLimits, dtypes=DTYPES) -> list[KernelLaunch]:
    with trace_launches(limits) as launches:
        for dtype in dtypes:
            for head_dim, q_len, k_len in itertools.product(HEAD_DIMS, QUERY_LENS, KEY_LENS):
                attention_calls(dtype, head_dim, q_len, k_len)
            itc_calls(dtype)
            lm_head_loss_calls(dtype)
    return launches


class Specialiser:
    """Signature, constexprs, attributes and options of a launch, as Triton's JIT derives them
    at launch time: its own binder and ``_pack_args`` (the same in Triton 3.6 and 3.7), so the
    divisibility and ==1 specialisation of every argument match a real launch."""

    def __init__(self, limits: GpuLimits):
        self.target = GPUTarget("cuda", limits.arch, 32)
        self.backend = make_backend(self.target)
        self.binders = {}

    def __call__(self, launch: KernelLaunch):
        kernel = launch.kernel
        if kernel not in self.binders:
            self.binders[kernel] = create_function_from_signature(
                kernel.signature, kernel.params, self.backend
            )
        bound, spec, options = self.binders[kernel](*launch.args, **launch.config)
        return kernel._pack_args(self.backend, launch.config, bound, spec, options)


def unique_items(limits_list, dtypes=DTYPES, kernel_filter=""):
    """(launch, limits, specialisation) per distinct compile, in a deterministic order."""
    items, seen = [], set()
    for limits in limits_list:
        specialise = Specialiser(limits)
        for launch in traced_launches(limits, dtypes):
            if kernel_filter not in launch.kernel.__name__:
                continue
            options, signature, constexprs, attrs = specialise(launch)
            key = (launch.kernel.__name__, limits.arch, repr(signature), repr(constexprs))
            key += (repr(attrs), options.hash())
            if key not in seen:
                seen.add(key)
                items.append((launch, limits, (options, signature, constexprs, attrs)))
    return items


ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> list[dict]:
    """One dict per entry function of a ``ptxas -v`` report: function, arch, regs, spill
    stores / loads (bytes) and static shared memory (bytes)."""
    rows = []
    for line in log.splitlines():
        if match := ENTRY.search(line):
            rows.append(dict(function=match[1], arch=match[2], regs=0, spill_stores=0))
            rows[-1].update(spill_loads=0, static_smem=0)
        elif rows and (match := SPILLS.search(line)):
            rows[-1].update(spill_stores=int(match[1]), spill_loads=int(match[2]))
        elif rows and (match := USED.search(line)):
            rows[-1].update(regs=int(match[1]), static_smem=int(match[2] or 0))
    return rows


def ptxas_report(compiled, printed: str, arch: int) -> dict:
    """ptxas -v's report of ``compiled``: what Triton printed while compiling it, else the copy
    kept in its cache entry, else a fresh ptxas run on its PTX."""
    cache = get_cache_manager(compiled.hash)
    if "Used " in printed:
        cache.put(printed, PTXAS_LOG, binary=False)
    elif path := cache.get_file(PTXAS_LOG):
        with open(path, encoding="utf-8") as f:
            printed = f.read()
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
            ptx.write(compiled.asm["ptx"])
            ptx.flush()
            gpu = f"--gpu-name={sm_arch_from_capability(arch)}"
            cmd = [triton.knobs.nvidia.ptxas.path, "-v", gpu, ptx.name, "-o", os.devnull]
            printed = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    (report,) = parse_ptxas(printed)
    return report


def config_label(config: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in config.items())


def compile_launch(launch: KernelLaunch, limits: GpuLimits, specialisation=None) -> dict:
    """Compiles one launch for ``limits``' target and returns its table row."""
    options, signature, constexprs, attrs = specialisation or Specialiser(limits)(launch)
    tensor = next(a for a in launch.args if isinstance(a, torch.Tensor))
    row = dict(
        kernel=launch.kernel.__name__,
        config=config_label(launch.config),
        dtype=str(tensor.dtype).removeprefix("torch."),
        arch=f"sm_{limits.arch}",
        smem_limit=limits.max_shared_mem,
    )
    printed, start = io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stdout(printed):
            src = ASTSource(launch.kernel, signature, constexprs, attrs)
            target = GPUTarget("cuda", limits.arch, 32)
            compiled = triton.compile(src, target=target, options=options.__dict__)
        report = ptxas_report(compiled, printed.getvalue(), limits.arch)
    except Exception as e:  # the check reports every failure, then fails
        return dict(row, error=f"{type(e).__name__}: {e}".strip()[-2000:])
    row.update(smem=compiled.metadata.shared, regs=report["regs"])
    row.update(spill_stores=report["spill_stores"], spill_loads=report["spill_loads"])
    row.update(seconds=round(time.perf_counter() - start, 2), error=over_limit(row, options))
    return row


def over_limit(row: dict, options) -> str:
    if row["smem"] > row["smem_limit"]:
        return f"shared memory {row['smem']} B > {row['smem_limit']} B per block"
    threads = options.num_warps * 32
    if row["regs"] * threads > REGISTERS_PER_BLOCK:
        return f"{row['regs']} registers x {threads} threads > {REGISTERS_PER_BLOCK} per block"
    return ""


_ITEMS: list = []  # what forked workers compile, by index


def _compile_item(index: int) -> dict:
    return compile_launch(*_ITEMS[index])


def triton_rows(jobs: int, dtypes, kernel_filter: str) -> list[dict]:
    _ITEMS[:] = unique_items(TARGETS, dtypes, kernel_filter)
    print(f"triton {triton.__version__}: {len(_ITEMS)} distinct kernel launches", flush=True)
    rows = []
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for row in pool.imap(_compile_item, range(len(_ITEMS))):
            rows.append(row)
            if len(rows) % 50 == 0 or len(rows) == len(_ITEMS):
                print(f"  {len(rows)} / {len(_ITEMS)} compiled", flush=True)
    return rows


def cuda_rows(jobs: int, build_dir: str) -> list[dict]:
    """Builds CMakeLists.txt's CUDA compile check afresh and reads its ptxas -v report."""
    configure = subprocess.run(["cmake", "-S", ROOT, "-B", build_dir], capture_output=True)
    if configure.returncode:
        sys.exit(f"cmake configure failed:\n{configure.stdout.decode()}{configure.stderr.decode()}")
    build = subprocess.run(
        ["cmake", "--build", build_dir, "--clean-first", "-j", str(jobs)],
        capture_output=True,
        text=True,
    )
    log = build.stdout + build.stderr
    if build.returncode:
        return [dict(kernel="csrc/cuda", arch="", error=log[-4000:])]
    rows = parse_ptxas(log)
    names = subprocess.run(
        ["c++filt"], input="\n".join(r["function"] for r in rows), capture_output=True, text=True
    ).stdout.splitlines()
    for row, name in zip(rows, names):
        row["kernel"] = name.split("(anonymous namespace)::")[-1].split("(")[0]
        row["error"] = ""
    return rows


def summarise(rows: list[dict]) -> None:
    """Worst case per (kernel, dtype, arch), then every failure in full."""
    groups = {}
    for row in rows:
        if not row.get("error"):
            groups.setdefault((row["kernel"], row.get("dtype", ""), row["arch"]), []).append(row)
    print(f"{'kernel':<40} {'dtype':<9} {'arch':<7} {'cfgs':>4} {'smem max':>9} ", end="")
    print(f"{'limit':>7} {'regs max':>8} {'spills max':>10}")
    for (kernel, dtype, arch), group in sorted(groups.items()):
        smem = max(r.get("smem", r.get("static_smem", 0)) for r in group)
        limit = group[0].get("smem_limit", "")
        regs = max(r["regs"] for r in group)
        spills = max(r["spill_stores"] for r in group)
        print(
            f"{kernel[:40]:<40} {dtype:<9} {arch:<7} {len(group):>4} {smem:>9} {limit:>7} ", end=""
        )
        print(f"{regs:>8} {spills:>10}")
    for row in rows:
        if row.get("error"):
            print(f"FAILED {row['kernel']} {row.get('config', '')} {row.get('dtype', '')} ", end="")
            print(f"{row['arch']}: {row['error']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "compile-check"))
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels")
    parser.add_argument("--kernels", default="", help="only Triton kernels whose name has this")
    parser.add_argument("--dtypes", nargs="+", default=[str(d)[6:] for d in DTYPES])
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    tables = {
        "triton": triton_rows(args.jobs, [getattr(torch, d) for d in args.dtypes], args.kernels)
    }
    if args.no_cuda or not (shutil.which("nvcc") and shutil.which("cmake")):
        print("CUDA C++ kernels not checked (--no-cuda, or no nvcc / cmake on PATH)")
    else:
        tables["cuda"] = cuda_rows(args.jobs, os.path.join(ROOT, "build", "cuda-check"))
    failed = 0
    for name, rows in tables.items():
        with open(os.path.join(args.out, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
        print(f"\n{name}: {len(rows)} kernels (table: {os.path.join(args.out, name)}.json)")
        summarise(rows)
        failed += sum(bool(row["error"]) for row in rows)
    print(f"\n{failed} failed; {time.perf_counter() - start:.0f} s with {args.jobs} jobs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
