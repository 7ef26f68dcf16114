"""Vision Transformer image encoder of BLIP (ViT-B/16, ViT-L/16).

Dosovitskiy et al., https://arxiv.org/abs/2010.11929. Module and parameter names follow the
official BLIP ``vit.py`` (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``norm``...), so official
checkpoints load without renaming. Attention runs through ``blip_fast.ops.attention``.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip_fast import ops
from blip_fast.models.configs import VisionConfig

__all__ = ["VisionTransformer", "interpolate_pos_embed"]


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str | None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    def forward(self, x, residual=None):  # x: (B, N, C); residual: a PackedLinear proj adds it
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # unbind, not qkv[i]: its backward stacks the three gradients once, where three
        # selects would each zero-fill and add a gradient of all of qkv's size
        q, k, v = qkv.unbind(0)
        out = ops.attention(q, k, v, backend=self.backend)  # (B, H, N, D)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out) if residual is None else self.proj(out, residual=residual)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # a module, so a packed copy can fold it into fc1's GEMM
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, residual=None):  # residual: a PackedLinear fc2 adds it
        h = self.act(self.fc1(x))
        return self.fc2(h) if residual is None else self.fc2(h, residual=residual)


class Block(nn.Module):
    """Pre-norm transformer block. ``residual_in_gemm`` (set on inference copies whose
    ``attn.proj`` and ``mlp.fc2`` are PackedLinear): each residual sum inside the GEMM before
    it."""

    residual_in_gemm = False

    def __init__(self, cfg: VisionConfig, drop_path: float, grad_ckpt: bool, backend):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.heads, backend)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.grad_ckpt = grad_ckpt

    def _forward(self, x):
        if self.residual_in_gemm and not self.training:  # no drop path
            x = self.attn(self.norm1(x), residual=x)
            return self.mlp(self.norm2(x), residual=x)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x):
        if self.grad_ckpt and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):  # (B, 3, S, S) -> (B, (S/p)^2, C)
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """[CLS] + patch tokens, learned position embedding, pre-norm blocks, final LayerNorm.

    ``forward(pixels (B, 3, S, S)) -> (B, 1 + (S/16)^2, width)``: all tokens, [CLS] first.
    """

    def __init__(self, cfg: VisionConfig, attention_backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"image_size {cfg.image_size} is not a multiple of the patch size {cfg.patch_size}"
            )
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        first_ckpt = cfg.depth - cfg.ckpt_layer  # official: the last ckpt_layer blocks
        self.blocks = nn.ModuleList(
            Block(cfg, rates[i], cfg.grad_checkpointing and i >= first_ckpt, attention_backend)
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, pixels, token_drop: float = 0.0):
        """``token_drop`` in [0, 1): drop that fraction of the patch tokens, a random subset
        per sample, after the position embedding is added ([CLS] always kept; FLIP, Li et al.
        2023, https://arxiv.org/abs/2212.00794). A training-time change of the objective: the
        output then has 1 + round((1 - token_drop) * patches) tokens; 0 is the official ViT."""
        if pixels.ndim != 4 or pixels.shape[1:] != (3, self.cfg.image_size, self.cfg.image_size):
            raise ValueError(
                f"pixels must be (B, 3, {self.cfg.image_size}, "
                f"{self.cfg.image_size}), got {tuple(pixels.shape)}"
            )
        if not 0.0 <= token_drop < 1.0:
            raise ValueError(f"token_drop must be in [0, 1), got {token_drop}")
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if token_drop > 0.0:
            x = _keep_random_patches(x, token_drop)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def packed(self, backend: str | None = None, dtype: torch.dtype | None = None):
        """An inference copy with its linear layers prepacked for ``backend``
        (``ops.prepack_linears``) and, in this module's dtype, every MLP's GELU and every
        residual sum inside the GEMM before it (oneDNN post-ops: no pass over the activation,
        no bias copy); ``dtype``: an all-``dtype`` copy, this module's weights untouched, GELU
        and sums run apart (the bf16 GEMM's post-ops round differently: on a trained demo
        model's captions the GELU cost 9 points of agreement with fp32, the sums 2). Other
        tensors are shared; the packed weights are a snapshot. Backend ``reference``: this
        module (or its copy)."""
        vit = self if dtype is None else ops.cast_copy(self, dtype)
        vit = ops.prepack_linears(vit, backend)
        for blk in vit.blocks if dtype is None else ():
            if isinstance(blk.mlp.fc1, ops.PackedLinear):
                blk.mlp.fc1, blk.mlp.act = blk.mlp.fc1.with_activation("gelu"), nn.Identity()
                blk.residual_in_gemm = True
        return vit


def _keep_random_patches(x, drop: float):
    """x (B, 1 + N, C) -> (B, 1 + K, C): [CLS] and K = round((1 - drop) N) (at least 1) patch
    tokens per sample, drawn uniformly without replacement (the top-K of uniform noise)."""
    B, N, C = x.shape[0], x.shape[1] - 1, x.shape[2]
    keep = max(1, round((1.0 - drop) * N))
    idx = torch.rand(B, N, device=x.device).topk(keep, dim=1).indices + 1  # (B, K)
    patches = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, C))
    return torch.cat([x[:, :1], patches], dim=1)


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize (1, 1 + g*g, C) position embeddings to ``num_tokens`` = 1 + G*G: bicubic on the
    patch grid, [CLS] position kept (official ``interpolate_pos_embed``)."""
    if pos_embed.shape[1] == num_tokens:
        return pos_embed
    old, new = int((pos_embed.shape[1] - 1) ** 0.5), int((num_tokens - 1) ** 0.5)
    if old * old + 1 != pos_embed.shape[1] or new * new + 1 != num_tokens:
        raise ValueError(
            f"position embedding {tuple(pos_embed.shape)} cannot be interpolated "
            f"to {num_tokens} tokens: both must be 1 + a square grid"
        )
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    C = grid.shape[-1]
    grid = grid.reshape(1, old, old, C).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, C).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)
