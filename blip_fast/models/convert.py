"""Checkpoint converters between official BLIP and HuggingFace ``transformers`` BLIP.

Official BLIP (Li et al. 2022, https://github.com/salesforce/BLIP) and HF
``BlipForImageTextRetrieval`` / ``BlipForConditionalGeneration`` /
``BlipForQuestionAnswering`` hold the same tensors; only the
vision tower is renamed (``visual_encoder.blocks.N.attn.qkv`` <->
``vision_model.encoder.layers.N.self_attn.qkv`` ...). Text encoder / decoder, projections and the
ITM head keep their names. Our native names ARE the official ones, so converting HF -> official
is all that loading an HF checkpoint needs.

What HF has no place for:
- ``*.embeddings.position_ids`` (a non-persistent buffer in HF): dropped on the way to HF after
  checking it is ``arange`` (anything else is an error, never silently lost), recreated on the
  way back from ``position_embeddings.weight``;
- the training-only tensors (momentum encoders ``*_m``, ``image_queue``, ``text_queue``,
  ``idx_queue``, ``ptr_queue`` / ``queue_ptr``, ``temp``): moved into ``extra`` (kept under their
  official names) when a dict is passed, an error otherwise.

Tied tensors stay in both directions' state dicts (``text_decoder.cls.predictions.decoder.*``);
``blip_fast.checkpoint.save`` drops them from ``model.safetensors`` the way HF does, and
``hf_to_official`` restores them when absent.
"""

from __future__ import annotations

import re

import torch

from blip_fast.models.configs import BlipConfig, TextConfig, VisionConfig

__all__ = [
    "official_to_hf",
    "hf_to_official",
    "hf_config_to_blip",
    "blip_to_hf_config",
    "is_training_only",
    "list_keys",
    "MOMENTUM_KEY",
    "TRAINING_STATE_KEY",
    "HF_ARCHITECTURES",
    "TIED_HF_KEYS",
]

HF_ARCHITECTURES = {
    "retrieval": ["BlipForImageTextRetrieval"],
    "caption": ["BlipForConditionalGeneration"],
    # no HF class holds both; either class loads its part of the file
    "pretrain": ["BlipForImageTextRetrieval", "BlipForConditionalGeneration"],
    "vqa": ["BlipForQuestionAnswering"],
}

# Tied in HF (omitted from its model.safetensors) -> the tensor they alias.
TIED_HF_KEYS = {
    "text_decoder.cls.predictions.decoder.weight": (
        "text_decoder.bert.embeddings.word_embeddings.weight"
    ),
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}

