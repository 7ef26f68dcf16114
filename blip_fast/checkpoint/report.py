"""``LoadReport``: what ``load`` did with every key of the model (``model.load_report``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from blip_fast.models import convert

__all__ = ["LoadReport"]


def _kept_at_init(key: str) -> bool:
    """Queues, pointer and temperature keep the model's initial values when a checkpoint lacks
    them; position ids are the model's arange."""
    return bool(convert.TRAINING_STATE_KEY.match(key)) or key.endswith(".embeddings.position_ids")


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
    # Starting a task from another task's checkpoint (nlvr from pre-training / retrieval):
    # the new task's layers keep their initialisation, the other task's heads are dropped.
    new_task_init: list[str] = field(default_factory=list)
    other_task_dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # strict=False only
    unexpected: list[str] = field(default_factory=list)  # strict=False only

    def sort_missing(self, missing: list[str], model_keys) -> list[str]:
        """Record the model keys absent from the checkpoint that ``load`` fills itself and
        return the rest (truly missing). Momentum encoders are copied from the online ones
        (official ``copy_params``) only when all of them are absent: a partial set is missing."""
        momentum = [k for k in missing if convert.MOMENTUM_KEY.match(k)]
        if momentum and len(momentum) == sum(
            bool(convert.MOMENTUM_KEY.match(k)) for k in model_keys
        ):
            self.initialised_from_online = momentum
            missing = [k for k in missing if not convert.MOMENTUM_KEY.match(k)]
        self.kept_random = [k for k in missing if _kept_at_init(k)]
        return [k for k in missing if not _kept_at_init(k)]

    def __str__(self) -> str:
        parts = [
            f"{self.path} ({self.source_format}, task {self.task}, config from "
            f"{self.config_source}): {len(self.loaded)} loaded"
        ]
        for name in (
            "initialised_from_online",
            "kept_random",
            "interpolated",
            "new_task_init",
            "other_task_dropped",
            "missing",
            "unexpected",
        ):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{len(keys)} {name.replace('_', ' ')}")
        return ", ".join(parts)
