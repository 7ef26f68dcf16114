"""What the Triton launchers share: the GPU limits a launch configuration depends on, and one
launch path that the ahead-of-time compile check (benchmarks/compile_check.py) can trace.

Each launcher picks block sizes, num_warps and num_stages with a pure function of (shapes,
dtype, GpuLimits). On a GPU the limits are the device's; on CPU tensors (Triton's interpreter)
they are SM80's, so interpreter tests run what an A100 would; on meta tensors inside
``trace_launches(limits)`` the launchers record their launches for that target instead of
running them, which is how the compile check enumerates exactly what the launchers can pick.
"""

import contextlib
import contextvars
import dataclasses
import functools

import torch
import triton


@dataclasses.dataclass(frozen=True)
class GpuLimits:
    arch: int  # compute capability, major * 10 + minor
    max_shared_mem: int  # bytes of shared memory one block may use (the opt-in maximum)


# Per-block opt-in shared memory from the CUDA programming guide's table of compute
# capabilities: 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100 / H200).
SM80 = GpuLimits(80, 163 * 1024)
SM90 = GpuLimits(90, 227 * 1024)
TARGETS = (SM80, SM90)  # what CI compiles every launchable configuration for


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    kernel: triton.JITFunction
    args: tuple  # positional arguments, tensors as the launcher passes them
    config: dict  # constexpr keyword arguments, num_warps, num_stages


@dataclasses.dataclass
class _Trace:
    limits: GpuLimits
    launches: list[KernelLaunch] = dataclasses.field(default_factory=list)


_TRACE: contextvars.ContextVar[_Trace | None] = contextvars.ContextVar("_TRACE", default=None)


@contextlib.contextmanager
def trace_launches(limits: GpuLimits):
    """Within this block, launchers called on meta tensors configure themselves for a GPU with
    ``limits`` and append their launches to the yielded list instead of running them."""
    trace = _Trace(limits)
    token = _TRACE.set(trace)
    try:
        yield trace.launches
    finally:
        _TRACE.reset(token)


@functools.cache
def _cuda_limits(index: int) -> GpuLimits:
    # The opt-in maximum is what Triton's launcher compares a kernel's shared memory with.
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    major, minor = torch.cuda.get_device_capability(index)
    return GpuLimits(major * 10 + minor, props["max_shared_mem"])


def device_limits(device: torch.device) -> GpuLimits:
    """The limits that launches on ``device`` must respect (see the module docstring)."""
    if device.type == "cuda":
        return _cuda_limits(torch.cuda.current_device() if device.index is None else device.index)
    trace = _TRACE.get()
    if device.type == "meta":
        if trace is None:
            raise RuntimeError("Triton launchers take meta tensors only inside trace_launches()")
        return trace.limits
    return SM80


def launch(kernel: triton.JITFunction, grid: tuple[int, ...], args: tuple, config: dict) -> None:
    """``kernel[grid](*args, **config)``, or its record when ``args`` are meta tensors traced by
    ``trace_launches``."""
    trace = _TRACE.get()
    if trace is not None and args[0].device.type == "meta":
        trace.launches.append(KernelLaunch(kernel, args, config))
    else:
        kernel[grid](*args, **config)


def stages_that_fit(stage_bytes: int, fixed_bytes: int, limits: GpuLimits) -> int:
    """Software-pipeline depth (3, Triton's default, down to 1) whose shared memory estimate,
    ``num_stages · stage_bytes + fixed_bytes``, fits ``limits``; 0 when none does."""
    for stages in (3, 2, 1):
        if stages * stage_bytes + fixed_bytes <= limits.max_shared_mem:
            return stages
    return 0


# fp32 products run on the FMA units (input_precision="ieee"), each thread holding its share of
# both operands in registers. Up to 512 multiply-adds per thread and product no configuration
# spills more than ~100 bytes; at 1024 several spill kilobytes, at 2048 ptxas falls back to 32
# registers and ~15 KB of spills, and compiles 3-5x slower (compile check, sm_80 / sm_90).
FMA_MACS_PER_THREAD = 512


def fma_block_n(block_m: int, block_k: int, num_warps: int) -> int:
    """Widest power-of-two BLOCK_N (16 to 64) whose (block_m x block_k) · (block_k x BLOCK_N)
    fp32 product stays within FMA_MACS_PER_THREAD for ``num_warps`` warps."""
    widest = FMA_MACS_PER_THREAD * 32 * num_warps // (block_m * block_k)
    return max(16, min(64, 1 << (widest.bit_length() - 1)))
