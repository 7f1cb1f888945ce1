"""When a fused op may take its plain eager fast path (shared by the ops that have one)."""

from __future__ import annotations

import torch
from torch import Tensor


def intercepted(t: Tensor) -> bool:
    """True when a dispatch mode (FlopCounterMode, fake tensors) must see every op, a torch.func
    transform is active (:func:`in_functorch_transform`), torch.jit.trace is recording (it cannot
    record the oneDNN linear's Scalar? list), or t is not a plain CPU/CUDA tensor (meta,
    subclasses)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (_get_current_dispatch_mode() is not None or in_functorch_transform() or torch.jit.is_tracing()
            or type(t) is not torch.Tensor or t.device.type not in ("cuda", "cpu"))


def in_functorch_transform() -> bool:
    """True inside a torch.func transform (grad, vjp, jacrev, vmap, ...), eager or traced by
    torch.compile (Dynamo reads the transform stack as it traces). The fused ops' kernels cannot
    run there: their autograd (the eager Functions and torch.library's registered one alike) has
    no setup_context, which torch.func requires, and the C++/Triton ops have no batching rules.
    The fused ops then run their references, plain torch ops, which have both."""
    return torch._C._are_functorch_transforms_active()


def needs_grad(values) -> bool:
    """Whether autograd records a call on ``values``: grad mode is on and a tensor among them
    requires grad (None and other values are skipped)."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in values)


def traced_or_intercepted(t: Tensor) -> bool:
    """True when the call must go through registered ops or plain torch ops: torch.compile is
    tracing, or :func:`intercepted`."""
    return torch.compiler.is_compiling() or intercepted(t)


def cached_constant(cache: dict, key, build):
    """cache[key], built by build() on first use outside inference mode: a tensor made under
    torch.inference_mode() is an inference tensor, which a later training call could not save
    for backward ("Inference tensors cannot be saved for backward")."""
    value = cache.get(key)
    if value is None:
        with torch.inference_mode(False):
            value = cache[key] = build()
    return value
