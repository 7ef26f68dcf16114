"""``save`` in the official layout or as an HF model directory, and ``convert_checkpoint``.

``format="official"`` writes ``{'model': state_dict, 'config': dict}`` with ``torch.save``;
``format="hf"`` writes an HF directory (``config.json``, ``model.safetensors`` with HF keys,
tokenizer files) plus ``blip_fast_extra.safetensors`` with the training-only tensors HF has no
place for, so official -> HF -> official is lossless.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from blip_fast.checkpoint.loading import load
from blip_fast.checkpoint.reading import CONFIG_METADATA, EXTRA_FILE, HF_CONFIG, HF_WEIGHTS
from blip_fast.models import convert
from blip_fast.models.factory import TASKS

__all__ = ["convert_checkpoint", "save"]


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
    """``official``: ``torch.save({'model': state_dict, 'config': cfg.to_dict()}, path)``, or
    for a ``.safetensors`` path the same keys as safetensors, the config in its metadata.
    ``hf``: directory ``path`` with ``config.json``, ``model.safetensors`` (HF keys, tied LM
    head omitted as HF does), tokenizer files and ``blip_fast_extra.safetensors`` (momentum
    encoders, queues, pointer, temperature under their official names). Returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    task = _task_of(model)
    sd = model.state_dict()
    if format == "official" and path.suffix == ".safetensors":  # official keys, no pickle
        path.parent.mkdir(parents=True, exist_ok=True)
        config = json.dumps(model.cfg.to_dict())
        save_file(_untie(sd), str(path), metadata={"format": "pt", CONFIG_METADATA: config})
        return path
    if format == "official":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": sd, "config": model.cfg.to_dict()}, path)
        return path
    if format != "hf":
        raise ValueError(f"format must be 'official' or 'hf', got {format!r}")
    if task not in convert.HF_ARCHITECTURES:
        raise ValueError(f"HF BLIP has no {task} model: save it with format='official'")
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
