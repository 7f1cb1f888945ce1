"""Loading of the compiled extension ``mvit_kernels._C`` (C++/CUDA ops)."""

from __future__ import annotations

import importlib
from typing import Optional

_load_error: Optional[BaseException] = None
_loaded = False


def load() -> bool:
    """Import ``mvit_kernels._C`` once (registering its ops); False if it is not built."""
    global _loaded, _load_error
    if _loaded:
        return True
    if _load_error is not None:
        return False
    try:
        importlib.import_module("mvit_kernels._C")
    except ImportError as exc:  # not built, or built against another torch
        _load_error = exc
        return False
    _loaded = True
    return True


def require() -> None:
    if not load():
        raise RuntimeError(
            "mvit_kernels._C is not available, so fused=True cannot run. Build it with "
            f"`pip install -e .` (import failed with: {_load_error})"
        )


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA sources."""
    import torch

    return load() and bool(torch.ops.mvit_kernels.built_with_cuda())
