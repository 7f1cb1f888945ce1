"""Plain-PyTorch reference implementations of every fused op.

These are the ground truth: ``MViT(fused=False)`` runs them, and every kernel is tested against
them. They are written for clarity, not speed; each follows the reference repositories
(pySlowFast ``attention_pool`` / ``cal_rel_pos_*``, torchvision ``Pool`` / ``_add_rel_pos``)
operation by operation.

Layouts:
- attention tensors: (B, heads, N, d) with N = T*H*W (+ 1 with a class token in front);
- token tensors: (B, N, C).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import autocast
from .checks import (
    PROJECTION_SLICES,
    check_attention_args,
    check_linear_args,
    check_mlp_args,
    check_pool3d_args,
    check_pool_residual_add_args,
    check_pooled_projection_args,
)


def pool3d(
    x: torch.Tensor,
    thw: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    mode: str,
    weight: Optional[torch.Tensor] = None,
    has_cls: bool = True,
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    contiguous_grid: bool = False,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Pool the token grid of every head, then LayerNorm over d.

    x: (B, heads, N, d). mode: "max", "avg" (count_include_pad=True, as AvgPool3d's default) or
    "conv" (depthwise Conv3d, weight (d, 1, kT, kH, kW) shared across heads, no bias). The class
    token is split off, passed through unpooled, concatenated back in front, and normalized with
    the rest. Returns (y (B, heads, N', d), thw_out).

    contiguous_grid changes speed only: the grid is pooled as a channels-last view of the tokens
    by default, or, when True, as a contiguous (B*heads, d, T, H, W) copy, torchvision's layout.
    On CUDA the two reach different kernels (cuDNN's channels-last depthwise convolution, PyTorch's
    native NCDHW one); which is faster depends on the shape, so the fused path times both.
    """
    thw, kernel, stride, padding = check_pool3d_args(
        x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight, norm_bias, eps
    )
    B, heads, _, d = x.shape
    if has_cls:
        cls_tok, tokens = x[:, :, :1], x[:, :, 1:]
    else:
        tokens = x
    grid = tokens.reshape(B * heads, *thw, d).permute(0, 4, 1, 2, 3)
    if contiguous_grid or (mode == "conv" and _cpu_bf16_conv_weight_grad(grid, weight)):
        grid = grid.contiguous()
    if mode == "max":
        pooled = F.max_pool3d(grid, kernel, stride, padding)
    elif mode == "avg":
        pooled = F.avg_pool3d(grid, kernel, stride, padding, count_include_pad=True)
    else:
        pooled = F.conv3d(grid, weight, None, stride, padding, groups=d)
    thw_out = tuple(int(s) for s in pooled.shape[2:])
    t, h, w = thw_out
    y = pooled.reshape(B, heads, d, t * h * w).transpose(2, 3)  # sizes spelled out: B may be 0
    if has_cls:
        y = torch.cat((cls_tok, y), dim=2)
    if norm_weight is not None:
        y = F.layer_norm(y, (d,), norm_weight, norm_bias, eps)
    return y, thw_out  # type: ignore[return-value]


def _cpu_bf16_conv_weight_grad(grid: torch.Tensor, weight: Optional[torch.Tensor]) -> bool:
    """Whether a depthwise conv3d of ``grid`` runs in bf16 on the CPU with a weight gradient to come.
    PyTorch's CPU bf16 conv3d backward (2.11 and 2.14 checked) leaves the weight gradient of taps that
    read only padding unwritten on the channels-last view (whatever memory held: 1e30s, NaNs); on a
    contiguous grid it is right, and slower (~3-15x in fp32 at MViT-B's shapes), so only then."""
    if grid.device.type != "cpu" or weight is None or not (weight.requires_grad and torch.is_grad_enabled()):
        return False
    if torch.is_autocast_enabled("cpu") and grid.dtype in (torch.float32, torch.bfloat16):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16  # autocast leaves float64 alone
    return grid.dtype == torch.bfloat16


