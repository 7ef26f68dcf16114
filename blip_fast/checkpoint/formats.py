"""What a state dict is, read from its keys and shapes: the key layout (official BLIP or HF
BLIP), the task (which heads it has) and the architecture (``BlipConfig``).

Official keys: ``visual_encoder.*`` (ViT), ``text_encoder.*`` / ``text_decoder.*`` (BERT),
``vision_proj``, ``text_proj``, ``itm_head``, momentum copies ``*_m``, queues and ``temp``
(docs/architecture.md, "Checkpoint key layout"). HF BLIP renames only the vision tower
(``vision_model.*``).
"""

from __future__ import annotations

import re

from blip_fast.checkpoint.errors import CheckpointError
from blip_fast.models import convert
from blip_fast.models.configs import BlipConfig, TextConfig, VisionConfig

__all__ = ["apply_official_yaml", "detect_key_format", "infer_config", "infer_task"]


def detect_key_format(path, sd: dict) -> str:
    """``official`` or ``hf``, from the vision tower's prefix; ``path`` names the file in errors."""
    if any(k.startswith("visual_encoder.") for k in sd):
        return "official"
    if any(k.startswith("vision_model.") for k in sd):
        return "hf"
    raise CheckpointError(
        f"{path}: unknown checkpoint format: neither official BLIP keys "
        f"(visual_encoder.*) nor HF BLIP keys (vision_model.*); saw "
        f"{convert.list_keys(list(sd), 8)}"
    )


def infer_task(sd: dict) -> str:
    """pretrain (decoder + ITM head), retrieval (ITM head), vqa (text encoder + decoder, no ITM
    head), caption (decoder only), nlvr (``cls_head``)."""
    if any(k.startswith("cls_head.") for k in sd):
        return "nlvr"
    dec = any(k.startswith("text_decoder.") for k in sd)
    itm = any(k.startswith("itm_head.") for k in sd)
    if dec and itm:
        return "pretrain"
    if itm:
        return "retrieval"
    if dec and any(k.startswith("text_encoder.") for k in sd):
        return "vqa"
    if dec:
        return "caption"
    raise CheckpointError(
        "cannot infer the task: the checkpoint has neither itm_head.* "
        "(retrieval / pretrain) nor text_decoder.* (caption) keys"
    )


def _count(sd, prefix) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd if (m := pat.match(k))})


def _shape(sd, key):
    if key not in sd:
        raise CheckpointError(f"cannot infer the config: key {key!r} missing")
    return tuple(sd[key].shape)


def infer_config(sd: dict) -> BlipConfig:
    """BlipConfig from official-key tensor shapes: ViT width 768 -> base, 1024 -> large
    presets; depth = block count; heads = width / 64; image size from pos_embed tokens; text
    sizes from shapes, heads = hidden / 64."""
    width = _shape(sd, "visual_encoder.cls_token")[-1]
    patch = _shape(sd, "visual_encoder.patch_embed.proj.weight")[-1]
    tokens = _shape(sd, "visual_encoder.pos_embed")[1]
    grid = int(round((tokens - 1) ** 0.5))
    if grid * grid + 1 != tokens:
        raise CheckpointError(
            f"visual_encoder.pos_embed has {tokens} tokens, not 1 + a square grid"
        )
    vit = {768: "base", 1024: "large"}.get(width)
    fc1 = _shape(sd, "visual_encoder.blocks.0.mlp.fc1.weight")[0]
    vision_kw = dict(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        depth=_count(sd, "visual_encoder.blocks."),
        heads=max(width // 64, 1),
        mlp_ratio=fc1 / width,
    )
    vision = VisionConfig.preset(vit, **vision_kw) if vit else VisionConfig(**vision_kw)
    tp = "text_encoder." if any(k.startswith("text_encoder.") for k in sd) else "text_decoder.bert."
    vocab, hidden = _shape(sd, tp + "embeddings.word_embeddings.weight")
    text = TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=_count(sd, tp + "encoder.layer."),
        num_heads=max(hidden // 64, 1),
        intermediate_size=_shape(sd, tp + "encoder.layer.0.intermediate.dense.weight")[0],
        max_position_embeddings=_shape(sd, tp + "embeddings.position_embeddings.weight")[0],
    )
    kw = {}
    if "vision_proj.weight" in sd:
        kw["embed_dim"] = sd["vision_proj.weight"].shape[0]
    if "image_queue" in sd:
        kw["queue_size"] = sd["image_queue"].shape[1]
    return BlipConfig(vision=vision, text=text, **kw)


def apply_official_yaml(cfg: BlipConfig, y: dict) -> BlipConfig:
    """Training fields of an official YAML dict stored next to the weights (shapes win)."""
    y = dict(y)
    for k in ("image_size", "vit", "queue_size", "embed_dim"):
        y.pop(k, None)
    if "vit_grad_ckpt" in y:
        cfg.vision.grad_checkpointing = bool(y.pop("vit_grad_ckpt"))
    if "vit_ckpt_layer" in y:
        cfg.vision.ckpt_layer = int(y.pop("vit_ckpt_layer"))
    for k in ("alpha", "negative_all_rank", "momentum", "prompt", "label_smoothing"):
        if k in y:
            setattr(cfg, k, y.pop(k))
    cfg.extra.update(y)
    return cfg
