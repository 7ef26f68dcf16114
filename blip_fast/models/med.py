"""MED: BLIP's multimodal mixture of encoder-decoder on a BERT-base trunk.

Li et al., BLIP, https://arxiv.org/abs/2201.12086 (§3.1). One text stack, three modes:
``text`` (bidirectional self-attention only: unimodal encoder), ``multimodal`` (self-attention,
then cross-attention over image tokens, then FFN: image-grounded encoder, [ENC] first), and
``decoder`` (causal self-attention + cross-attention + FFN: image-grounded decoder, [DEC]
first). Cross-attention exists in every layer and runs only in the last two modes. Names follow
official ``med.py`` (``encoder.layer.N.crossattention.self.query``...). Attention runs through
``blip_fast.ops``; ``backends`` maps op name -> requested backend (None = automatic).
"""

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from blip_fast import ops
from blip_fast.models.configs import TextConfig

__all__ = ["BertModel", "BertLMHeadModel", "ImageKV", "tie_encoder_decoder", "lm_loss", "MODES"]

MODES = ("text", "multimodal", "decoder")


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings (no token types), LayerNorm, dropout."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        # Persistent because official checkpoints carry it (text_encoder.embeddings.position_ids).
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings)[None])

    def forward(self, input_ids, past_len: int = 0):  # (B, L) -> (B, L, H)
        L = input_ids.shape[1]
        if past_len + L > self.position_ids.shape[1]:
            raise ValueError(
                f"text of {past_len + L} tokens exceeds max_position_embeddings "
                f"{self.position_ids.shape[1]}"
            )
        pos = self.position_ids[:, past_len : past_len + L]
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Projections + attention op. Cross-attention reads keys / values from image tokens of
    width ``kv_width``; self-attention from the text itself."""

    def __init__(self, cfg: TextConfig, kv_width: int, is_cross: bool, backends: dict):
        super().__init__()
        self.heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout_p = cfg.attention_dropout
        # attention dropout inside the fused kernels where they have it (False: as official
        # BERT, dropout on materialised probabilities; a training-step lever)
        self.fused_dropout = True
        self.is_cross = is_cross
        self.backends = backends

    def split_heads(self, x):  # (B, L, H*D) -> (B, H, L, D)
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def kv(self, source):
        """Keys and values of ``source`` (B, L, kv_width): each (B, H, L, D)."""
        return self.split_heads(self.key(source)), self.split_heads(self.value(source))

    def _attend_image_kv(self, q, k, v, image_index):
        """Cross-attention over K / V projected once per distinct image, (N, H, Li, D); text
        row b reads image image_index[b] (None: image b). The gathered op reads the rows in
        place and its backward sums each image's gradient over the rows that read it; attention
        dropout runs inside it unless its kernel has none (``_fused_dropout``), then the rows are
        copied for an attention op with dropout."""
        p = self.attention_dropout
        if image_index is not None and (
            p == 0.0 or self._fused_dropout("gathered_cross_attention", q)
        ):
            backend = self.backends.get("gathered_cross_attention")
            return ops.gathered_cross_attention(q, k, v, image_index, p, backend=backend)
        if image_index is not None:  # index_select: its backward (index_add_) is several
            # times faster on the CPU than that of k[image_index] (index_put_ accumulate)
            k, v = k.index_select(0, image_index), v.index_select(0, image_index)
        return self._attend(q, k, v, None, False)

    @property
    def attention_dropout(self) -> float:
        return self.dropout_p if self.training else 0.0

    def _fused_dropout(self, op: str, q) -> bool:
        """Whether ``op``'s kernel for q drops attention probabilities itself (the fused
        kernels' counter hash) and the model lets it (``fused_dropout``)."""
        backend = ops.resolve(op, q.device, self.backends.get(op))
        return self.fused_dropout and backend in ops.FUSED_DROPOUT

    def _attend(self, q, k, v, key_padding_mask, causal):
        p = self.attention_dropout
        if self.is_cross and (p == 0.0 or self._fused_dropout("cross_attention", q)):
            backend = self.backends.get("cross_attention")
            return ops.cross_attention(q, k, v, key_padding_mask, p, backend=backend)
        # self-attention, or cross-attention with dropout on a kernel without it
        backend = self.backends.get("attention")
        if p > 0.0 and not self.fused_dropout and backend is None:
            backend = "sdpa"  # dropout on materialised probabilities, as official BERT
        return ops.attention(q, k, v, key_padding_mask, causal=causal, dropout_p=p, backend=backend)

    def forward(self, hidden, kv_source, key_padding_mask, causal=False, cache=None, image_kv=None):
        q = self.split_heads(self.query(hidden))
        if self.is_cross and image_kv is not None:
            ctx = self._attend_image_kv(q, *image_kv)
        else:
            ctx = self._attend(q, *self._keys_values(kv_source, cache), key_padding_mask, causal)
        B, H, L, D = ctx.shape
        return ctx.transpose(1, 2).reshape(B, L, H * D)

    def _keys_values(self, kv_source, cache):
        """K, V of ``kv_source``; with a decoding ``cache``, the image's are computed once
        and the text's are appended to those of the earlier steps."""
        name = "cross" if self.is_cross else "self"
        if cache is not None and self.is_cross and "cross_k" in cache:
            return cache["cross_k"], cache["cross_v"]  # image K/V are fixed while decoding
        k, v = self.kv(kv_source)
        if cache is not None and not self.is_cross and "self_k" in cache:
            k = torch.cat([cache["self_k"], k], dim=2)
            v = torch.cat([cache["self_v"], v], dim=2)
        if cache is not None:
            cache[name + "_k"], cache[name + "_v"] = k, v
        return k, v


