"""Public ops. Each takes ``backend=None`` (explicit > ``BLIP_FAST_BACKEND`` > best available);
``reference`` is eager PyTorch mirroring the official math (``blip_fast.ops.reference``)."""

from blip_fast.ops import reference
from blip_fast.ops._backend import available, resolve
from blip_fast.ops.attention import attention
from blip_fast.ops.cross_attention import FUSED_DROPOUT, cross_attention
from blip_fast.ops.gathered_cross_attention import gathered_cross_attention
from blip_fast.ops.itc import itc_loss
from blip_fast.ops.linear import PackedLinear, cast_copy, prepack_linears
from blip_fast.ops.lm_head_loss import lm_head_loss

__all__ = [
    "attention",
    "cross_attention",
    "FUSED_DROPOUT",
    "gathered_cross_attention",
    "itc_loss",
    "lm_head_loss",
    "prepack_linears",
    "cast_copy",
    "PackedLinear",
    "reference",
    "available",
    "resolve",
]
