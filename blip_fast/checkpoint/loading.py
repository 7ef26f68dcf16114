"""Load and save BLIP checkpoints: official ``.pth``, ``.safetensors`` (official or HF keys) and
HuggingFace model directories, with nothing silently dropped.

``load`` reads tensors only through ``torch.load(weights_only=True)`` or safetensors: a pickle
that would run code is refused. What was loaded, initialised from the online encoders
(momentum copies, official ``copy_params``), kept at its initial value (queues, pointer,
temperature) or interpolated (position embeddings) is on ``model.load_report``.

``save(model, path, format="official")`` writes ``{'model': state_dict, 'config': dict}``;
``format="hf"`` writes an HF directory (``config.json``, ``model.safetensors`` with HF keys,
tokenizer files) plus ``blip_fast_extra.safetensors`` with the training-only tensors HF has no
place for, so official -> HF -> official is lossless.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blip_fast.models import convert
from blip_fast.models.configs import BlipConfig, TextConfig, VisionConfig
from blip_fast.models.factory import TASKS, as_config, create_model
from blip_fast.models.vit import interpolate_pos_embed

__all__ = [
    "load",
    "save",
    "convert_checkpoint",
    "read_state_dict",
    "infer_task",
    "infer_config",
    "LoadReport",
    "CheckpointError",
    "UnsafeCheckpointError",
]

log = logging.getLogger("blip_fast")

HF_CONFIG, HF_WEIGHTS, HF_WEIGHTS_BIN = "config.json", "model.safetensors", "pytorch_model.bin"
HF_INDEX = "model.safetensors.index.json"
EXTRA_FILE = "blip_fast_extra.safetensors"
_MOMENTUM = re.compile(r"^(visual_encoder_m|vision_proj_m|text_encoder_m|text_proj_m)\.")
_KEEP_INIT = re.compile(
    r"^(image_queue|text_queue|idx_queue|ptr_queue|queue_ptr|temp)$|"
    r"\.embeddings\.position_ids$"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the problem."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle holding objects other than tensors / plain containers (it could run code)."""


@dataclass
class LoadReport:
    path: str
    source_format: str  # "official" or "hf"
    task: str
    config_source: str  # "argument", "checkpoint", "hf config.json", "shapes"
    loaded: list[str] = field(default_factory=list)
    initialised_from_online: list[str] = field(default_factory=list)  # momentum: copy_params
    kept_random: list[str] = field(default_factory=list)  # queues, ptr, temp: model init
    interpolated: list[str] = field(default_factory=list)  # pos_embed resized
    missing: list[str] = field(default_factory=list)  # strict=False only
    unexpected: list[str] = field(default_factory=list)  # strict=False only

    def __str__(self) -> str:
        parts = [
            f"{self.path} ({self.source_format}, task {self.task}, config from "
            f"{self.config_source}): {len(self.loaded)} loaded"
        ]
        for name in (
            "initialised_from_online",
            "kept_random",
            "interpolated",
            "missing",
            "unexpected",
        ):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{len(keys)} {name.replace('_', ' ')}")
        return ", ".join(parts)


# ------------------------------------------------------------------------------- reading


