"""Fused ops for MViT's pooling attention.

Each op has the signature of its plain-PyTorch reference in :mod:`mvit_kernels.reference` and is
checked against it in the tests:

- :func:`pool3d` (C++/CUDA): pooling of attention tensors with fused LayerNorm.
- :func:`pool_residual_add` (C++/CUDA): the block's max-pooled skip fused with the residual add.
- :func:`pooling_attention`: attention over pooled q, k, v with MViTv2's decomposed
  rel-pos bias and residual pooling (Triton on CUDA, SDPA elsewhere).
- :func:`pooled_projection`: one q/k/v slice of the qkv projection, pooled and normalized, in
  one Triton pass where pooling strides are large (projection + pool3d elsewhere).
- :func:`linear`: projection (+ GELU) with bias and activation fused into oneDNN's matmul for
  CPU inference; :func:`mlp`, the block's MLP on it, in token chunks where the hidden activation
  is large.

:mod:`mvit_kernels.tuning` times a fused op against its alternative once per shape (on CUDA by
default) and runs the faster one.
"""

from . import reference, tuning
from ._extension import has_cuda_kernels
from ._extension import load as load_extension
from .linear import linear, mlp
from .pool3d import pool3d
from .pool_residual_add import pool_residual_add
from .pooled_projection import pooled_projection
from .pooling_attention import pooling_attention


def require_fused() -> None:
    """Raise a clear error if the fused ops cannot run here (extension not built)."""
    from ._extension import require

    require()


__all__ = [
    "reference",
    "tuning",
    "pool3d",
    "pool_residual_add",
    "pooling_attention",
    "pooled_projection",
    "linear",
    "mlp",
    "require_fused",
    "load_extension",
    "has_cuda_kernels",
]
