"""What the fused ops' backwards share: they are first-order only.

Their backwards are kernels (C++/CUDA, Triton) with no autograd of their own, so under
``create_graph=True`` a second backward through them would silently miss their second-order
terms (a gradient penalty, say). :func:`first_order_only` makes that second backward an error
that names the op; the reference ops (``fused=False``) are plain PyTorch and have every order.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._dispatch import needs_grad


def first_order_only(op_name: str):
    """Decorates a backward ``fn(ctx, *grads)`` (an autograd.Function's, or one given to
    ``register_autograd``). Like ``torch.autograd.function.once_differentiable``, which only
    looks at the incoming gradients: here the saved inputs count too, since a gradient penalty's
    incoming gradient is a constant while the op's input gradient depends on its inputs."""

    def decorate(fn):
        @functools.wraps(fn)
        def backward(ctx, *grads):
            with torch.no_grad():
                outputs = fn(ctx, *grads)
            # grad mode first: outside create_graph, ctx.saved_tensors is not read a second time
            # (under activation checkpointing it may be unpacked only once)
            if not torch.is_grad_enabled() or not (needs_grad(grads) or needs_grad(ctx.saved_tensors)):
                return outputs
            message = (f"{op_name}: the fused op has no double backward (a gradient of its gradient, "
                       "create_graph=True); run the reference ops (fused=False) for that")
            error = torch._C._functions.DelayedError(message.encode(), len(outputs))

            def differentiable(t):
                # DelayedError's outputs get its grad_fn only where an input requires grad.
                return t.detach().requires_grad_() if isinstance(t, Tensor) and t.is_floating_point() else t

            return error(*(differentiable(t) for t in outputs))

        return backward

    return decorate