# (official vision suffix, HF vision suffix); block-level entries hold "{n}".
_VISION_TOP = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("norm.", "post_layernorm."),
]
_VISION_BLOCK = [
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("attn.qkv.", "self_attn.qkv."),
    ("attn.proj.", "self_attn.projection."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
]
_SHARED_PREFIXES = ("text_encoder.", "text_decoder.", "vision_proj.", "text_proj.", "itm_head.")
# The official tensors HF BLIP has no place for: the momentum encoders (official
# ``copy_params`` rebuilds them from the online ones) and the training state.
MOMENTUM_KEY = re.compile(r"^(visual_encoder_m|vision_proj_m|text_encoder_m|text_proj_m)\.")
TRAINING_STATE_KEY = re.compile(r"^(image_queue|text_queue|idx_queue|ptr_queue|queue_ptr|temp)$")
_POS_IDS = re.compile(r"^(.*\.embeddings)\.position_ids$")


def is_training_only(key: str) -> bool:
    """True for the official tensors HF BLIP has no place for (momentum, queues, ptr, temp)."""
    return bool(MOMENTUM_KEY.match(key) or TRAINING_STATE_KEY.match(key))


def _rename_vision(rest: str, key: str, to_hf: bool) -> str:
    """Map the part of a vision key after its prefix between layouts (to_hf: official -> HF)."""
    block_re = r"blocks\.(\d+)\.(.*)$" if to_hf else r"encoder\.layers\.(\d+)\.(.*)$"
    block_prefix = "vision_model.encoder.layers" if to_hf else "visual_encoder.blocks"
    top_prefix = "vision_model." if to_hf else "visual_encoder."
    flip = (lambda table: table) if to_hf else (lambda table: [(b, a) for a, b in table])
    m = re.match(block_re, rest)
    if m:
        n, sub = m.groups()
        for a, b in flip(_VISION_BLOCK):
            if sub.startswith(a):
                return f"{block_prefix}.{n}.{b}{sub[len(a) :]}"
    else:
        for a, b in flip(_VISION_TOP):
            if rest == a or (a.endswith(".") and rest.startswith(a)):
                return f"{top_prefix}{b}{rest[len(a) :]}"
    src, dst = ("official", "HF") if to_hf else ("HF", "official")
    raise KeyError(f"{src} key {key!r} has no {dst} equivalent")


def check_position_ids(key: str, value: torch.Tensor):
    """Raise unless ``value`` is (1, n) ``arange(n)`` (the only value official BLIP writes)."""
    n = value.shape[-1] if value.ndim else 0
    if (
        value.ndim != 2
        or value.shape[0] != 1
        or not torch.equal(value.cpu().long(), torch.arange(n)[None])
    ):
        raise ValueError(
            f"{key}: expected position ids arange({n}) of shape (1, {n}), got a "
            f"{tuple(value.shape)} tensor that is not arange; this checkpoint "
            f"cannot be represented without them"
        )


def official_to_hf(sd: dict, extra: dict | None = None, keep_unknown: bool = False) -> dict:
    """Official BLIP state dict -> HF BLIP state dict (same tensors, not copied).

    ``position_ids`` are checked (must be arange) and dropped. Training-only tensors
    (``is_training_only``) go into ``extra`` under their official names when a dict is given;
    with ``extra=None`` their presence is an error naming them. Keys with no HF equivalent are
    an error, or passed through unchanged with ``keep_unknown=True``."""
    out, leftover = {}, []
    for key, value in sd.items():
        if _POS_IDS.match(key):
            check_position_ids(key, value)
            continue
        if is_training_only(key):
            if extra is None:
                leftover.append(key)
            else:
                extra[key] = value
            continue
        if key.startswith("visual_encoder."):
            out[_rename_vision(key[len("visual_encoder.") :], key, to_hf=True)] = value
        elif key.startswith(_SHARED_PREFIXES) or keep_unknown:
            out[key] = value
        else:
            raise KeyError(f"official key {key!r} has no HF equivalent")
    if leftover:
        raise ValueError(
            f"{len(leftover)} training-only tensors have no HF name; pass "
            f"extra={{}} to collect them: {list_keys(leftover)}"
        )
    return out


def hf_to_official(sd: dict, extra: dict | None = None, keep_unknown: bool = False) -> dict:
    """HF BLIP state dict (+ the ``extra`` training-only tensors, official names) -> official.

    Recreates ``*.embeddings.position_ids`` (arange over ``position_embeddings``) and the tied
    LM-head entries (``text_decoder.cls.predictions.decoder.weight`` / ``.bias``) when absent.
    Keys with no official equivalent are an error, or kept unchanged with ``keep_unknown``."""
    out = {}
    for key, value in sd.items():
        if key.startswith("vision_model."):
            try:
                out[_rename_vision(key[len("vision_model.") :], key, to_hf=False)] = value
            except KeyError:
                if not keep_unknown:
                    raise
                out[key] = value
        elif key.startswith(_SHARED_PREFIXES) or keep_unknown:
            if _POS_IDS.match(key):  # some old HF files still carry them
                check_position_ids(key, value)
            out[key] = value
        else:
            raise KeyError(f"HF key {key!r} has no official equivalent")
    for key, value in (extra or {}).items():
        if key in out:
            raise ValueError(f"extra tensor {key!r} duplicates a model tensor")
        out[key] = value
    for key in list(out):
        m = re.match(r"^(.*\.embeddings)\.position_embeddings\.weight$", key)
        if m and m.group(1) + ".position_ids" not in out:
            out[m.group(1) + ".position_ids"] = torch.arange(out[key].shape[0])[None]
    for tied, src in TIED_HF_KEYS.items():
        if tied not in out and src in out:
            out[tied] = out[src]
    return out


def list_keys(keys, limit=20) -> str:
    """``keys`` sorted and comma-separated, the first ``limit`` of them, for error messages."""
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ----------------------------------------------------------------------------------- configs


class _HfSection(dict):
    """One section of an HF ``config.json``, read field by field: a field of the wrong type or
    range is an error naming it, not a failure deep inside model construction."""

    def __init__(self, name: str, fields: dict):
        super().__init__(fields)
        self.name = name

    def integer(self, key: str, default: int) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{self.name}.{key}: {value!r}: expected an integer >= 1")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{self.name}.{key}: {value!r}: expected a number >= 0")
        return float(value)