def _torch_load(path: Path, map_location):
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(
            f"{path}: unknown checkpoint format: not a torch zip / pickle "
            f"file nor safetensors (first bytes {head!r})"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next(
            (
                ln.strip()
                for ln in str(err).splitlines()
                if "Unsupported" in ln or "global" in ln.lower()
            ),
            str(err).splitlines()[0],
        )
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: the pickle contains non-tensor code objects (classes or "
            f"functions that would run on unpickling), which torch.load(weights_only=True) "
            f"rejects. Only tensors and plain containers are accepted. ({detail})"
        ) from None
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(
            f"{path}: unknown checkpoint format: torch.load failed: {err}"
        ) from None


def _load_safetensors(path: Path, device) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as err:
        raise CheckpointError(
            f"{path}: unknown checkpoint format: not a valid safetensors file ({err})"
        ) from None


def _check_tensors(path, sd) -> dict:
    bad = [f"{k} ({type(v).__name__})" for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: unknown checkpoint format: a state dict maps names to "
            f"tensors, but these entries are not tensors: {convert._names(bad)}"
        )
    return sd


def _key_format(path, sd) -> str:
    if any(k.startswith("visual_encoder.") for k in sd):
        return "official"
    if any(k.startswith("vision_model.") for k in sd):
        return "hf"
    raise CheckpointError(
        f"{path}: unknown checkpoint format: neither official BLIP keys "
        f"(visual_encoder.*) nor HF BLIP keys (vision_model.*); saw "
        f"{convert._names(list(sd), 8)}"
    )


def read_state_dict(path, map_location="cpu") -> tuple[dict, dict]:
    """(official-key state dict, info) from any supported checkpoint. info: ``source_format``
    ("official" / "hf"), ``config`` (BlipConfig or None), ``config_source``,
    ``official_config`` (an official YAML dict stored with the weights, if any)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    info = {"config": None, "config_source": None, "official_config": None}
    extra = None
    if path.is_dir():
        cfg_file = path / HF_CONFIG
        if not cfg_file.is_file():
            raise CheckpointError(
                f"{path}: unknown checkpoint format: a directory must be an "
                f"HF model directory with {HF_CONFIG}; found "
                f"{sorted(p.name for p in path.iterdir())}"
            )
        with open(cfg_file) as f:
            hf_cfg = json.load(f)
        info["config"], info["config_source"] = convert.hf_config_to_blip(hf_cfg), "hf config.json"
        info["architectures"] = hf_cfg.get("architectures") or []
        if (path / HF_WEIGHTS).is_file():
            sd = _load_safetensors(path / HF_WEIGHTS, map_location)
        elif (path / HF_INDEX).is_file():
            with open(path / HF_INDEX) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            sd = {}
            for shard in shards:
                sd.update(_load_safetensors(path / shard, map_location))
        elif (path / HF_WEIGHTS_BIN).is_file():
            sd = _torch_load(path / HF_WEIGHTS_BIN, map_location)
        else:
            raise FileNotFoundError(
                f"{path}: HF directory without weights: expected "
                f"{HF_WEIGHTS}, {HF_INDEX} or {HF_WEIGHTS_BIN}"
            )
        if (path / EXTRA_FILE).is_file():
            extra = _check_tensors(
                path / EXTRA_FILE, _load_safetensors(path / EXTRA_FILE, map_location)
            )
    elif path.suffix == ".safetensors":
        sd = _load_safetensors(path, map_location)
    else:
        obj = _torch_load(path, map_location)
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            sd, stored = obj["model"], obj.get("config")
            if isinstance(stored, dict) and isinstance(stored.get("vision"), dict):
                info["config"], info["config_source"] = BlipConfig.from_dict(stored), "checkpoint"
            elif isinstance(stored, dict):
                info["official_config"] = stored
        elif isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
            sd = obj
        else:
            seen = (
                f"a dict with keys {convert._names([str(k) for k in obj], 8)}"
                if isinstance(obj, dict)
                else f"a {type(obj).__name__}"
            )
            raise CheckpointError(
                f"{path}: unknown checkpoint format: expected {{'model': "
                f"state_dict, ...}} or a state dict, got {seen}"
            )
    sd = _check_tensors(path, dict(sd))
    fmt = _key_format(path, sd)
    info["source_format"] = fmt
    if fmt == "hf":
        try:
            sd = convert.hf_to_official(sd, extra, keep_unknown=True)
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: {err.args[0]}") from None
    elif extra:
        sd.update(extra)
    return sd, info


# ------------------------------------------------------------------------------- inference


def infer_task(sd: dict) -> str:
    """pretrain (decoder + ITM head), retrieval (ITM head), caption (decoder only)."""
    dec = any(k.startswith("text_decoder.") for k in sd)
    itm = any(k.startswith("itm_head.") for k in sd)
    if dec and itm:
        return "pretrain"
    if itm:
        return "retrieval"
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


def _with_official_yaml(cfg: BlipConfig, y: dict) -> BlipConfig:
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


# ------------------------------------------------------------------------------- load / save


def _alias_groups(model) -> list[list[str]]:
    """Names of state-dict entries that are the same tensor in ``model``."""
    groups = {}
    for k, v in model.state_dict(keep_vars=True).items():
        groups.setdefault((v.data_ptr(), tuple(v.shape), v.stride(), v.dtype), []).append(k)
    return [g for g in groups.values() if len(g) > 1]


def load(
    path,
    task: str | None = None,
    config=None,
    strict: bool = True,
    backend=None,
    map_location="cpu",
):
    """Build the task model and load a checkpoint into it; ``model.load_report`` says how.

    path: official ``.pth`` / ``.pt`` (``{'model': sd, ...}`` or a bare state dict), a
    ``.safetensors`` file (official or HF keys), or an HF directory (``config.json`` +
    ``model.safetensors`` / ``pytorch_model.bin``). task: ``retrieval`` / ``pretrain`` /
    ``caption``, inferred from the keys when None. config: BlipConfig, preset name, JSON or
    official YAML path; when None, the checkpoint's (HF config.json, our saved config) or one
    inferred from shapes. Position embeddings are interpolated to the config's image size.
    Missing momentum encoders are copied from the online ones; missing queues / pointer /
    temperature keep their initial values. ``strict``: unexpected or other missing keys are
    errors (otherwise reported on ``load_report`` and logged). Returns the model in eval mode.
    """
    sd, info = read_state_dict(path, map_location)
    task = task or infer_task(sd)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    if config is not None:
        cfg, cfg_src = as_config(config), "argument"
    elif info["config"] is not None:
        cfg, cfg_src = info["config"], info["config_source"]
    else:
        cfg, cfg_src = infer_config(sd), "shapes"
        if info["official_config"]:
            cfg = _with_official_yaml(cfg, info["official_config"])
    model = create_model(task, cfg, backend)
    report = LoadReport(str(path), info["source_format"], task, cfg_src)
    own = model.state_dict()

    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if (
            key in sd
            and key in own
            and sd[key].shape != own[key].shape
            and sd[key].shape[-1] == own[key].shape[-1]
        ):
            sd[key] = interpolate_pos_embed(sd[key], own[key].shape[1])
            report.interpolated.append(key)
    for tied, src in convert.TIED_HF_KEYS.items():  # deduplicated files
        if tied in own and tied not in sd and src in sd:
            sd[tied] = sd[src]
    for key, value in sd.items():
        if key.endswith(".embeddings.position_ids"):
            convert.check_position_ids(key, value)

    for key in sd.keys() & own.keys():
        if sd[key].shape != own[key].shape:
            raise CheckpointError(
                f"{path}: key {key!r} has the wrong shape: expected "
                f"{tuple(own[key].shape)} (task {task}), got "
                f"{tuple(sd[key].shape)}"
            )
    unexpected = sorted(sd.keys() - own.keys())
    missing = sorted(own.keys() - sd.keys())
    momentum = [k for k in missing if _MOMENTUM.match(k)]
    own_momentum = [k for k in own if _MOMENTUM.match(k)]
    if momentum and len(momentum) == len(own_momentum):
        report.initialised_from_online = momentum
        missing = [k for k in missing if not _MOMENTUM.match(k)]
    report.kept_random = [k for k in missing if _KEEP_INIT.search(k)]
    missing = [k for k in missing if not _KEEP_INIT.search(k)]
    if strict and (unexpected or missing):
        problems = []
        if missing:
            problems.append(f"{len(missing)} required keys missing: {convert._names(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {convert._names(unexpected)}")
        raise CheckpointError(
            f"{path}: does not fit task {task} (strict=True): " + "; ".join(problems)
        )
    for group in _alias_groups(model):
        present = [k for k in group if k in sd]
        for k in present[1:]:
            if not torch.equal(sd[k].to(sd[present[0]].device), sd[present[0]]):
                raise CheckpointError(
                    f"{path}: {present[0]!r} and {k!r} are one shared tensor "
                    f"in the model but differ in the checkpoint"
                )
    if missing or unexpected:
        log.warning(
            "%s: %d missing keys kept at init %s; %d unexpected keys ignored %s",
            path,
            len(missing),
            convert._names(missing, 5),
            len(unexpected),
            convert._names(unexpected, 5),
        )
    report.missing, report.unexpected = missing, unexpected
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if report.initialised_from_online:
        model.copy_params()
    report.loaded = sorted(k for k in sd if k in own)
    if str(map_location) != "cpu":
        model.to(map_location)
    model.load_report = report
    return model.eval()


def _task_of(model) -> str:
    for name, cls in TASKS.items():
        if type(model) is cls:
            return name
    raise TypeError(f"cannot save a {type(model).__name__}: not one of {sorted(TASKS)}")


def _untie(sd: dict) -> dict:
    """Contiguous tensors, each storage once (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for k, v in sd.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return out


def save(model, path, format: str = "official"):
    """``official``: ``torch.save({'model': state_dict, 'config': cfg.to_dict()}, path)``.
    ``hf``: directory ``path`` with ``config.json``, ``model.safetensors`` (HF keys, tied LM
    head omitted as HF does), tokenizer files and ``blip_fast_extra.safetensors`` (momentum
    encoders, queues, pointer, temperature under their official names)."""
    from safetensors.torch import save_file

    path = Path(path)
    task = _task_of(model)
    sd = model.state_dict()
    if format == "official":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": sd, "config": model.cfg.to_dict()}, path)
        return path
    if format != "hf":
        raise ValueError(f"format must be 'official' or 'hf', got {format!r}")
    tok = model.tokenizer if hasattr(model, "tokenizer") else None
    if tok is None:
        from blip_fast.tokenization import tokenizer

        tok = tokenizer()
    extra = {}
    hf = convert.official_to_hf(sd, extra)
    for tied in convert.TIED_HF_KEYS:
        hf.pop(tied, None)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / HF_CONFIG, "w") as f:
        json.dump(convert.blip_to_hf_config(model.cfg, task), f, indent=2)
    save_file(_untie(hf), str(path / HF_WEIGHTS), metadata={"format": "pt"})
    if extra:
        save_file(_untie(extra), str(path / EXTRA_FILE), metadata={"format": "pt"})
    elif (path / EXTRA_FILE).exists():
        (path / EXTRA_FILE).unlink()
    tok.save_pretrained(path)
    return path


def convert_checkpoint(src, dst, format: str = "hf", task: str | None = None, config=None):
    """Load ``src`` (any supported format, strict) and save it to ``dst`` as ``format``."""
    model = load(src, task=task, config=config, strict=True)
    return save(model, dst, format)