class _DenseResidualNorm(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual): BERT's post-norm ending of a sublayer."""

    def __init__(self, cfg: TextConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, residual):
        if isinstance(self.dense, ops.PackedLinear) and not self.training:  # no dropout
            return self.LayerNorm(self.dense(x, residual=residual))  # the sum in the GEMM
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertSelfOutput(_DenseResidualNorm):
    def __init__(self, cfg: TextConfig):
        super().__init__(cfg, cfg.hidden_size)


class BertAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int, is_cross: bool, backends: dict):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width, is_cross, backends)
        self.output = BertSelfOutput(cfg)

    def forward(self, hidden, kv_source, key_padding_mask, causal=False, cache=None, image_kv=None):
        ctx = self.self(hidden, kv_source, key_padding_mask, causal, cache, image_kv)
        return self.output(ctx, hidden)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertOutput(_DenseResidualNorm):
    def __init__(self, cfg: TextConfig):
        super().__init__(cfg, cfg.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig, encoder_width: int, backends: dict):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size, False, backends)
        self.crossattention = BertAttention(cfg, encoder_width, True, backends)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(
        self, x, mask, image, image_mask, mode, cache=None, image_kv=None, first_token_only=False
    ):
        """``first_token_only``: the output of token 0 alone, (B, 1, hidden); its
        self-attention still reads every token of x."""
        query = x[:, :1] if first_token_only else x
        x = self.attention(query, x, mask, causal=mode == "decoder", cache=cache)
        if mode != "text":
            x = self.crossattention(x, image, image_mask, cache=cache, image_kv=image_kv)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, encoder_width: int, backends: dict):
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(cfg, encoder_width, backends) for _ in range(cfg.num_layers)
        )


class BertModel(nn.Module):
    """BERT trunk in one of ``MODES``.

    forward(input_ids (B, L), attention_mask (B, L) 0/1, image_embeds (B, Li, W) or None,
    image_mask (B, Li) bool or None, mode, cache, image_kv) -> (B, L, hidden). ``cache``: a list
    with one dict per layer, filled and extended in place (KV cache for decoding).
    ``image_kv`` (an ``ImageKV`` from ``image_kv``) replaces image_embeds: cross-attention reads
    keys / values projected once per distinct image, text row b those of image index[b]; a
    ``cache`` then holds and extends self-attention keys / values only. ``first_token_only``:
    the last layer computes token 0 alone (out (B, 1, hidden)), all a head on [CLS] / [ENC]
    reads: the same output for it, without the other tokens' last-layer work.
    """

    def __init__(self, cfg: TextConfig, encoder_width: int, backends: dict | None = None):
        super().__init__()
        self.cfg = cfg
        backends = backends or {}
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg, encoder_width, backends)
        self.apply(functools.partial(_init_weights, std=cfg.initializer_range))
        if cfg.zero_init_encoder_self_attention_qk:
            for layer in self.encoder.layer:
                nn.init.zeros_(layer.attention.self.query.weight)
                nn.init.zeros_(layer.attention.self.key.weight)

    def packed(self, backend: str | None = None, dtype: torch.dtype | None = None):
        """An inference copy with its linear layers prepacked for ``backend``
        (``ops.prepack_linears``) and every FFN's GELU inside its first GEMM (a oneDNN
        post-op); ``dtype``: an all-``dtype`` copy, this module's weights untouched. Other
        tensors are shared; the packed weights are a snapshot. Backend ``reference``: this
        module (or its copy)."""
        bert = self if dtype is None else ops.cast_copy(self, dtype)
        bert = ops.prepack_linears(bert, backend)
        for layer in bert.encoder.layer:
            if isinstance(layer.intermediate.dense, ops.PackedLinear):
                layer.intermediate = layer.intermediate.dense.with_activation("gelu")
        return bert

    def image_kv(self, image_embeds) -> "ImageKV":
        """Every layer's cross-attention keys / values of image tokens (N, Li, W), projected
        once, for text passes that read them by index (``ImageKV.at``)."""
        return ImageKV([layer.crossattention.self.kv(image_embeds) for layer in self.encoder.layer])

    def forward(
        self,
        input_ids,
        attention_mask,
        image_embeds=None,
        image_mask=None,
        mode="text",
        cache=None,
        image_kv=None,
        first_token_only=False,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "text" and image_embeds is None and image_kv is None:
            raise ValueError(f"mode {mode!r} needs image_embeds or image_kv")
        if image_kv is not None and image_mask is not None:
            raise ValueError("image_kv reads every image token: no image_mask")
        if first_token_only and (cache is not None or mode == "decoder"):
            raise ValueError("first_token_only is for encoder passes, without a cache")
        past_len = 0 if not cache or "self_k" not in cache[0] else cache[0]["self_k"].shape[2]
        x = self.embeddings(input_ids, past_len)
        mask = attention_mask.bool() if attention_mask is not None else None
        for i, layer in enumerate(self.encoder.layer):
            x = layer(
                x,
                mask,
                image_embeds,
                image_mask,
                mode,
                cache=None if cache is None else cache[i],
                image_kv=None if image_kv is None else (*image_kv.layers[i], image_kv.index),
                first_token_only=first_token_only and i == len(self.encoder.layer) - 1,
            )
        return x


@dataclasses.dataclass(frozen=True)
class ImageKV:
    """Cross-attention keys and values of N distinct images, shared by several text passes
    (ITM rows and the LM pass read the same images): ``layers`` holds one (k, v) per text
    layer, each (N, H, Li, D); text row b attends over image ``index[b]`` ((B,) int64; None:
    image b). Projecting each image once instead of once per row saves the largest GEMMs of
    those passes, and their backward sums into the same K / V."""

    layers: list
    index: torch.Tensor | None = None

    def at(self, index) -> "ImageKV":
        """The same keys / values read by another pass's ``index``."""
        return ImageKV(self.layers, index)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias  # one tensor under both official names

    def forward(self, x):
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)


