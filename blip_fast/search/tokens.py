"""Stored ViT tokens: an index built with ``store_tokens`` keeps every image's tokens, so ITM
reranking reads its candidates' tokens instead of decoding their files and rerunning the ViT.

Per chunk, beside its features (``blip_fast.search.store``):

    chunk-NNNNNN.tokens.npy   "fp16": float16 (items, Li, W)
                              "int8": int8 (items, Li, W), with
    chunk-NNNNNN.scales.npy   float16 (items, Li, 1): each token's absmax / 127

int8 halves the bytes per image (Li * (W + 2) against 2 * Li * W): one scale per token follows
the tokens' widely different norms (the [CLS] token's among them) at 2 bytes a token.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["FORMATS", "bytes_per_item", "decode", "encode", "suffixes"]

FORMATS = ("fp16", "int8")


def suffixes(fmt: str) -> tuple[str, ...]:
    """The file suffixes of a chunk's tokens in format ``fmt``."""
    return {"fp16": ("tokens",), "int8": ("tokens", "scales")}[fmt]


def encode(tokens: torch.Tensor, fmt: str) -> tuple[np.ndarray, ...]:
    """tokens (B, Li, W) -> the arrays stored for them, one per ``suffixes(fmt)``."""
    if fmt == "fp16":
        return (tokens.to(torch.float16).cpu().numpy(),)
    if fmt == "int8":
        scale = (tokens.float().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8).half()
        quantized = (tokens.float() / scale.float()).round().clamp(-127, 127).to(torch.int8)
        return quantized.cpu().numpy(), scale.cpu().numpy()
    raise ValueError(f"token format must be one of {FORMATS}, got {fmt!r}")


def decode(arrays: tuple[np.ndarray, ...]) -> torch.Tensor:
    """The stored arrays of some images -> their tokens, float32 (B, Li, W)."""
    tokens = torch.from_numpy(np.asarray(arrays[0])).float()
    return tokens * torch.from_numpy(np.asarray(arrays[1])).float() if len(arrays) > 1 else tokens


def bytes_per_item(num_tokens: int, width: int, fmt: str) -> int:
    """Bytes one image's stored tokens take in format ``fmt``."""
    return {"fp16": 2 * num_tokens * width, "int8": num_tokens * (width + 2)}[fmt]