def pooled_projection(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    which: str,
    num_heads: int,
    thw: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    mode: str,
    pool_weight: Optional[torch.Tensor] = None,
    has_cls: bool = True,
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One of q, k, v of an attention block, projected and pooled: the ``which`` slice of the qkv
    Linear (weight (3A, C), bias (3A,), rows [q | k | v]) applied to x (B, N, C), split into
    (B, heads, N, d) with d = A / heads, then :func:`pool3d` (pool_weight is its conv weight).
    Returns (y (B, heads, N', d), thw_out). Under autocast it computes in the autocast dtype
    (``mvit_kernels.autocast``), as the fused op does."""
    x, weight, bias, pool_weight, norm_weight, norm_bias = autocast.for_compute(
        x, weight, bias, pool_weight, norm_weight, norm_bias
    )
    check_pooled_projection_args(
        x, weight, bias, which, num_heads, thw, kernel, stride, padding, mode, pool_weight, has_cls, norm_weight,
        norm_bias, eps
    )
    B, N, _ = x.shape
    A = weight.shape[0] // 3
    rows = slice(PROJECTION_SLICES.index(which) * A, (PROJECTION_SLICES.index(which) + 1) * A)
    proj = F.linear(x, weight[rows], None if bias is None else bias[rows])
    heads = proj.reshape(B, N, num_heads, A // num_heads).transpose(1, 2)
    return pool3d(heads, thw, kernel, stride, padding, mode, pool_weight, has_cls, norm_weight, norm_bias, eps)


def pool_residual_add(
    x: torch.Tensor,
    thw: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    branch: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    has_cls: bool = True,
    contiguous_grid: bool = False,
) -> torch.Tensor:
    """The block's skip path and residual add: ``maxpool_skip(x) + scale * branch``.

    x: (B, N, C) tokens; branch: (B, N', C) on the pooled grid; scale: (B,) per-sample factor
    (the stochastic-depth mask divided by the keep probability) or None for 1. contiguous_grid:
    as :func:`pool3d`'s (speed only).
    """
    x, branch, scale = autocast.for_add(x, branch, scale)
    check_pool_residual_add_args(x, thw, kernel, stride, padding, branch, scale, has_cls)
    skip, _ = pool3d(x.unsqueeze(1), thw, kernel, stride, padding, "max", has_cls=has_cls,
                     contiguous_grid=contiguous_grid)
    skip = skip.squeeze(1)
    if scale is not None:
        branch = branch * scale.view(-1, 1, 1)
    return skip + branch


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, activation: Optional[str] = None
) -> torch.Tensor:
    """``F.linear`` followed by the activation (``"gelu"``, exact erf form, or None): the MLP's
    fc1 + GELU, and with no activation every other projection of the model."""
    if activation not in (None, "gelu"):
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    check_linear_args(x, weight, bias)
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y


def mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """The block's MLP: fc2(GELU(fc1(x)))."""
    check_mlp_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return linear(linear(x, fc1_weight, fc1_bias, "gelu"), fc2_weight, fc2_bias)


def interpolate_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Resize a (L, d) relative-position table to (length, d) by linear interpolation, as the
    reference code does when a block sees a grid other than the one it was built for."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.t().unsqueeze(0), size=length, mode="linear")
    return resized.squeeze(0).t()


def rel_pos_index(q_size: int, k_size: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """(q_size, k_size) indices into a table of length 2*max(q_size, k_size) - 1, built on
    ``device`` (a CPU tensor copied to a GPU would synchronize with it every call).

    When q and k grids differ, the coarser one's coordinates are scaled up so that both span
    the same extent (MViTv2, Sec. 3.1)."""
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    dist = torch.arange(q_size, device=device)[:, None] * q_ratio - torch.arange(k_size, device=device)[None, :] * k_ratio
    dist = dist + (k_size - 1) * k_ratio
    return dist.long()


def rel_pos_table_length(q_size: int, k_size: int) -> int:
    return 2 * max(q_size, k_size) - 1


def rel_pos_tables(
    thw_q: Sequence[int],
    thw_kv: Sequence[int],
    rel_pos_t: Optional[torch.Tensor],
    rel_pos_h: Optional[torch.Tensor],
    rel_pos_w: Optional[torch.Tensor],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Each axis' table interpolated to 2 max(Q_a, K_a) - 1 rows and indexed by the (query, key)
    coordinates' distance (:func:`rel_pos_index`): R_a (Q_a, K_a, d), None where there is no
    table."""
    out = []
    for axis, table in enumerate((rel_pos_t, rel_pos_h, rel_pos_w)):
        if table is not None:
            q_size, k_size = thw_q[axis], thw_kv[axis]
            table = interpolate_rel_pos(table, rel_pos_table_length(q_size, k_size))[
                rel_pos_index(q_size, k_size, table.device)
            ]
        out.append(table)
    return tuple(out)


def rel_pos_terms(
    q: torch.Tensor,
    thw_q: Sequence[int],
    thw_kv: Sequence[int],
    rel_pos_t: Optional[torch.Tensor],
    rel_pos_h: Optional[torch.Tensor],
    rel_pos_w: Optional[torch.Tensor],
    has_cls: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The three axes' terms of the MViTv2 bias, (rel_t, rel_h, rel_w) (None where there is no
    table): rel_a[b, n, qt, qh, qw, k] = q . R_a[q_a, k] for the query's coordinate q_a on axis a,
    each (B, heads, Tq, Hq, Wq, K_a)."""
    qt, qh, qw = thw_q
    B, heads, _, d = q.shape
    r_q = q[:, :, 1:] if has_cls else q
    r_q = r_q.reshape(B, heads, qt, qh, qw, d)
    Rt, Rh, Rw = rel_pos_tables(thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w)
    rel_t = rel_h = rel_w = None
    if Rh is not None:
        rel_h = torch.einsum("bythwc,hkc->bythwk", r_q, Rh)
        rel_w = torch.einsum("bythwc,wkc->bythwk", r_q, Rw)
    if Rt is not None:
        rel_t = torch.einsum("bythwc,tkc->bythwk", r_q, Rt)
    return rel_t, rel_h, rel_w


def decomposed_rel_pos(
    q: torch.Tensor,
    thw_q: Sequence[int],
    thw_kv: Sequence[int],
    rel_pos_t: Optional[torch.Tensor],
    rel_pos_h: Optional[torch.Tensor],
    rel_pos_w: Optional[torch.Tensor],
    has_cls: bool,
) -> torch.Tensor:
    """The MViTv2 bias added to the (unnormalized) attention logits between grid tokens.

    bias[b, n, (qt,qh,qw), (kt,kh,kw)] = q . Rt[qt,kt] + q . Rh[qh,kh] + q . Rw[qw,kw]
    with q the pooled (unscaled) query. Returns (B, heads, Tq*Hq*Wq, Tk*Hk*Wk).
    """
    qt, qh, qw = thw_q
    kt, kh, kw = thw_kv
    B, heads = q.shape[:2]
    rel_t, rel_h, rel_w = rel_pos_terms(q, thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    bias = q.new_zeros(B, heads, qt, qh, qw, kt, kh, kw)
    if rel_h is not None:
        bias = bias + rel_h[:, :, :, :, :, None, :, None] + rel_w[:, :, :, :, :, None, None, :]
    if rel_t is not None:
        bias = bias + rel_t[:, :, :, :, :, :, None, None]
    return bias.reshape(B, heads, qt * qh * qw, kt * kh * kw)


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
    """softmax(q k^T * d^-1/2 [+ decomposed rel-pos]) v [+ q], merged to (B, N_q, heads*d).

    q (B, heads, N_q, d), k and v (B, heads, N_kv, d), all already pooled and normalized.
    The residual pooling connection (MViTv2) adds q to every grid token's output; the class
    token's output is left as is (pySlowFast / torchvision ``residual_with_cls_embed=False``).
    """
    q, k, v, rel_pos_t, rel_pos_h, rel_pos_w = autocast.for_compute(q, k, v, rel_pos_t, rel_pos_h, rel_pos_w)
    thw_q, thw_kv = check_attention_args(
        q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling
    )
    B, heads, n_q, d = q.shape
    attn = (q * d**-0.5) @ k.transpose(-2, -1)
    if rel_pos_t is not None or rel_pos_h is not None:
        bias = decomposed_rel_pos(q, thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
        s = 1 if has_cls else 0
        attn = torch.cat((attn[:, :, :s], torch.cat((attn[:, :, s:, :s], attn[:, :, s:, s:] + bias), dim=3)), dim=2)
    attn = attn.softmax(dim=-1)
    out = attn @ v
    if residual_pooling:
        out = add_residual_pooling(out, q, has_cls)
    return out.transpose(1, 2).reshape(B, n_q, heads * d)


def add_residual_pooling(out: torch.Tensor, q: torch.Tensor, has_cls: bool) -> torch.Tensor:
    """MViTv2's residual pooling connection: + pooled q on every grid token's output; the class
    token's output is left as is (pySlowFast / torchvision ``residual_with_cls_embed=False``)."""
    if has_cls:
        return torch.cat((out[:, :, :1], out[:, :, 1:] + q[:, :, 1:]), dim=2)
    return out + q
