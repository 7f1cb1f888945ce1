"""How the ops treat ``torch.autocast``: one rule, used by the fused ops and the reference ops
(but ``reference.pool3d``, which stays the plain torch ops under autocast: its conv runs in the
autocast dtype and its LayerNorm, as autocast runs it, returns float32, where the fused op
returns the autocast dtype; the values agree within that dtype's rounding).

Autocast casts the inputs of the PyTorch ops it knows (matmul, conv to bf16; layer_norm to fp32),
so inside the reference model q, k and v can reach the attention in different dtypes (a pooled,
LayerNorm-ed k is fp32 while an unpooled q is bf16), and the residual stream (fp32) meets a bf16
branch. Custom ops are invisible to autocast, so each op applies this rule on entry:

- ``pool3d`` and ``pooling_attention`` compute in the autocast dtype, as autocast runs the conv
  and the matmuls they stand for: every floating input is cast to it, except float64, which
  autocast leaves alone (its eligible tensors are the floating ones of lower precision).
- ``pool_residual_add`` adds like ``+``: both sides are cast to their promoted dtype.

Outside autocast nothing is cast, and mixed dtypes are an error (``checks``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(t: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for t's device, or None when autocast is off there (or t is no tensor:
    the op's argument checks then name it)."""
    if not isinstance(t, Tensor):
        return None
    device_type = t.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _castable(t: Optional[Tensor], dtype: torch.dtype) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point() and t.dtype not in (dtype, torch.float64)


def cast_all(dtype: Optional[torch.dtype], *tensors: Optional[Tensor]) -> tuple:
    """tensors with every floating one but float64 cast to dtype (unchanged when dtype is None)."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if _castable(t, dtype) else t for t in tensors)


def for_compute(x: Tensor, *tensors: Optional[Tensor]) -> tuple:
    """(x, *tensors) cast to the autocast dtype when autocast is on (pool3d, pooling_attention)."""
    return cast_all(autocast_dtype(x), x, *tensors)


def for_add(x: Tensor, *tensors: Optional[Tensor]) -> tuple:
    """(x, *tensors) cast to their promoted dtype when autocast is on (pool_residual_add)."""
    if autocast_dtype(x) is None:
        return (x, *tensors)
    dtype = x.dtype
    for t in tensors:
        if isinstance(t, Tensor):
            dtype = torch.promote_types(dtype, t.dtype)
    return cast_all(dtype, x, *tensors)