def hf_config_to_blip(config: dict) -> BlipConfig:
    """An HF BLIP ``config.json`` dict -> BlipConfig (HF defaults for absent keys; HF's own eps
    values kept, e.g. vision 1e-5). A ``blip_fast`` section written by ``blip_to_hf_config``
    restores the training fields HF has no place for."""
    if not isinstance(config, dict):
        raise ValueError(f"expected a JSON object, got {type(config).__name__}")
    sections = {name: config.get(name) for name in ("vision_config", "text_config")}
    v, t = ({} if sub is None else sub for sub in sections.values())
    for name, sub in (("vision_config", v), ("text_config", t)):
        if not isinstance(sub, dict):
            raise ValueError(f"{name} must be an object, got {type(sub).__name__}")
    v, t = _HfSection("vision_config", v), _HfSection("text_config", t)
    for name, sub in (("vision_config", v), ("text_config", t)):
        act = sub.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"{name}.hidden_act {act!r} is not supported (BLIP uses 'gelu')")
    width = v.integer("hidden_size", 768)
    hidden = t.integer("hidden_size", 768)
    enc = t.integer("encoder_hidden_size", 768)
    if enc != width:
        raise ValueError(
            f"text_config.encoder_hidden_size {enc} != vision_config.hidden_size "
            f"{width}: cross-attention reads the vision tokens"
        )
    image_size, patch = v.get("image_size", 384), v.get("patch_size", 16)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ValueError(f"non-square image_size {image_size} is not supported")
        image_size = image_size[0]
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    image_size = _HfSection("vision_config", {"image_size": image_size}).integer("image_size", 0)
    patch = _HfSection("vision_config", {"patch_size": patch}).integer("patch_size", 0)
    bf = dict(config.get("blip_fast") or {})
    vision_bf = bf.pop("vision", {})
    vision = VisionConfig(
        image_size=image_size,
        patch_size=patch,
        width=width,
        depth=v.integer("num_hidden_layers", 12),
        heads=v.integer("num_attention_heads", 12),
        mlp_ratio=v.integer("intermediate_size", 3072) / width,
        layer_norm_eps=v.number("layer_norm_eps", 1e-5),
        **vision_bf,
    )
    text = TextConfig(
        vocab_size=t.integer("vocab_size", 30524),
        hidden_size=hidden,
        num_layers=t.integer("num_hidden_layers", 12),
        num_heads=t.integer("num_attention_heads", 8),
        intermediate_size=t.integer("intermediate_size", 3072),
        max_position_embeddings=t.integer("max_position_embeddings", 512),
        layer_norm_eps=t.number("layer_norm_eps", 1e-12),
        hidden_dropout=t.number("hidden_dropout_prob", 0.0),
        attention_dropout=t.number("attention_probs_dropout_prob", 0.0),
        initializer_range=t.number("initializer_range", 0.02),
    )
    # HF's text_config.label_smoothing defaults to 0.0 whatever the weights were trained with;
    # the official 0.1 stays unless our own section says otherwise.
    kw = dict(embed_dim=int(config.get("image_text_hidden_size", 256)), **bf)
    return BlipConfig(vision=vision, text=text, **kw)


def blip_to_hf_config(cfg: BlipConfig, task: str) -> dict:
    """BlipConfig -> HF BLIP ``config.json`` dict for ``task`` (``retrieval``, ``caption``,
    ``pretrain``, ``vqa``). Our eps values are written as they are (official 1e-6 stays 1e-6)."""
    if task not in HF_ARCHITECTURES:
        raise ValueError(f"unknown task {task!r}; known: {sorted(HF_ARCHITECTURES)}")
    v, t = cfg.vision, cfg.text
    intermediate = int(round(v.width * v.mlp_ratio))
    full = cfg.to_dict()
    vision_bf = {
        k: full["vision"][k] for k in ("drop_path_rate", "grad_checkpointing", "ckpt_layer")
    }
    blip_fast = {k: val for k, val in full.items() if k not in ("vision", "text", "embed_dim")}
    blip_fast["vision"] = vision_bf
    return {
        "architectures": list(HF_ARCHITECTURES[task]),
        "model_type": "blip",
        "image_text_hidden_size": cfg.embed_dim,
        "projection_dim": 512,
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "label_smoothing": 0.0,
        "tie_word_embeddings": True,
        "vision_config": {
            "model_type": "blip_vision_model",
            "hidden_size": v.width,
            "intermediate_size": intermediate,
            "num_hidden_layers": v.depth,
            "num_attention_heads": v.heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": "gelu",
            "attention_dropout": 0.0,
            "initializer_range": 1e-10,
            "projection_dim": 512,
        },
        "text_config": {
            "model_type": "blip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "encoder_hidden_size": v.width,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "max_position_embeddings": t.max_position_embeddings,
            "layer_norm_eps": t.layer_norm_eps,
            "hidden_act": "gelu",
            "hidden_dropout_prob": t.hidden_dropout,
            "attention_probs_dropout_prob": t.attention_dropout,
            "initializer_range": t.initializer_range,
            "projection_dim": 768,
            "bos_token_id": 30522,
            "sep_token_id": 102,
            "pad_token_id": 0,
            "eos_token_id": 2,
            "is_decoder": True,
            "use_cache": True,
            "tie_word_embeddings": True,
            "label_smoothing": cfg.label_smoothing,
        },
        "blip_fast": blip_fast,
    }
