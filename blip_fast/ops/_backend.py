"""Backend selection for every op: explicit argument > ``BLIP_FAST_BACKEND`` > best available.

An explicitly requested backend that cannot run raises; an automatic choice (env var or
default) that cannot run falls back down the op's preference list with one log line.
"""

import functools
import importlib.util
import logging

import torch

from blip_fast import envs

log = logging.getLogger("blip_fast")

# Fastest first, per device type. "reference" is last everywhere and always available.
PREFERENCE = {
    # C++ (the cross-attention kernel with its causal flag) on CPU, fwd / fwd+bwd:
    # 2-core AMD EPYC: 4.9 / 17 ms vs sdpa 15 / 43 at 128x12x35x35 (reranker text), 16 / 68 vs
    # 39 / 133 at 32x12x197x197 (ViT-B/224). 2-core Intel Xeon (results/attention-cpu.json):
    # 5.4 / 21.0 vs sdpa 5.8 / eager 17.5 at 35 tokens (it loses fwd+bwd there), 19.4 / 72.0 vs
    # sdpa 23.7 / 75.4 at 197.
    "attention": {"cuda": ("triton", "sdpa", "reference"), "cpu": ("cpu", "sdpa", "reference")},
    # C++ beats sdpa on CPU at 64x12x35x577 fp32, fwd / fwd+bwd: 26.8 / 158 ms vs 51.8 / 213
    # (2-core AMD EPYC), 30.2 / 145 vs 33.9 / 170 (2-core Intel Xeon,
    # benchmarks/results/cross_attention-cpu.json).
    "cross_attention": {
        "cuda": ("triton", "sdpa", "reference"),
        "cpu": ("cpu", "sdpa", "reference"),
    },
    # ITM reranking over cached image K / V; the reference copies K / V per pair.
    # C++ beats it on CPU at 64 pairs x 12 heads x 35 queries over 577 tokens, fp32: 24.2 vs
    # 208 ms (copy + sdpa 137; 2-core AMD EPYC), 24.7 vs 152 (copy + sdpa 107; 2-core Intel
    # Xeon, benchmarks/results/gathered_cross_attention-cpu.json).
    "gathered_cross_attention": {
        "cuda": ("triton", "cuda", "reference"),
        "cpu": ("cpu", "reference"),
    },
    "itc": {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")},
    # LM head + cross-entropy, chunked (no C++ CUDA kernel: Triton covers CUDA). C++ beats the
    # reference on CPU: fwd + bwd 0.66 vs 1.25 s median, peak +325 vs +818 MiB at 64 x 35
    # tokens, H 768, V 30524, fp32 (benchmarks/results/lm_head_loss-cpu.json, 2-core Xeon).
    "lm_head_loss": {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")},
    # Inference GEMMs (ops/linear.py): oneDNN's AVX-512 fp32 GEMM was 2.1-2.4x MKL's (AVX2 on
    # AMD EPYC, 1 thread) at the ITM reranker's shapes; on Intel, where MKL runs AVX-512 too,
    # 1.0-1.1x (2 threads, benchmarks/results/linear-cpu.json).
    # CUDA keeps cuBLAS (reference).
    "linear": {"cpu": ("onednn", "reference")},
}


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@functools.cache
def _triton_ok() -> bool:
    return _has_module("triton") and torch.cuda.is_available()


def _ext_has(op_name: str, device_type: str) -> bool:
    """True when the compiled extension registered a kernel for ``blip_fast::op_name`` on the
    device's dispatch key (torchao's capability probe)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(
            f"blip_fast::{op_name}", device_type.upper()
        )
    except RuntimeError:
        return False


# backend -> {op: name of the blip_fast:: op that runs it}; filled by each ops/<op>.py.
KERNEL_OPS: dict[str, dict[str, str]] = {}


def available(op: str, backend: str, device_type: str) -> bool:
    """Whether ``backend`` can run ``op`` on tensors of ``device_type``."""
    if backend == "reference":
        return True
    if backend == "sdpa":
        return op in ("attention", "cross_attention")
    if backend == "onednn":
        return op == "linear" and device_type == "cpu" and torch.backends.mkldnn.is_available()
    if backend == "triton":
        return device_type == "cuda" and _triton_ok() and op in KERNEL_OPS.get("triton", {})
    if backend in ("cpu", "cuda"):
        name = KERNEL_OPS.get(backend, {}).get(op)
        return backend == device_type and name is not None and _ext_has(name, device_type)
    if backend in ("xformers", "flash_attn"):
        return device_type == "cuda" and op in KERNEL_OPS.get(backend, {}) and _has_module(backend)
    return False


def _auto(op: str, device_type: str, wanted: str | None) -> str:
    prefs = PREFERENCE[op].get(device_type, ("reference",))
    if wanted is not None:
        if available(op, wanted, device_type):
            return wanted
        log.warning(
            "blip_fast: BLIP_FAST_BACKEND=%s cannot run %s on %s; using the best available",
            wanted,
            op,
            device_type,
        )
    return next(b for b in prefs if available(op, b, device_type))


@torch.compiler.assume_constant_result  # torch.compile(fullgraph=True) sees one op, no branch
def resolve(op: str, device, requested: str | None = None) -> str:
    """Backend name for ``op`` on ``device`` (a torch.device, or 'cpu' / 'cuda')."""
    return _resolve(op, torch.device(device).type, requested, envs.backend())


@functools.cache
def _resolve(op: str, device_type: str, requested: str | None, env: str | None) -> str:
    if op not in PREFERENCE:
        raise KeyError(f"unknown op {op!r}; known: {sorted(PREFERENCE)}")
    if requested is not None:
        if not available(op, requested, device_type):
            raise RuntimeError(
                f"backend {requested!r} cannot run op {op!r} on {device_type} "
                f"(see `blip-fast info` for what is available)"
            )
        return requested
    return _auto(op, device_type, env)
