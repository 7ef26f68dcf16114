"""The only Python handle on the ``blip_fast`` op namespace (torchao's split: schemas live here,
C++ in ``csrc/torch_bindings.cpp`` only registers kernels for them)."""

import torch

lib = torch.library.Library("blip_fast", "FRAGMENT")


def register_family(fwd: str, bwd: str, *, fwd_fake, bwd_fake, backward, setup_context):
    """Fakes for an op's forward and backward ops, and the forward's autograd through the
    backward op, which itself has no backward (double backward raises, naming the op).
    ``backward(ctx, grad, *aux_grads)`` gets the first output's gradient, never None (inputs get
    None when it is undefined); the auxiliary outputs' gradients are None, not zero tensors."""

    def no_double_backward(ctx, *grads):
        raise NotImplementedError(
            f"blip_fast::{bwd} has no backward: double backward through it is not supported"
        )

    torch.library.register_fake(f"blip_fast::{fwd}", fwd_fake, lib=lib)
    torch.library.register_fake(f"blip_fast::{bwd}", bwd_fake, lib=lib)

    def setup_without_zero_grads(ctx, inputs, output):
        # ``backward`` reads only the first output's gradient: autograd must not build zero
        # gradients for the auxiliary outputs (an LM head's d_weight is vocab x hidden)
        ctx.set_materialize_grads(False)
        ctx.num_inputs = len(inputs)
        setup_context(ctx, inputs, output)

    def backward_or_none(ctx, grad, *aux_grads):
        if grad is None:  # the result's gradient is undefined: so are the inputs'
            return (None,) * ctx.num_inputs
        return backward(ctx, grad, *aux_grads)

    torch.library.register_autograd(
        f"blip_fast::{fwd}", backward_or_none, setup_context=setup_without_zero_grads, lib=lib
    )
    torch.library.register_autograd(
        f"blip_fast::{bwd}",
        no_double_backward,
        setup_context=lambda ctx, inputs, output: None,
        lib=lib,
    )
