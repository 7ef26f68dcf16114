"""Model registry: task name -> class; configs from presets, JSON, YAML or a BlipConfig."""

from blip_fast.models.blip_caption import BlipCaption
from blip_fast.models.blip_nlvr import BlipNLVR
from blip_fast.models.blip_pretrain import BlipPretrain
from blip_fast.models.blip_retrieval import BlipRetrieval
from blip_fast.models.blip_vqa import BlipVQA
from blip_fast.models.configs import BlipConfig, list_configs

TASKS = {
    "retrieval": BlipRetrieval,
    "pretrain": BlipPretrain,
    "caption": BlipCaption,
    "nlvr": BlipNLVR,
    "vqa": BlipVQA,
}


def as_config(config) -> BlipConfig:
    """A BlipConfig from a BlipConfig, a preset name, or a .json / .yaml path."""
    if isinstance(config, BlipConfig):
        return config
    name = str(config)
    if name.endswith((".yaml", ".yml")):
        return BlipConfig.from_yaml(name)
    if name.endswith(".json"):
        return BlipConfig.from_json(name)
    return BlipConfig.preset(name)


def create_model(task: str, config="blip_base_vit_b16_384", backend=None):
    """Build a randomly initialised task model (``retrieval``, ``pretrain``, ``caption``,
    ``nlvr``, ``vqa``)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    return TASKS[task](as_config(config), backend=backend)


def list_models() -> list[str]:
    return list_configs()
