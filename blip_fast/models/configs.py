"""Model configuration as data: commented dataclasses, JSON presets, official YAML keys.

``BlipConfig.from_yaml`` reads the official BLIP YAML files unchanged (``vit``, ``image_size``,
``vit_grad_ckpt``, ``vit_ckpt_layer``, ``queue_size``, ``alpha``, ``k_test``, ...); unknown keys
are kept in ``extra`` so training / eval code can read them, never dropped.
"""

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML speaks YAML 1.1, where ``1e-5`` is a string; the official configs were read with
    ruamel (YAML 1.2), where it is a float. Resolve floats the YAML 1.2 way."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$"
        r"|^\.(nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def parse_yaml_value(text: str):
    """A ``key=value`` override's value, read as the config files are (YAML 1.2 numbers)."""
    return yaml.load(text, Loader=_Yaml12Loader)


def load_yaml(path) -> dict:
    """An official BLIP YAML config as a dict (YAML 1.2 numbers)."""
    with open(path) as f:
        y = yaml.load(f, Loader=_Yaml12Loader) or {}
    if not isinstance(y, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(y).__name__}")
    return y


@dataclass
class VisionConfig:
    image_size: int = 384  # input side in pixels; tokens = (image_size / patch)^2 + 1
    patch_size: int = 16
    width: int = 768  # ViT-B 768, ViT-L 1024
    depth: int = 12  # ViT-B 12, ViT-L 24
    heads: int = 12  # ViT-B 12, ViT-L 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6  # official ViT; HF BLIP configs say 1e-5
    drop_path_rate: float = 0.0  # ViT-B 0, ViT-L 0.1 (linearly spaced over blocks)
    grad_checkpointing: bool = False  # official `vit_grad_ckpt`
    ckpt_layer: int = 0  # checkpoint the last `ckpt_layer` blocks (`vit_ckpt_layer`)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def preset(cls, vit: str, **overrides) -> "VisionConfig":
        presets = {
            "base": dict(width=768, depth=12, heads=12, drop_path_rate=0.0),
            "large": dict(width=1024, depth=24, heads=16, drop_path_rate=0.1),
        }
        if vit not in presets:
            raise ValueError(f"vit must be one of {sorted(presets)}, got {vit!r}")
        return cls(**{**presets[vit], **overrides})


@dataclass
class TextConfig:
    """BERT-base as in official ``configs/med_config.json`` (no token-type embeddings)."""

    vocab_size: int = 30524  # 30522 WordPiece + [DEC] + [ENC]
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = (
        0.02  # std of the random init (official BERT's; weights loaded over it)
    )
    # Training from scratch only (weights loaded over it): zero query / key weights in the text
    # encoder's self-attention make each token attend uniformly, so [CLS] starts as the mean of
    # its tokens instead of a near-constant vector (the demo's contrastive start needs this).
    # No gradient leaves that point, so it is kept out of the cross-attention (which must learn
    # where each object is for ITM, VQA and NLVR²) and the decoder's causal self-attention.
    zero_init_encoder_self_attention_qk: bool = False


@dataclass
class BlipConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # vision_proj / text_proj output
    queue_size: int = 57600
    momentum: float = 0.995
    alpha: float = 0.4
    temp: float = 0.07  # learnable, clamped to [0.001, 0.5]
    negative_all_rank: bool = False
    label_smoothing: float = 0.1  # LM loss
    zero_init_itm_head: bool = False  # training from scratch (models.blip_base.itm_head)
    prompt: str = "a picture of "  # caption model
    extra: dict = field(default_factory=dict)  # other official YAML keys (k_test, init_lr, ...)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BlipConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown BlipConfig keys: {sorted(unknown)}")
        vision = VisionConfig(**d.pop("vision", {}))
        text = dict(d.pop("text", {}))
        if "zero_init_attention_qk" in text:  # the flag's former name, in older checkpoints
            text["zero_init_encoder_self_attention_qk"] = text.pop("zero_init_attention_qk")
        text = TextConfig(**text)
        return cls(vision=vision, text=text, **d)

    @classmethod
    def from_json(cls, path) -> "BlipConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def preset(cls, name: str) -> "BlipConfig":
        """A named config from ``blip_fast/configs/<name>.json`` (see ``list_configs``)."""
        path = CONFIG_DIR / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(f"no config {name!r} in {CONFIG_DIR}; known: {list_configs()}")
        return cls.from_json(path)

    @classmethod
    def from_yaml(cls, path, **overrides) -> "BlipConfig":
        """An official BLIP YAML (retrieval_flickr.yaml, pretrain.yaml, caption_coco.yaml...)."""
        y = load_yaml(path)
        y.update(overrides)
        return cls.from_official(y)

    @classmethod
    def from_official(cls, y: dict) -> "BlipConfig":
        y = dict(y)
        vision = VisionConfig.preset(
            y.pop("vit", "base"),
            image_size=int(y.pop("image_size", 384)),
            grad_checkpointing=bool(y.pop("vit_grad_ckpt", False)),
            ckpt_layer=int(y.pop("vit_ckpt_layer", 0)),
        )
        kw = {
            k: y.pop(k)
            for k in (
                "queue_size",
                "alpha",
                "negative_all_rank",
                "embed_dim",
                "momentum",
                "prompt",
                "label_smoothing",
            )
            if k in y
        }
        return cls(vision=vision, **kw, extra=y)


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
