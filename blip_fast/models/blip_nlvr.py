"""BLIP for NLVR² (official ``BLIP_NLVR``): is a sentence true of a pair of images?

Both images go through the ViT in one batch (all first images, then all second images). The
text encoder is MED's multimodal encoder with every cross-attention doubled (official
``nlvr_encoder.py``): ``self0`` attends to image 0 and ``self1`` to image 1, each followed by
its own output projection (``dense0`` / ``dense1``); the first half of the layers average the
two projections, the second half concatenate them and apply ``merge_layer`` (Linear 2H -> H, no
activation); then dropout, residual and LayerNorm as in any BERT layer. ``cls_head`` (Linear,
ReLU, Linear) classifies the ``[ENC]`` output: index 1 = "True".

Official ``load_checkpoint`` starts the task from a pre-training or retrieval checkpoint by
copying each layer's single cross-attention into both twins (``nlvr_state_dict``); the merge
layers and ``cls_head`` keep their random initialisation.
"""

import dataclasses
import functools
import re

import torch
import torch.nn.functional as F
from torch import nn

from blip_fast.models.blip_base import backend_map
from blip_fast.models.blip_retrieval import ENC_TOKEN_ID
from blip_fast.models.configs import BlipConfig, TextConfig
from blip_fast.models.med import (
    BertAttention,
    BertEmbeddings,
    BertIntermediate,
    BertOutput,
    BertSelfAttention,
    _init_weights,
)
from blip_fast.models.vit import VisionTransformer

__all__ = ["BlipNLVR", "has_twin_cross_attention", "nlvr_state_dict", "merges_from"]

# Official ``blip_nlvr`` builds its ViT with drop_path_rate=0.1 whatever the ViT size.
NLVR_DROP_PATH_RATE = 0.1

# Model keys that no other task's checkpoint holds: they start at their initialisation.
_NEW_KEY = re.compile(r"^cls_head\.|\.crossattention\.output\.merge_layer\.")
# A single cross-attention's keys and the twins official ``load_checkpoint`` copies them into.
_SINGLE_CROSS = re.compile(
    r"^(text_encoder\.encoder\.layer\.\d+\.crossattention\.)(self|output\.dense)(\..*)$"
)


def merges_from(num_layers: int) -> int:
    """Index of the first layer whose twin outputs are merged (``merge_layer``) rather than
    averaged: the second half, ``num_layers // 2`` (official hard-codes 6 for its 12 layers)."""
    return num_layers // 2


class TwinCrossOutput(nn.Module):
    """Official ``BertSelfOutput(twin=True, merge=...)``: one projection per image's context,
    combined by their mean, or by ``merge_layer`` over their concatenation when ``merge``."""

    def __init__(self, cfg: TextConfig, merge: bool):
        super().__init__()
        H = cfg.hidden_size
        self.dense0 = nn.Linear(H, H)
        self.dense1 = nn.Linear(H, H)
        self.merge_layer = nn.Linear(2 * H, H) if merge else None
        self.LayerNorm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, ctx0, ctx1, residual):  # each (B, L, H) -> (B, L, H)
        out0, out1 = self.dense0(ctx0), self.dense1(ctx1)
        if self.merge_layer is None:
            merged = (out0 + out1) / 2
        else:
            merged = self.merge_layer(torch.cat([out0, out1], dim=-1))
        return self.LayerNorm(self.dropout(merged) + residual)


class TwinCrossAttention(nn.Module):
    def __init__(self, cfg: TextConfig, encoder_width: int, merge: bool, backends: dict):
        super().__init__()
        self.self0 = BertSelfAttention(cfg, encoder_width, True, backends)
        self.self1 = BertSelfAttention(cfg, encoder_width, True, backends)
        self.output = TwinCrossOutput(cfg, merge)

    def forward(self, x, image0, image1):
        """x (B, L, H); image0, image1 (B, Li, W), every image token attended."""
        return self.output(self.self0(x, image0, None), self.self1(x, image1, None), x)


class NLVRLayer(nn.Module):
    """Self-attention over the text, twin cross-attention over the two images, FFN."""

    def __init__(self, cfg: TextConfig, encoder_width: int, merge: bool, backends: dict):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size, False, backends)
        self.crossattention = TwinCrossAttention(cfg, encoder_width, merge, backends)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x, mask, image0, image1):
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image0, image1)
        return self.output(self.intermediate(x), x)


