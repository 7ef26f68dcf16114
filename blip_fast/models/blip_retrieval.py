"""BLIP image-text retrieval model (official ``BLIP_Retrieval``): ViT + BERT text encoder,
projections, ITM head, learnable temperature, momentum encoders and queues with idx."""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from blip_fast import ops
from blip_fast.models.blip_base import MomentumMixin, backend_map, enqueue, init_queues, itm_head
from blip_fast.models.configs import BlipConfig
from blip_fast.models.med import BertModel
from blip_fast.models.vit import VisionTransformer
from blip_fast.ops import reference

ENC_TOKEN_ID = 30523


class BlipITMMixin:
    """Inference API shared by the retrieval and pre-training models."""

    def image_embeds(self, pixels, token_drop: float = 0.0):
        """pixels (B, 3, S, S) -> all image tokens (B, 1 + (S/16)^2, vision width), or fewer
        with ``token_drop`` (training only, see ``VisionTransformer.forward``)."""
        return self.visual_encoder(pixels, token_drop)

    def image_features(self, pixels=None, image_embeds=None):
        """Normalised (B, embed_dim) image features from pixels or precomputed embeds."""
        embeds = self.image_embeds(pixels) if image_embeds is None else image_embeds
        return F.normalize(self.vision_proj(embeds[:, 0]), dim=-1)

    def text_features(self, ids, mask, encoder=None):
        """ids, mask (B, L) as tokenised ([CLS] first) -> normalised (B, embed_dim).
        ``encoder``: an inference copy of ``text_encoder`` to run instead
        (``BertModel.packed``), its last layer for [CLS] alone, the only token read here."""
        if encoder is None:
            out = self.text_encoder(ids, mask, mode="text")
        else:
            out = encoder(ids, mask, mode="text", first_token_only=True)
        return F.normalize(self.text_proj(out[:, 0]), dim=-1)

    def itm_logits(self, ids, mask, image_embeds=None, image_kv=None, enc_only=False):
        """Image-text matching logits (B, 2), index 1 = match. ids, mask (B, L) as tokenised;
        the first token is replaced by [ENC] here, as official. image_embeds (B or 1, N, W);
        a single image is broadcast over the B texts without copying. Or ``image_kv``
        (``text_encoder.image_kv`` of distinct images, ``at`` the image of each text).
        ``enc_only``: the last text layer computes the [ENC] token alone (the head reads no
        other), same logits; off, every token as the official code."""
        ids = ids.clone()
        ids[:, 0] = ENC_TOKEN_ID
        if image_embeds is not None and image_embeds.shape[0] == 1 and ids.shape[0] > 1:
            image_embeds = image_embeds.expand(ids.shape[0], -1, -1)
        out = self.text_encoder(
            ids, mask, image_embeds, mode="multimodal", image_kv=image_kv, first_token_only=enc_only
        )
        return self.itm_head(out[:, 0])

    def gathered_itm(self, dtype: torch.dtype | None = None) -> "GatheredITM":
        """The batched ITM reranker over this model's current weights (``GatheredITM``), or
        over an all-``dtype`` copy of them."""
        return GatheredITM(self, dtype)

    def itc_loss(self, image_feat, text_feat, image_feat_m, text_feat_m, alpha, idx=None):
        """ITC through the op dispatch, reading the queues in place; ``idx`` (fine-tuning)
        makes same-image pairs positive against the batch and ``idx_queue``. Under autocast
        the features arrive in bf16 / fp16 while the queues stay fp32: the features are cast up
        (a (B, B + queue) product, cheap), so the loss is computed in fp32 either way."""
        q = self.image_queue.dtype
        image_feat, text_feat, image_feat_m, text_feat_m = (
            x.to(q) for x in (image_feat, text_feat, image_feat_m, text_feat_m)
        )
        return ops.itc_loss(
            image_feat,
            text_feat,
            image_feat_m,
            text_feat_m,
            self.image_queue,
            self.text_queue,
            self.temp,
            alpha,
            idx,
            None if idx is None else self.idx_queue,
            backend=self.backends.get("itc"),
        )

    def clamp_temp(self):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)


def _gathered_cross_block(layer, x, kv, image_index, rows=None):
    """The rest of a ``BertLayer`` after self-attention for P pairs: cross-attention over
    the per-image K / V ``kv`` (from ``image_kv``) read by ``image_index`` (P,), output
    projection, FFN. x (P, L, hidden) -> (P, L, hidden); with ``rows`` (P,), x holds distinct
    texts and pair p's is row rows[p], so the (text-only) queries are projected once per text."""
    sa = layer.crossattention.self
    q = sa.split_heads(sa.query(x))
    if rows is not None:
        x, q = x[rows], q[rows]
    ctx = ops.gathered_cross_attention(
        q, *kv, image_index, backend=sa.backends.get("gathered_cross_attention")
    )
    x = layer.crossattention.output(ctx.transpose(1, 2).reshape(x.shape), x)
    return layer.output(layer.intermediate(x), x)


