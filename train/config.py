"""The training config's schema: every key ``blip-fast train`` reads, its type and its range.

A config is checked whole before anything is built, so a typo (``batch_size_trian``), a value of
the wrong type or out of range is an error naming the key, the value and where it came from (the
YAML file or a ``key=value`` override), not a default silently used or a failure deep inside
torch. Official BLIP keys that training itself does not use (``laion_path``, ``batch_size_test``,
``k_test``, ``coco_gt_root``, the caption decoding settings) are accepted, so the official YAML
files load unchanged.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

from blip_fast.models.configs import list_configs

__all__ = ["ConfigError", "validate_config"]

ALL_TASKS = frozenset({"pretrain", "retrieval", "caption", "nlvr", "vqa"})
CONTRASTIVE = frozenset({"pretrain", "retrieval"})
TEXT_GENERATING = frozenset({"pretrain", "retrieval", "caption"})  # models with an LM decoder


class ConfigError(ValueError):
    """A training config key that is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class Key:
    check: Callable[[object], str | None]  # None when the value is fine, else what is wrong
    tasks: frozenset = ALL_TASKS


def _int(low: int):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return f"expected an integer, got {type(v).__name__}"
        return None if v >= low else f"must be >= {low}"

    return check


def _float(low: float, high: float = math.inf, *, open_low=False, open_high=False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"expected a number, got {type(v).__name__}"
        if not math.isfinite(v):
            return "must be finite"
        below = v <= low if open_low else v < low
        above = v >= high if open_high else v > high
        if below or above:
            return f"must be in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        return None

    return check


def _bool(v):
    return None if isinstance(v, bool) else f"expected true or false, got {type(v).__name__}"


def _str(v):
    return None if isinstance(v, str) and v else f"expected a non-empty string, got {v!r}"


def _optional_str(v):
    return None if v is None or v == "" else _str(v)


def _paths(v):
    """One path (or glob / brace range) or a non-empty list of them."""
    if isinstance(v, list) and v:
        bad = [p for p in v if _str(p) is not None]
        return f"list entries must be non-empty strings, got {bad[0]!r}" if bad else None
    return _str(v) if not isinstance(v, list) else "expected a path or a non-empty list of paths"


def _choice(*options):
    def check(v):
        return None if v in options else f"expected one of {list(options)}"

    return check


def _preset(v):
    names = list_configs()
    return None if v in names else f"unknown preset; known: {names}"


POSITIVE = _int(1)
NON_NEGATIVE = _int(0)
LR = _float(0.0, open_low=True)
RATE = _float(0.0, 1.0)

SCHEMA: dict[str, Key] = {
    # data
    "train_file": Key(_paths),
    "train_shards": Key(_paths, frozenset({"pretrain"})),
    "image_root": Key(_str),
    "ann_root": Key(_str, frozenset({"retrieval", "caption", "nlvr", "vqa"})),
    "train_files": Key(_paths, frozenset({"vqa"})),  # official: names of JSONs in ann_root
    "vqa_root": Key(_str, frozenset({"vqa"})),
    "vg_root": Key(_str, frozenset({"vqa"})),
    "dataset": Key(_choice("flickr", "coco"), frozenset({"retrieval", "caption"})),
    "laion_path": Key(_optional_str, frozenset({"pretrain"})),  # official, unused
    "coco_gt_root": Key(_str, frozenset({"caption"})),  # official caption eval, unused here
    "min_scale": Key(_float(0.0, 1.0, open_low=True)),
    "train_augment": Key(_bool),
    "output_dir": Key(_str),
    # model
    "model": Key(_preset),
    "vit": Key(_choice("base", "large")),
    "image_size": Key(_int(16)),
    "vit_grad_ckpt": Key(_bool),
    "vit_ckpt_layer": Key(NON_NEGATIVE),
    "pretrained": Key(_optional_str),
    "queue_size": Key(POSITIVE, CONTRASTIVE),
    "alpha": Key(RATE, CONTRASTIVE),
    "negative_all_rank": Key(_bool, frozenset({"retrieval"})),
    "momentum": Key(_float(0.0, 1.0, open_high=True), CONTRASTIVE),
    "embed_dim": Key(POSITIVE, CONTRASTIVE),
    "prompt": Key(lambda v: None if isinstance(v, str) else "expected a string", TEXT_GENERATING),
    "label_smoothing": Key(_float(0.0, 1.0, open_high=True), TEXT_GENERATING),
    # optimisation
    "batch_size": Key(POSITIVE),
    "batch_size_train": Key(POSITIVE),
    "batch_size_test": Key(POSITIVE),  # official, evaluation only
    "init_lr": Key(LR),
    "min_lr": Key(_float(0.0)),
    "warmup_lr": Key(_float(0.0), frozenset({"pretrain"})),
    "warmup_steps": Key(NON_NEGATIVE, frozenset({"pretrain"})),
    "lr_decay_rate": Key(_float(0.0, 1.0, open_low=True), frozenset({"pretrain"})),
    "weight_decay": Key(_float(0.0)),
    "max_epoch": Key(POSITIVE),
    "itc_warmup_steps": Key(NON_NEGATIVE, CONTRASTIVE),
    "image_token_drop": Key(_float(0.0, 1.0, open_high=True), frozenset({"pretrain"})),
    # official evaluation / decoding keys, read by evaluation, not by training
    "k_test": Key(POSITIVE, frozenset({"retrieval", "vqa"})),
    "inference": Key(_choice("rank", "generate"), frozenset({"vqa"})),
    "max_length": Key(POSITIVE, frozenset({"caption"})),
    "min_length": Key(NON_NEGATIVE, frozenset({"caption"})),
    "num_beams": Key(POSITIVE, frozenset({"caption"})),
}


def validate_config(task: str, y: dict, origins: dict[str, str] | None = None) -> None:
    """Raise ``ConfigError`` for the first bad key of ``y`` (a ``task`` config); ``origins``
    maps keys to where they were set ("pretrain.yaml", "override batch_size=8"), for messages.
    """
    origins = origins or {}
    known = sorted(k for k, key in SCHEMA.items() if task in key.tasks)
    for name, value in y.items():
        where = origins.get(name, "config")
        key = SCHEMA.get(name)
        if key is None or task not in key.tasks:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            other = f" (a key of {sorted(key.tasks)} configs)" if key else ""
            raise ConfigError(f"{where}: unknown key {name!r} for {task}{other}{hint}")
        problem = key.check(value)
        if problem:
            raise ConfigError(f"{where}: {name}: {value!r}: {problem}")