class NLVRTextEncoder(nn.Module):
    """The image-pair-grounded text encoder; names follow official ``nlvr_encoder.BertModel``
    (``embeddings.*``, ``encoder.layer.N.*``, no pooler).

    forward(input_ids (B, L), attention_mask (B, L) 0/1, image0, image1 (B, Li, W)) ->
    (B, L, hidden)."""

    def __init__(self, cfg: TextConfig, encoder_width: int, backends: dict):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = nn.Module()
        first_merge = merges_from(cfg.num_layers)
        self.encoder.layer = nn.ModuleList(
            NLVRLayer(cfg, encoder_width, i >= first_merge, backends) for i in range(cfg.num_layers)
        )
        self.apply(functools.partial(_init_weights, std=cfg.initializer_range))

    def forward(self, input_ids, attention_mask, image0, image1):
        x = self.embeddings(input_ids)
        mask = attention_mask.bool()
        for layer in self.encoder.layer:
            x = layer(x, mask, image0, image1)
        return x


class BlipNLVR(nn.Module):
    """ViT + ``NLVRTextEncoder`` + ``cls_head``. ``cfg.vision.drop_path_rate`` is set to the
    official 0.1 (``self.cfg`` holds the config the model was built with)."""

    def __init__(self, cfg: BlipConfig, backend: str | dict | None = None):
        super().__init__()
        vision = dataclasses.replace(cfg.vision, drop_path_rate=NLVR_DROP_PATH_RATE)
        self.cfg = dataclasses.replace(cfg, vision=vision)
        self.backends = backend_map(backend)
        self.visual_encoder = VisionTransformer(vision, self.backends.get("attention"))
        self.text_encoder = NLVRTextEncoder(cfg.text, vision.width, self.backends)
        H = cfg.text.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 2))

    def forward(self, images, ids, mask):
        """Logits (B, 2), index 1 = "True".

        Arguments: images: (2B, 3, S, S), the B first images then the B second images (the
        official batch layout); ids, mask: (B, L) as tokenised ([CLS] first, replaced by [ENC]
        here as official; no truncation: official pads to the longest sentence)."""
        B = ids.shape[0]
        if images.ndim != 4 or images.shape[0] != 2 * B or mask.shape != ids.shape:
            raise ValueError(
                f"images must be (2B, 3, S, S) with B = {B} texts (ids {tuple(ids.shape)}, "
                f"mask {tuple(mask.shape)}), got images {tuple(images.shape)}"
            )
        image0, image1 = self.visual_encoder(images).split(B)
        ids = ids.clone()
        ids[:, 0] = ENC_TOKEN_ID
        hidden = self.text_encoder(ids, mask, image0, image1)
        return self.cls_head(hidden[:, 0])

    def loss(self, images, ids, mask, labels):
        """Cross-entropy of ``forward`` against labels (B,) int64 in {0, 1}."""
        return F.cross_entropy(self(images, ids, mask), labels)


def has_twin_cross_attention(sd: dict) -> bool:
    """Whether a state dict already has the NLVR layout (``crossattention.self0``)."""
    return any(".crossattention.self0." in k for k in sd)


def nlvr_state_dict(sd: dict, model_keys) -> tuple[dict, list[str], list[str]]:
    """Fit another task's official-key state dict (pre-training, retrieval) to ``BlipNLVR``, as
    official ``load_checkpoint`` does.

    Each ``crossattention.self.*`` is copied into ``self0`` and ``self1`` and each
    ``crossattention.output.dense.*`` into ``dense0`` and ``dense1`` (the same tensor under
    both names). Returns (state dict, model keys no such checkpoint holds (``merge_layer``,
    ``cls_head``: they keep their initialisation), checkpoint keys of the other task's heads,
    momentum encoders and queues, dropped as official ``load_state_dict(strict=False)``
    ignores them). Keys of the ViT or the text encoder that the model lacks are kept, so a
    strict load still rejects them."""
    out = {}
    for key, value in sd.items():
        m = _SINGLE_CROSS.match(key)
        if m is None:
            out[key] = value
            continue
        head, name, tail = m.groups()
        twins = ("self0", "self1") if name == "self" else ("output.dense0", "output.dense1")
        for twin in twins:
            out[head + twin + tail] = value
    model_keys = set(model_keys)
    fresh = sorted(k for k in model_keys - out.keys() if _NEW_KEY.search(k))
    ignored = sorted(
        k for k in out.keys() - model_keys if not k.startswith(("visual_encoder.", "text_encoder."))
    )
    for key in ignored:
        del out[key]
    return out, fresh, ignored
