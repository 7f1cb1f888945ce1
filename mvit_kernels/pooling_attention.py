"""Pooling attention, fused path.

softmax(q k^T d^-1/2 + rel-pos bias) v (+ q), merged to (B, N_q, heads*d). On CPU tensors (and
on CUDA where the Triton kernel does not apply) this runs
``torch.nn.functional.scaled_dot_product_attention``: the decomposed rel-pos bias is passed as
an additive mask, so the score matrix is formed inside SDPA's kernel rather than by separate
matmul/softmax ops.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import reference
from .checks import check_attention_args


def _sdpa_pooling_attention(q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling):
    B, heads, n_q, d = q.shape
    mask = None
    if rel_pos_t is not None or rel_pos_h is not None:
        bias = reference.decomposed_rel_pos(q, thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
        if has_cls:
            # The class token's row and column get no positional bias.
            bias = F.pad(bias, (1, 0, 1, 0))
        mask = bias
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if residual_pooling:
        if has_cls:
            out = torch.cat((out[:, :, :1], out[:, :, 1:] + q[:, :, 1:]), dim=2)
        else:
            out = out + q
    return out.transpose(1, 2).reshape(B, n_q, heads * d)


def pooling_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    thw_q: Sequence[int],
    thw_kv: Sequence[int],
    has_cls: bool = True,
    rel_pos_t: Optional[torch.Tensor] = None,
    rel_pos_h: Optional[torch.Tensor] = None,
    rel_pos_w: Optional[torch.Tensor] = None,
    residual_pooling: bool = False,
) -> torch.Tensor:
    """Same contract as :func:`mvit_kernels.reference.pooling_attention`."""
    thw_q, thw_kv = check_attention_args(q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w)
    return _sdpa_pooling_attention(q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling)
