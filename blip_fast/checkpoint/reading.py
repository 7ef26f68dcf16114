"""Checkpoint files -> one state dict under official BLIP key names.

Tensors are read only by ``torch.load(weights_only=True)`` or safetensors: a pickle that would
run code on unpickling is refused (``UnsafeCheckpointError``), never executed. Layouts read:
an official ``.pth`` / ``.pt`` (``{'model': state_dict, ...}`` or a bare state dict), a
``.safetensors`` file (official or HF keys) and an HF model directory (``config.json`` +
``model.safetensors``, a sharded index or ``pytorch_model.bin``, and the training-only tensors
``save(format="hf")`` writes beside them).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from blip_fast.checkpoint.errors import CheckpointError, UnsafeCheckpointError
from blip_fast.checkpoint.formats import detect_key_format
from blip_fast.models import convert
from blip_fast.models.configs import BlipConfig

__all__ = ["CONFIG_METADATA", "EXTRA_FILE", "HF_CONFIG", "HF_WEIGHTS", "read_state_dict"]

HF_CONFIG, HF_WEIGHTS, HF_WEIGHTS_BIN = "config.json", "model.safetensors", "pytorch_model.bin"
HF_INDEX = "model.safetensors.index.json"
# Momentum encoders, queues, pointer and temperature under their official names: the tensors
# an HF directory has no place for, so official -> HF -> official is lossless.
EXTRA_FILE = "blip_fast_extra.safetensors"
# safetensors metadata key under which ``save(model, "x.safetensors")`` stores the BlipConfig
CONFIG_METADATA = "blip_fast_config"


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


def _safetensors_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _check_tensors(path, sd) -> dict:
    bad = [f"{k} ({type(v).__name__})" for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: unknown checkpoint format: a state dict maps names to "
            f"tensors, but these entries are not tensors: {convert.list_keys(bad)}"
        )
    return sd


def _read_hf_dir(path: Path, map_location, info: dict) -> tuple[dict, dict | None]:
    """(HF-key state dict, extra training-only tensors or None) of an HF model directory."""
    cfg_file = path / HF_CONFIG
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{path}: unknown checkpoint format: a directory must be an "
            f"HF model directory with {HF_CONFIG}; found "
            f"{sorted(p.name for p in path.iterdir())}"
        )
    try:
        hf_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        info["config"], info["config_source"] = convert.hf_config_to_blip(hf_cfg), "hf config.json"
    except ValueError as err:  # json.JSONDecodeError is a ValueError too
        raise CheckpointError(f"{cfg_file}: {err}") from None
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
    extra = None
    if (path / EXTRA_FILE).is_file():
        extra = _check_tensors(
            path / EXTRA_FILE, _load_safetensors(path / EXTRA_FILE, map_location)
        )
    return sd, extra


def _read_pickle(path: Path, map_location, info: dict) -> dict:
    """The state dict of a ``torch.save`` file: ``{'model': sd, 'config': ...}`` or a bare sd."""
    obj = _torch_load(path, map_location)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        stored = obj.get("config")
        if isinstance(stored, dict) and isinstance(stored.get("vision"), dict):
            info["config"], info["config_source"] = BlipConfig.from_dict(stored), "checkpoint"
        elif isinstance(stored, dict):
            info["official_config"] = stored
        return obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        return obj
    seen = (
        f"a dict with keys {convert.list_keys([str(k) for k in obj], 8)}"
        if isinstance(obj, dict)
        else f"a {type(obj).__name__}"
    )
    raise CheckpointError(
        f"{path}: unknown checkpoint format: expected {{'model': "
        f"state_dict, ...}} or a state dict, got {seen}"
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
        sd, extra = _read_hf_dir(path, map_location, info)
    elif path.suffix == ".safetensors":
        sd = _load_safetensors(path, map_location)
        stored = _safetensors_metadata(path).get(CONFIG_METADATA)
        if stored:
            info["config"], info["config_source"] = BlipConfig.from_dict(json.loads(stored)), "file"
    else:
        sd = _read_pickle(path, map_location, info)
    sd = _check_tensors(path, dict(sd))
    fmt = detect_key_format(path, sd)
    info["source_format"] = fmt
    if fmt == "hf":
        try:
            sd = convert.hf_to_official(sd, extra, keep_unknown=True)
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: {err.args[0]}") from None
    elif extra:
        sd.update(extra)
    return sd, info
