"""The only Python handle on the ``blip_fast`` op namespace (torchao's split: schemas live here,
C++ in ``csrc/torch_bindings.cpp`` only registers kernels for them)."""

import torch

lib = torch.library.Library("blip_fast", "FRAGMENT")


def register_family(fwd: str, bwd: str, *, fwd_fake, bwd_fake, backward, setup_context):
    """Fakes for an op's forward and backward ops, and the forward's autograd through the
    backward op, which itself has no backward (double backward raises, naming the op)."""

    def no_double_backward(ctx, *grads):
        raise NotImplementedError(
            f"blip_fast::{bwd} has no backward: double backward through it is not supported"
        )

    torch.library.register_fake(f"blip_fast::{fwd}", fwd_fake, lib=lib)
    torch.library.register_fake(f"blip_fast::{bwd}", bwd_fake, lib=lib)
    torch.library.register_autograd(
        f"blip_fast::{fwd}", backward, setup_context=setup_context, lib=lib
    )
    torch.library.register_autograd(
        f"blip_fast::{bwd}",
        no_double_backward,
        setup_context=lambda ctx, inputs, output: None,
        lib=lib,
    )
