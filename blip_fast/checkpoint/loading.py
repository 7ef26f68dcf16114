"""``load``: build the task model for a checkpoint and load it, with nothing silently dropped.

Every model key ends up loaded, initialised from the online encoders (momentum copies, official
``copy_params``), kept at its initial value (queues, pointer, temperature), interpolated
(position embeddings of another image size) or, with ``strict=False`` only, missing; every
checkpoint key is loaded or, with ``strict=False`` only, unexpected. ``model.load_report``
(``LoadReport``) lists which.
"""

from __future__ import annotations

import logging

import torch

from blip_fast.checkpoint.errors import CheckpointError
from blip_fast.checkpoint.formats import apply_official_yaml, infer_config, infer_task
from blip_fast.checkpoint.reading import read_state_dict
from blip_fast.checkpoint.report import LoadReport
from blip_fast.models import convert
from blip_fast.models.blip_nlvr import has_twin_cross_attention, nlvr_state_dict
from blip_fast.models.factory import TASKS, as_config, create_model
from blip_fast.models.vit import interpolate_pos_embed

__all__ = ["load"]

log = logging.getLogger("blip_fast")


def _alias_groups(model) -> list[list[str]]:
    """Names of state-dict entries that are the same tensor in ``model``."""
    groups = {}
    for k, v in model.state_dict(keep_vars=True).items():
        groups.setdefault((v.data_ptr(), tuple(v.shape), v.stride(), v.dtype), []).append(k)
    return [g for g in groups.values() if len(g) > 1]


def _fit_to_model(sd: dict, own: dict, report: LoadReport) -> None:
    """In place: position embeddings interpolated to the model's grid, tied entries that HF
    files omit restored from the tensor they alias, position ids checked to be arange."""
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if (
            key in sd
            and key in own
            and sd[key].shape != own[key].shape
            and sd[key].shape[-1] == own[key].shape[-1]
        ):
            sd[key] = interpolate_pos_embed(sd[key], own[key].shape[1])
            report.interpolated.append(key)
    for tied, src in convert.TIED_HF_KEYS.items():
        if tied in own and tied not in sd and src in sd:
            sd[tied] = sd[src]
    for key, value in sd.items():
        if key.endswith(".embeddings.position_ids"):
            convert.check_position_ids(key, value)


def _check_shapes_and_dtypes(path, task: str, sd: dict, own: dict) -> None:
    """Shapes must match; a floating entry may come in any floating dtype (it is converted),
    never as integers or bools, which load_state_dict would cast (an int32 0.7 becomes 0)."""
    for key in sorted(sd.keys() & own.keys()):
        if sd[key].shape != own[key].shape:
            raise CheckpointError(
                f"{path}: key {key!r} has the wrong shape: expected "
                f"{tuple(own[key].shape)} (task {task}), got "
                f"{tuple(sd[key].shape)}"
            )
        if own[key].is_floating_point() != sd[key].is_floating_point():
            raise CheckpointError(
                f"{path}: key {key!r} has dtype {sd[key].dtype}; the model holds it as "
                f"{own[key].dtype}"
            )


def _check_strict(path, task: str, missing: list[str], unexpected: list[str]) -> None:
    problems = []
    if missing:
        problems.append(f"{len(missing)} required keys missing: {convert.list_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {convert.list_keys(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{path}: does not fit task {task} (strict=True): " + "; ".join(problems)
        )


def _check_tied(path, sd: dict, model) -> None:
    """Tensors the model shares (tied weights) must hold one value in the checkpoint."""
    for group in _alias_groups(model):
        present = [k for k in group if k in sd]
        for k in present[1:]:
            if not torch.equal(sd[k].to(sd[present[0]].device), sd[present[0]]):
                raise CheckpointError(
                    f"{path}: {present[0]!r} and {k!r} are one shared tensor "
                    f"in the model but differ in the checkpoint"
                )


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
    ``caption`` / ``nlvr`` / ``vqa``, inferred from the keys when None; ``nlvr`` also starts from a
    pre-training or retrieval checkpoint (``blip_nlvr.nlvr_state_dict``, reported as
    ``new_task_init`` / ``other_task_dropped``). config: BlipConfig, preset name, JSON or
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
            cfg = apply_official_yaml(cfg, info["official_config"])
    model = create_model(task, cfg, backend)
    report = LoadReport(str(path), info["source_format"], task, cfg_src)
    own = model.state_dict()
    if task == "nlvr" and not has_twin_cross_attention(sd):  # fine-tuning starts here
        sd, report.new_task_init, report.other_task_dropped = nlvr_state_dict(sd, own)

    _fit_to_model(sd, own, report)
    _check_shapes_and_dtypes(path, task, sd, own)
    unexpected = sorted(sd.keys() - own.keys())
    missing = report.sort_missing(sorted(own.keys() - sd.keys() - {*report.new_task_init}), own)
    if strict:
        _check_strict(path, task, missing, unexpected)
    _check_tied(path, sd, model)
    if missing or unexpected:
        log.warning(
            "%s: %d missing keys kept at init %s; %d unexpected keys ignored %s",
            path,
            len(missing),
            convert.list_keys(missing, 5),
            len(unexpected),
            convert.list_keys(unexpected, 5),
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