class BertLMHeadModel(nn.Module):
    """Image-grounded decoder: ``bert`` in decoder mode + LM head whose weight is the word
    embedding (tied). forward(...) -> logits (B, L, vocab)."""

    def __init__(self, cfg: TextConfig, encoder_width: int, backends: dict | None = None):
        super().__init__()
        # the zero query / key start is for the text encoder's [CLS], not causal decoding
        decoder_cfg = dataclasses.replace(cfg, zero_init_encoder_self_attention_qk=False)
        self.bert = BertModel(decoder_cfg, encoder_width, backends)
        self.cls = BertOnlyMLMHead(cfg)
        self.cls.apply(functools.partial(_init_weights, std=cfg.initializer_range))
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.backends = backends or {}

    def forward(self, input_ids, attention_mask, image_embeds, image_mask=None, cache=None):
        hidden = self.bert(input_ids, attention_mask, image_embeds, image_mask, "decoder", cache)
        return self.cls.predictions(hidden)

    def loss(
        self,
        input_ids,
        attention_mask,
        image_embeds,
        labels,
        label_smoothing: float = 0.1,
        image_kv=None,
    ):
        """``lm_loss(forward(...), labels)`` with the decoder Linear and the cross-entropy fused
        (``ops.lm_head_loss``, backend ``backends["lm_head_loss"]``; "reference" is the Linear
        then F.cross_entropy): no (B, L - 1, vocab) logits. The shift is applied to the hidden
        states, so the last position, which predicts nothing, costs nothing. ``image_kv``
        (``BertModel.image_kv``) replaces image_embeds as in ``BertModel.forward``."""
        hidden = self.bert(
            input_ids, attention_mask, image_embeds, None, "decoder", image_kv=image_kv
        )
        head = self.cls.predictions
        return ops.lm_head_loss(
            head.transform(hidden[:, :-1]).flatten(0, 1),
            head.decoder.weight,
            head.bias,
            labels[:, 1:].flatten(),
            label_smoothing,
            backend=self.backends.get("lm_head_loss"),
        )


def tie_encoder_decoder(encoder: BertModel, decoder: BertModel):
    """Share everything but self-attention (paper Table 3): embeddings, cross-attention and FFN
    modules of ``decoder`` become those of ``encoder``. The decoder's LM head keeps pointing at
    the (now shared) word embedding."""
    decoder.embeddings = encoder.embeddings
    for enc, dec in zip(encoder.encoder.layer, decoder.encoder.layer, strict=True):
        dec.crossattention = enc.crossattention
        dec.intermediate = enc.intermediate
        dec.output = enc.output


def lm_loss(logits, labels, label_smoothing: float = 0.1):
    """Next-token cross-entropy as official ``BertLMHeadModel``: logits (B, L, V), or
    (B, L - 1, V) without the last position (it predicts nothing), predict labels (B, L)
    shifted by one; label -100 is ignored (mean over the rest)."""
    B, L = labels.shape
    if logits.dim() != 3 or logits.shape[0] != B or logits.shape[1] not in (L, L - 1):
        raise ValueError(
            f"lm_loss: logits {tuple(logits.shape)} must be (B, L, V) or "
            f"(B, L - 1, V) for labels {tuple(labels.shape)} = (B, L)"
        )
    return F.cross_entropy(
        logits[:, : L - 1].flatten(0, 1), labels[:, 1:].flatten(), label_smoothing=label_smoothing
    )


def _init_weights(m, std: float):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=std)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
