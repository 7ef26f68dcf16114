"""The only Python handle on the ``blip_fast`` op namespace (torchao's split: schemas live here,
C++ in ``csrc/torch_bindings.cpp`` only registers kernels for them)."""

import torch

lib = torch.library.Library("blip_fast", "FRAGMENT")
