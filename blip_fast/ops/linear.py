"""Inference linear layers on oneDNN's prepacked fp32 GEMM (CPU).

Why: torch's x86 CPU wheels run fp32 ``F.linear`` through MKL's SGEMM, which takes its AVX2
code path on AMD CPUs: 80-110 GFLOP/s on one core of this project's AMD EPYC (family 26, Zen 5,
AVX-512) VMs, at every shape (a 2048^3 product too), while oneDNN, shipped inside the same
wheel, runs AVX-512 there at 175-235 GFLOP/s (``benchmarks/bench_linear.py``,
results/linear-cpu.json). On a CPU where MKL already runs AVX-512 (Intel) the two are expected
to be close; the benchmark says.

``prepack_linears(module)`` returns an inference copy of ``module`` whose ``nn.Linear`` layers
are ``PackedLinear``: the weight reordered once into oneDNN's blocked layout, then each call is
one GEMM with the bias fused in (``torch.ops.mkldnn._linear_pointwise``, the kernel Inductor's
CPU freezing path emits). Every other parameter and buffer is shared with ``module``, not
copied. The packed weights are a snapshot: build the copy again after the weights change.

Backends (``_backend.PREFERENCE["linear"]``): ``onednn`` on CPU where torch has mkldnn, else
``reference`` (``prepack_linears`` returns ``module`` itself: ``F.linear``, what models run).
"""

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from blip_fast.ops import _backend


class PackedLinear(nn.Module):
    """``nn.Linear`` with its fp32 weight prepacked for oneDNN, inference only; with
    ``activation="gelu"`` the (erf) GELU after it runs inside the GEMM (oneDNN post-op).

    forward(x (..., in_features)) -> (..., out_features). fp32 inputs without autograd run the
    packed GEMM; anything else (autocast, other dtypes, inputs or weights that need grads)
    runs ``F.linear`` (then ``F.gelu``) on the original weight, so results never depend on the
    path taken beyond float rounding."""

    ACTIVATIONS = (None, "gelu")

    def __init__(self, linear: nn.Linear, activation: str | None = None, packed=None):
        super().__init__()
        if linear.weight.device.type != "cpu" or linear.weight.dtype != torch.float32:
            raise ValueError(
                f"PackedLinear: needs an fp32 CPU weight, got "
                f"{linear.weight.dtype} on {linear.weight.device}"
            )
        if activation not in self.ACTIVATIONS:
            raise ValueError(
                f"PackedLinear: activation must be one of {self.ACTIVATIONS}, got {activation!r}"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.linear, self.activation = linear, activation  # shared, for the F.linear path
        # (out_features, in_features) in oneDNN's blocked layout; an opaque mkldnn tensor
        self.packed = (
            torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
            if packed is None
            else packed
        )

    @property
    def weight(self):  # (out_features, in_features), the original
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    def with_activation(self, activation: str | None) -> "PackedLinear":
        """The same packed weight with ``activation`` applied after it (no second pack)."""
        return PackedLinear(self.linear, activation, self.packed)

    def forward(self, x):
        if x.shape[-1] != self.in_features:  # oneDNN's own error names neither shape
            raise ValueError(
                f"PackedLinear: input of shape {tuple(x.shape)} has {x.shape[-1]} "
                f"features, expected (..., {self.in_features})"
            )
        w, b = self.linear.weight, self.linear.bias
        grads = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
        if x.dtype != torch.float32 or grads or torch.is_autocast_enabled("cpu"):
            y = F.linear(x, w, b)
            return y if self.activation is None else F.gelu(y)
        post = ("gelu", [], "none") if self.activation == "gelu" else ("none", [], "")
        return torch.ops.mkldnn._linear_pointwise(
            x, self.packed, None if b is None else b.detach(), *post
        )

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn" + (
            f", activation={self.activation}" if self.activation else ""
        )


def _packable(m: nn.Module) -> bool:
    # fp32 only: bf16 / fp16 F.linear already runs oneDNN on CPU
    return type(m) is nn.Linear and m.weight.dtype == torch.float32


def prepack_linears(module: nn.Module, backend: str | None = None) -> nn.Module:
    """Inference copy of ``module`` with every fp32 ``nn.Linear`` (or ``module`` itself, if
    one) replaced by a ``PackedLinear`` (backend ``onednn``), or ``module`` itself (backend
    ``reference``). ``backend``: None = ``BLIP_FAST_BACKEND``, else the best available for
    the module's device."""
    tensors = list(itertools.chain(module.parameters(), module.buffers()))
    device = tensors[0].device if tensors else torch.device("cpu")
    if _backend.resolve("linear", device, backend) == "reference":
        return module
    if _packable(module):
        return PackedLinear(module)
    shared = {id(t): t for t in tensors}  # deepcopy copies the modules, not their tensors
    packed = copy.deepcopy(module, memo=shared)
    for parent in list(packed.modules()):
        for name, child in parent.named_children():
            if _packable(child):
                setattr(parent, name, PackedLinear(child))
    return packed.eval()
