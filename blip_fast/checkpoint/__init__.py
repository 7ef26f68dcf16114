"""Load and save BLIP checkpoints: official ``.pth``, ``.safetensors`` (official or HF keys) and
HuggingFace model directories, with nothing silently dropped.

- ``reading``: files -> an official-key state dict, through ``torch.load(weights_only=True)``
  or safetensors only (a pickle that would run code is refused);
- ``formats``: a state dict's key layout, task and architecture (``BlipConfig``);
- ``loading``: ``load`` (build the model, fit the state dict to it, check, load);
- ``report``: ``LoadReport``, what ``load`` did with each key (``model.load_report``);
- ``saving``: ``save`` (official or HF layout) and ``convert_checkpoint``.
Key renaming between official and HF layouts is ``blip_fast.models.convert``.
"""

from blip_fast.checkpoint.errors import CheckpointError, UnsafeCheckpointError
from blip_fast.checkpoint.formats import infer_config, infer_task
from blip_fast.checkpoint.loading import load
from blip_fast.checkpoint.reading import read_state_dict
from blip_fast.checkpoint.report import LoadReport
from blip_fast.checkpoint.saving import convert_checkpoint, save

__all__ = [
    "CheckpointError",
    "LoadReport",
    "UnsafeCheckpointError",
    "convert_checkpoint",
    "infer_config",
    "infer_task",
    "load",
    "read_state_dict",
    "save",
]
