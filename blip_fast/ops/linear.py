"""Inference linear layers on oneDNN's prepacked GEMM (CPU), fp32 and bf16.

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

Under CPU bf16 autocast (or with bf16 inputs) a ``PackedLinear`` runs the same GEMM on a bf16
copy of its weight, packed on first use: oneDNN's AMX / AVX512-BF16 kernels where the CPU has
them. On a Xeon with AMX (2 shared cores, 1 thread) bf16 GEMMs at BERT-base's reranker shapes
run 4-8x the fp32 ones, less at 256-wide layers; the packed one ~1.4x autocast's ``F.linear``,
which casts the weight on every call (``benchmarks/bench_linear.py``). The fp32 bias is fused
as is. A module already in bf16 (an all-bf16 inference copy) packs its bf16 weights directly.

Backends (``_backend.PREFERENCE["linear"]``): ``onednn`` on CPU where torch has mkldnn, else
``reference`` (``prepack_linears`` returns ``module`` itself: ``F.linear``, what models run).
"""

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from blip_fast.ops import _backend

_PACKABLE = (torch.float32, torch.bfloat16)  # weight dtypes oneDNN packs


def native_bf16() -> bool:
    """Whether oneDNN has bf16 GEMMs in hardware on this CPU (AMX tiles or AVX512-BF16);
    without them it emulates bf16 on AVX-512 or refuses it, slower than fp32 either way."""
    return torch.backends.mkldnn.is_available() and (
        torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    )


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight prepacked for oneDNN, inference only; with
    ``activation="gelu"`` the (erf) GELU after it runs inside the GEMM (oneDNN post-op).

    forward(x (..., in_features)) -> (..., out_features). Without autograd, fp32 inputs run the
    fp32 packed GEMM, and bf16 inputs or any input under CPU bf16 autocast the bf16 one (bf16
    out, as autocast's ``F.linear``); anything else (fp16 autocast, other dtypes, inputs or
    weights that need grads) runs ``F.linear`` (then ``F.gelu``) on the original weight, so
    results never depend on the path taken beyond float rounding."""

    ACTIVATIONS = (None, "gelu")

    def __init__(self, linear: nn.Linear, activation: str | None = None, packed=None):
        """``packed``: another PackedLinear's packed weights (dtype -> packed), shared."""
        super().__init__()
        if linear.weight.device.type != "cpu" or linear.weight.dtype not in _PACKABLE:
            raise ValueError(
                f"PackedLinear: needs an fp32 or bf16 CPU weight, got "
                f"{linear.weight.dtype} on {linear.weight.device}"
            )
        if activation not in self.ACTIVATIONS:
            raise ValueError(
                f"PackedLinear: activation must be one of {self.ACTIVATIONS}, got {activation!r}"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.linear, self.activation = linear, activation  # shared, for the F.linear path
        # dtype -> (out_features, in_features) in oneDNN's blocked layout, an opaque mkldnn
        # tensor; the weight's dtype now, the other on first use (a dict shared by
        # ``with_activation`` copies)
        w = linear.weight.detach()
        self.packed = (
            {w.dtype: torch.ops.mkldnn._reorder_linear_weight(w)} if packed is None else packed
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

    def forward(self, x, residual=None):
        """``residual`` (x's shape with out_features last): returns activation(linear(x)) +
        residual, the sum inside the GEMM (a oneDNN post-op, before the output is rounded)
        where residual already has the GEMM's dtype, else added after it."""
        if x.shape[-1] != self.in_features:  # oneDNN's own error names neither shape
            raise ValueError(
                f"PackedLinear: input of shape {tuple(x.shape)} has {x.shape[-1]} "
                f"features, expected (..., {self.in_features})"
            )
        out_shape = (*x.shape[:-1], self.out_features)
        if residual is not None and tuple(residual.shape) != out_shape:  # no broadcasting
            raise ValueError(
                f"PackedLinear: residual of shape {tuple(residual.shape)} does not match the "
                f"output's {out_shape}"
            )
        w, b = self.linear.weight, self.linear.bias
        grads = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
        dtype = self._gemm_dtype(x)
        if dtype is None or grads:
            y = F.linear(x, w, b)
            y = y if self.activation is None else F.gelu(y)
            return y if residual is None else y + residual
        if dtype not in self.packed:
            self.packed[dtype] = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype))
        if b is not None:  # a bf16 GEMM fuses an fp32 or bf16 bias, an fp32 one fp32 only
            b = b.detach() if dtype == torch.bfloat16 else b.detach().to(dtype)
        x = x.to(dtype)
        if (
            residual is not None and self.activation is None and residual.dtype == dtype
        ):  # the binary post-op takes a bias of the GEMM's dtype only
            bias = None if b is None else b.to(dtype)
            return torch.ops.mkldnn._linear_pointwise.binary(
                x, residual.contiguous(), self.packed[dtype], bias, "add"
            )
        post = ("gelu", [], "none") if self.activation == "gelu" else ("none", [], "")
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed[dtype], b, *post)
        return y if residual is None else y + residual

    @staticmethod
    def _gemm_dtype(x) -> torch.dtype | None:
        """The packed GEMM's dtype for input ``x``, None for ``F.linear``."""
        packable = x.dtype in (torch.float32, torch.bfloat16)
        if torch.is_autocast_enabled("cpu"):  # autocast casts fp32 (and bf16) inputs only
            bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16
            return torch.bfloat16 if bf16 and packable else None
        return x.dtype if packable else None

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn" + (
            f", activation={self.activation}" if self.activation else ""
        )


def cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` with its floating-point parameters and buffers in ``dtype``, each
    converted in one pass (``copy.deepcopy(module).to(dtype)`` copies every tensor first:
    for a bf16 BERT-base that is 0.2 s of a 2-core CPU on the word embeddings alone). Tensors
    already in ``dtype`` are shared, not copied."""
    memo = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.dtype == dtype:
            memo[id(t)] = t
        elif t.is_floating_point():
            cast = t.detach().to(dtype)
            is_param = isinstance(t, nn.Parameter)
            memo[id(t)] = nn.Parameter(cast, t.requires_grad) if is_param else cast
    return copy.deepcopy(module, memo=memo)


def _packable(m: nn.Module) -> bool:
    return type(m) is nn.Linear and m.weight.dtype in _PACKABLE


def prepack_linears(module: nn.Module, backend: str | None = None) -> nn.Module:
    """Inference copy of ``module`` with every fp32 or bf16 ``nn.Linear`` (or ``module`` itself, if
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