def _enc_self_attention(sa, x, mask):
    """Self-attention context of the [ENC] token (query 0) alone: (P, 1, hidden) for x
    (P, L, hidden), mask (P, L) bool. Its scores against the keys x Wkᵀ + bk are x · (Wk q)
    plus one constant per head (which softmax ignores), and its context p · (x Wvᵀ + bv) is
    (p · x) Wvᵀ + bv since the probabilities sum to 1: the keys and values of all L tokens
    (2 L hidden² per pair) are never formed; 2 hidden² + 2 H L hidden instead."""
    P, L, W = x.shape
    H, D = sa.heads, sa.head_dim
    q = sa.query(x[:, 0]).view(P, H, D)
    u = torch.einsum("phd,hdw->phw", q, sa.key.weight.view(H, D, W))  # Wk q per head
    scores = torch.bmm(u, x.transpose(1, 2)) * D**-0.5  # (P, H, L)
    scores = scores + reference.additive_mask(mask, False, 1, L, x.dtype, x.device)[:, 0]
    ctx = torch.einsum(
        "phw,hdw->phd", torch.bmm(scores.softmax(-1), x), sa.value.weight.view(H, D, W)
    )
    if sa.value.bias is not None:
        ctx = ctx + sa.value.bias.view(H, D)
    return ctx.reshape(P, 1, H * D)


class GatheredITM(nn.Module):
    """ITM logits of (text, image) pairs read against per-image cross-attention K / V: the
    batched reranker of the fast retrieval evaluation, inference only.

    Holds ``model``'s text encoder and ITM head with their linear layers prepacked for the
    ``linear`` backend of ``model.backends`` (``ops.prepack_linears``: oneDNN's GEMM on CPU,
    the modules themselves elsewhere); every other tensor is shared with ``model``. The packed
    weights are a snapshot: build a new one after the weights change. Under CPU bf16 autocast
    the packed GEMMs run in bf16 (``PackedLinear``) and the attention ops read bf16 inputs.

    With ``dtype`` (bf16) it holds an all-``dtype`` copy of the text encoder and head instead
    and runs outside autocast: activations stay in ``dtype`` from the embeddings to the head,
    as a model loaded in bf16 runs, so no layer casts its input or output (under autocast the
    LayerNorms and residual adds run in fp32 and every GEMM casts its input back: a third of a
    BERT-base reranker's bf16 time on a 2-core Xeon with AMX). The kernels still accumulate
    and keep softmax statistics in fp32."""

    def __init__(self, model, dtype: torch.dtype | None = None):
        super().__init__()
        backend = model.backends.get("linear")
        head = model.itm_head if dtype is None else ops.cast_copy(model.itm_head, dtype)
        self.dtype = dtype
        self.text_encoder = model.text_encoder.packed(backend, dtype)
        self.itm_head = ops.prepack_linears(head, backend)

    def _precision(self, device):
        return (
            contextlib.nullcontext()
            if self.dtype is None
            else torch.autocast(torch.device(device).type, enabled=False)
        )

    def image_kv(self, image_embeds):
        """Cross-attention keys / values of every text layer for image tokens (N, Li, W):
        a list with one (k, v) per layer, each (N, H, Li, D); computed once per image."""
        with self._precision(image_embeds.device):
            embeds = image_embeds if self.dtype is None else image_embeds.to(self.dtype)
            return self.text_encoder.image_kv(embeds).layers

    def forward(self, ids, mask, kv, image_index):
        """ITM logits (P, 2) of P pairs: text p (ids, mask (P, L), [CLS] first as tokenised)
        with image image_index[p] whose per-layer K / V are ``kv`` (from ``image_kv``).
        Exact up to float rounding. Work no pair needs twice is skipped: the first layer's
        self-attention and cross-attention queries are text-only, so they run once per
        distinct text of the batch; the ITM head reads only the [ENC] token, so the last layer
        runs for that token alone (``_enc_self_attention``)."""
        with self._precision(ids.device):
            return self._logits(ids, mask, kv, image_index)

    def _logits(self, ids, mask, kv, image_index):
        ids = ids.clone()
        ids[:, 0] = ENC_TOKEN_ID
        enc = self.text_encoder
        layers = enc.encoder.layer
        L, m = ids.shape[1], mask.bool()
        uniq, inv = torch.unique(
            torch.cat([ids, mask.to(ids.dtype)], 1), dim=0, return_inverse=True
        )
        x = enc.embeddings(uniq[:, :L])
        x = layers[0].attention(x, x, uniq[:, L:].bool())  # once per distinct text
        x = _gathered_cross_block(layers[0], x, kv[0], image_index, rows=inv)
        for layer, layer_kv in zip(layers[1:-1], kv[1:-1]):
            x = _gathered_cross_block(layer, layer.attention(x, x, m), layer_kv, image_index)
        if len(layers) > 1:
            attn = layers[-1].attention
            x = attn.output(_enc_self_attention(attn.self, x, m), x[:, :1])
            x = _gathered_cross_block(layers[-1], x, kv[-1], image_index)
        return self.itm_head(x[:, 0])


class BlipRetrieval(BlipITMMixin, MomentumMixin, nn.Module):
    momentum_names = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")
    ptr_name = "ptr_queue"

    def __init__(self, cfg: BlipConfig, backend: str | dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.backends = backend_map(backend)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        init_queues(self, cfg, with_idx=True, ptr_name=self.ptr_name)
        self.visual_encoder = VisionTransformer(cfg.vision, self.backends.get("attention"))
        self.text_encoder = BertModel(cfg.text, cfg.vision.width, self.backends)
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.hidden_size, cfg.embed_dim)
        self.itm_head = itm_head(cfg)
        self._make_momentum()

    def enqueue(self, image_feat_m, text_feat_m, idx=None):
        enqueue(self, self.ptr_name, image_feat_m, text_feat_m, idx)
