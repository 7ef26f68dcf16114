"""BLIP models: ViT, MED (BERT with text / multimodal / decoder modes) and the task heads."""

from blip_fast.models.blip_caption import BlipCaption
from blip_fast.models.blip_nlvr import BlipNLVR
from blip_fast.models.blip_pretrain import BlipPretrain
from blip_fast.models.blip_retrieval import BlipRetrieval
from blip_fast.models.blip_vqa import BlipVQA
from blip_fast.models.configs import BlipConfig, TextConfig, VisionConfig
from blip_fast.models.factory import TASKS, create_model, list_models

__all__ = [
    "BlipCaption",
    "BlipNLVR",
    "BlipPretrain",
    "BlipRetrieval",
    "BlipVQA",
    "BlipConfig",
    "TextConfig",
    "VisionConfig",
    "TASKS",
    "create_model",
    "list_models",
]
