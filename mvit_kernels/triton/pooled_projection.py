"""Triton kernel for the pooled Q/K/V projection: one slice (q, k or v) of the qkv Linear, pooled
over the token grid (depthwise conv | avg | max) and LayerNorm-ed over d, in one pass.

Why: at MViT-B's first block K and V are pooled with kernel 3x3x3, stride (1,8,8), padding 1, so
only 9 of every 64 spatial positions are read by any window; projecting every token (and writing
then re-reading the projected k/v) spends most of the work on tokens nobody reads.

Design: one program per (tile of BLOCK_M pooled output rows, batch*head). For every kernel tap
(kt, kh, kw) it computes the input token each output row reads (masked where the tap falls in the
padding), gathers those rows of x in BLOCK_K-wide chunks of C, and ``tl.dot``s them with the
head's (C x d) slice of W (d padded to a power of two >= 16 with masks: head_dim 96 -> 128). It
adds the bias (valid taps only: padding is zero *after* the projection in the reference) and
combines into one fp32 accumulator: conv ``+= pool_weight[c, tap] * proj``; avg ``+= proj``,
divided by the kernel volume at the end (count_include_pad=True); max a running maximum over the
valid taps (every window has at least one: padding <= kernel // 2). LayerNorm over the d valid
channels runs on chip, and the tile is stored to y (B, heads, N_out, d). The class token is row 0
of the output: a row whose only valid tap is the first, reading token 0 with coefficient 1 and no
averaging, so it gets its own projection + bias and the same LayerNorm in the same loop. Tokens no
window reads are never loaded or projected; the projected k/v never touch memory.

Trade-off: overlapping windows are recomputed. Each output projects prod(kernel) tokens, so the
recompute factor is prod(kernel) * N_out / N_grid projections per grid token (0.42 at stride
(1,8,8) with kernel 3, 1.69 at (1,4,4), 6.75 at (1,2,2), 27 at stride 1). The projection at MViT's
early blocks is memory-bound (C = 96..192 inputs against A = 96..192 outputs per token), so
writing the projected k/v and reading it back for a second pooling pass costs more than a modest
recompute: the byte/FLOP model (``bench/bench_attention.py``, ``attention_model.md``, H100, MViT-B
16x4) puts the fused pass at 1.7 us against 8.1 us for block 0 (1x8x8), 7.9 against 16.5 for
block 1 and 2.0 against 4.2 for block 2 (1x4x4, recompute 1.69), and behind from 1x2x2 on (31.6
against 9.0 at block 3). :func:`use_fused_projection` takes that crossover: recompute <= 2.

Backward (``pooled_projection_bwd_kernel``, every mode): the same tiling; each program recomputes
its tile's pooled value by the same tap loop (the forward stores nothing extra; for max the loop
also records which tap each output took, torch's first-maximum rule), runs the LayerNorm backward
on chip, then loops over the taps again: d proj = coefficient * d pooled on valid taps (max: d
pooled on the tap taken, zero elsewhere), and dW (d proj^T x), dx (d proj W), d bias, d
pool_weight (conv: the projection recomputed in the same C loop) and the LayerNorm parameters'
per-tile sums go to zeroed fp32 buffers with ``tl.atomic_add`` (windows overlap and heads share x
rows), cast to the inputs' dtypes by the launcher. The dots take d proj in the inputs' dtype.

Precision: fp32 accumulation for every dtype; fp32 inputs use IEEE dots when torch's TF32 switch
is off on CUDA, tf32 otherwise (``dot_precision``, shared with the attention kernels). The
interpreter computes every tl.dot in fp32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..checks import pool_output_size, pool_output_thw
from .pooling_attention import (D_PADS, DTYPES, MMA_SYNC_RULES, _check_last_dim, _check_rule, _dummy, _head_tile,
                                device_cc, dot_precision, head_dim_constexpr, next_pow2)

MODES = ("conv", "avg", "max")
#: The fused kernel is picked up to this recompute factor: the byte/FLOP model's crossover at
#: MViT's shapes (see the module docstring).
MAX_RECOMPUTE = 2.0


@triton.jit
def _output_rows(offs_m, N_OUT, HO, WO, HAS_CLS: tl.constexpr):
    """The tile's output rows: (row_ok, is_cls, grid_row, ot, oh, ow), the class token being row 0
    when present and (ot, oh, ow) the pooled grid coordinates of the others."""
    row_ok = offs_m < N_OUT
    g = offs_m - HAS_CLS
    is_cls = (g < 0) & row_ok
    grid_row = (g >= 0) & row_ok
    g = tl.where(grid_row, g, 0)
    return row_ok, is_cls, grid_row, g // (HO * WO), (g // WO) % HO, g % WO


@triton.jit
def _tap_source(tap, ot, oh, ow, grid_row, is_cls, T, HH, WW, ST, SH, SW, PT, PH, PW_, KH, KW,
                HAS_CLS: tl.constexpr):
    """(valid, src): whether each row reads a token at this tap (not padding) and which one. The
    class token is valid at the first tap only, reading token 0."""
    ti = ot * ST - PT + tap // (KH * KW)
    hi = oh * SH - PH + (tap // KW) % KH
    wi = ow * SW - PW_ + tap % KW
    valid = grid_row & (ti >= 0) & (ti < T) & (hi >= 0) & (hi < HH) & (wi >= 0) & (wi < WW)
    valid = valid | (is_cls & (tap == 0))
    src = tl.where(valid & ~is_cls, HAS_CLS + (ti * HH + hi) * WW + wi, 0)
    return valid, src


@triton.jit
def _tap_coef(PW, offs_d, d_mask, tap, KV, is_cls):
    """The conv pooling weight of this tap per channel; 1 for the class token's row."""
    coef = tl.load(PW + offs_d * KV + tap, mask=d_mask, other=0.0).to(tl.float32)
    return tl.where(is_cls[:, None], 1.0, coef[None, :])


@triton.jit
def _project_rows(x_base, w_base, src, valid, offs_k, offs_d, d_mask, stride_xn, stride_wr, C,
                  BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """x[src] @ W_head^T for the valid rows (fp32, no bias), in BLOCK_K chunks of C."""
    proj = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < C
        xt = tl.load(x_base + src[:, None] * stride_xn + kk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_base + offs_d[None, :] * stride_wr + kk[:, None], mask=k_ok[:, None] & d_mask[None, :], other=0.0)
        proj = tl.dot(xt, wt, proj, input_precision=DOT_PRECISION)
    return proj


@triton.jit
def _head_bias(Bias, row0, offs_d, d_mask, HAS_BIAS: tl.constexpr):
    """The head's slice of the bias (fp32), zeros without one."""
    if HAS_BIAS:
        bias = tl.load(Bias + row0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros(offs_d.shape, dtype=tl.float32)
    return bias


@triton.jit
def _pool_taps(x_base, w_base, bias, PW, offs_k, offs_d, d_mask, ot, oh, ow, grid_row, is_cls, row_ok,
               stride_xn, stride_wr, C, T, HH, WW, ST, SH, SW, PT, PH, PW_, KT, KH, KW, inv_count,
               MODE: tl.constexpr, HAS_CLS: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(acc, arg): the pooled value before the LayerNorm (fp32, zero outside the tile's rows and
    channels), every tap's projection (+ bias on valid taps) combined by the pooling mode; and for
    mode max the tap each output took (int32; zeros in other modes, and unused by the forward).

    Max follows torch's max_pool3d: a later tap replaces the running maximum only when strictly
    greater (ties go to the first tap in (kt, kh, kw) order) or NaN (NaN propagates), so the
    backward routes each gradient to the element torch's own backward would."""
    KV = KT * KH * KW
    arg = tl.zeros([BLOCK_M, D_PAD], dtype=tl.int32)
    if MODE == "max":
        acc = tl.full([BLOCK_M, D_PAD], float("-inf"), dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for tap in range(KV):
        valid, src = _tap_source(tap, ot, oh, ow, grid_row, is_cls, T, HH, WW, ST, SH, SW, PT, PH, PW_, KH, KW, HAS_CLS)
        proj = _project_rows(x_base, w_base, src, valid, offs_k, offs_d, d_mask, stride_xn, stride_wr, C,
                             BLOCK_M, D_PAD, BLOCK_K, DOT_PRECISION)
        if HAS_BIAS:
            proj += bias[None, :]
        if MODE == "conv":
            acc += tl.where(valid[:, None], proj * _tap_coef(PW, offs_d, d_mask, tap, KV, is_cls), 0.0)
        elif MODE == "avg":
            acc += tl.where(valid[:, None], proj, 0.0)
        else:
            take = valid[:, None] & ((proj > acc) | (proj != proj))
            acc = tl.where(take, proj, acc)
            arg = tl.where(take, tap, arg)
    if MODE == "avg":
        acc = tl.where(is_cls[:, None], acc, acc * inv_count)
    return tl.where(row_ok[:, None] & d_mask[None, :], acc, 0.0), arg


@triton.jit
def pooled_projection_fwd_kernel(
    X, W, Bias, PW, NW, NB, Y,
    stride_xb, stride_xn, stride_wr,
    H, N_OUT, C, D, W_ROW0,
    T, HH, WW, HO, WO,
    ST, SH, SW, PT, PH, PW_, KT, KH, KW,
    inv_count, eps,
    MODE: tl.constexpr, HAS_CLS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr = 0,
):
    if HEAD_DIM:  # a head dim that is not a multiple of 16 (head_dim_constexpr)
        D = HEAD_DIM
    pid_bh, b, h, offs_m, offs_d, d_mask = _head_tile(H, D, BLOCK_M, D_PAD)
    row_ok, is_cls, grid_row, ot, oh, ow = _output_rows(offs_m, N_OUT, HO, WO, HAS_CLS)
    offs_k = tl.arange(0, BLOCK_K)
    x_base = X + b * stride_xb
    # W rows of this head: W_ROW0 + h*D + j (j < D), read transposed as a (BLOCK_K, D_PAD) tile.
    w_base = W + (W_ROW0 + h * D) * stride_wr
    bias = _head_bias(Bias, W_ROW0 + h * D, offs_d, d_mask, HAS_BIAS)
    acc, arg = _pool_taps(x_base, w_base, bias, PW, offs_k, offs_d, d_mask, ot, oh, ow, grid_row, is_cls, row_ok,
                          stride_xn, stride_wr, C, T, HH, WW, ST, SH, SW, PT, PH, PW_, KT, KH, KW, inv_count,
                          MODE, HAS_CLS, HAS_BIAS, BLOCK_M, D_PAD, BLOCK_K, DOT_PRECISION)
    if HAS_NORM:
        mean = tl.sum(acc, 1) / D
        diff = tl.where(d_mask[None, :], acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / D + eps)
        nw = tl.load(NW + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        nb = tl.load(NB + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        acc = diff * rstd[:, None] * nw[None, :] + nb[None, :]
    tl.store(
        Y + pid_bh * N_OUT * D + offs_m[:, None] * D + offs_d[None, :],
        acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :],
    )


@triton.jit
def pooled_projection_bwd_kernel(
    X, W, Bias, PW, NW, DY, DX, DW, DBias, DPW, DNW, DNB,
    stride_xb, stride_xn, stride_wr, stride_dxb,
    H, N_OUT, C, D, W_ROW0,
    T, HH, WW, HO, WO,
    ST, SH, SW, PT, PH, PW_, KT, KH, KW,
    inv_count, eps,
    MODE: tl.constexpr, HAS_CLS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr = 0,
):
    """Backward of every mode (see the module docstring). DX (B, N, C) contiguous, DW
    (3A, C), DBias (3A,), DPW (d, prod(kernel)), DNW and DNB (d,): fp32, zeroed by the launcher,
    accumulated with atomics."""
    if HEAD_DIM:  # a head dim that is not a multiple of 16 (head_dim_constexpr)
        D = HEAD_DIM
    pid_bh, b, h, offs_m, offs_d, d_mask = _head_tile(H, D, BLOCK_M, D_PAD)
    row_ok, is_cls, grid_row, ot, oh, ow = _output_rows(offs_m, N_OUT, HO, WO, HAS_CLS)
    offs_k = tl.arange(0, BLOCK_K)
    x_base = X + b * stride_xb
    dx_base = DX + b * stride_dxb
    w_base = W + (W_ROW0 + h * D) * stride_wr
    dw_base = DW + (W_ROW0 + h * D) * C
    KV = KT * KH * KW
    bias = _head_bias(Bias, W_ROW0 + h * D, offs_d, d_mask, HAS_BIAS)
    # 1. The forward up to the pooled value, before the LayerNorm (recomputed, nothing stored).
    acc, arg = _pool_taps(x_base, w_base, bias, PW, offs_k, offs_d, d_mask, ot, oh, ow, grid_row, is_cls, row_ok,
                          stride_xn, stride_wr, C, T, HH, WW, ST, SH, SW, PT, PH, PW_, KT, KH, KW, inv_count,
                          MODE, HAS_CLS, HAS_BIAS, BLOCK_M, D_PAD, BLOCK_K, DOT_PRECISION)
    out_mask = row_ok[:, None] & d_mask[None, :]
    dy = tl.load(DY + pid_bh * N_OUT * D + offs_m[:, None] * D + offs_d[None, :], mask=out_mask, other=0.0).to(tl.float32)
    # 2. LayerNorm backward on chip: d pooled, and this tile's share of the LN parameter grads.
    if HAS_NORM:
        mean = tl.sum(acc, 1) / D
        diff = tl.where(out_mask, acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / D + eps)
        xhat = diff * rstd[:, None]
        tl.atomic_add(DNW + offs_d, tl.sum(dy * xhat, 0), mask=d_mask)
        tl.atomic_add(DNB + offs_d, tl.sum(dy, 0), mask=d_mask)
        nw = tl.load(NW + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        gx = dy * nw[None, :]
        c1 = tl.sum(gx, 1) / D
        c2 = tl.sum(gx * xhat, 1) / D
        dpool = tl.where(out_mask, (gx - c1[:, None] - xhat * c2[:, None]) * rstd[:, None], 0.0)
    else:
        dpool = dy
    if MODE == "avg":
        dpool = tl.where(is_cls[:, None], dpool, dpool * inv_count)
    # 3. Back through the taps: d proj = coef * d pooled on valid taps, then bias, W and x grads
    # (conv: the pool weight's too, from the projection recomputed in the same C loop).
    for tap in range(KV):
        valid, src = _tap_source(tap, ot, oh, ow, grid_row, is_cls, T, HH, WW, ST, SH, SW, PT, PH, PW_, KH, KW, HAS_CLS)
        if MODE == "conv":
            dproj = tl.where(valid[:, None], dpool * _tap_coef(PW, offs_d, d_mask, tap, KV, is_cls), 0.0)
            proj = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        elif MODE == "avg":
            dproj = tl.where(valid[:, None], dpool, 0.0)
        else:  # max: only the tap each output took (arg is set on valid taps only)
            dproj = tl.where(arg == tap, dpool, 0.0)
        if HAS_BIAS:
            tl.atomic_add(DBias + W_ROW0 + h * D + offs_d, tl.sum(dproj, 0), mask=d_mask)
        dproj_lo = dproj.to(X.dtype.element_ty)
        for k0 in range(0, C, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < C
            xt = tl.load(x_base + src[:, None] * stride_xn + kk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_base + offs_d[None, :] * stride_wr + kk[:, None], mask=k_ok[:, None] & d_mask[None, :], other=0.0)
            if MODE == "conv":
                proj = tl.dot(xt, wt, proj, input_precision=DOT_PRECISION)
            # dW^T chunk (BLOCK_K, D_PAD) = x^T d proj; dx chunk (BLOCK_M, BLOCK_K) = d proj W.
            dwt = tl.dot(tl.trans(xt), dproj_lo, input_precision=DOT_PRECISION)
            tl.atomic_add(dw_base + offs_d[None, :] * C + kk[:, None], dwt, mask=k_ok[:, None] & d_mask[None, :])
            dxt = tl.dot(dproj_lo, tl.trans(wt), input_precision=DOT_PRECISION)
            tl.atomic_add(dx_base + src[:, None] * C + kk[None, :], dxt, mask=valid[:, None] & k_ok[None, :])
        if MODE == "conv":
            proj += bias[None, :]  # zero without a bias
            keep = valid & ~is_cls
            tl.atomic_add(DPW + offs_d * KV + tap, tl.sum(tl.where(keep[:, None], proj * dpool, 0.0), 0), mask=d_mask)

# ---------------------------------------------------------------------------------------------
# Host side: dispatch rule, configuration rule, FLOP count and launcher (no autograd here).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
    block_m: int  # pooled output rows per tile
    block_k: int  # input channels per x/W chunk
    num_warps: int
    num_stages: int


def select_config(dtype: torch.dtype, d_pad: int, cc: int = 90, precision: str = "tf32") -> ProjectionConfig:
    """The one rule that picks tiles, by dtype, padded head dim, compute capability and dot
    precision (no autotune: the interpreter cannot run it, and the AOT test compiles exactly what
    this returns for each rule's target, sm_80, sm_86 and sm_90; the interpreter uses the sm_90
    rule; ``cc`` names the rule, see ``pooling_attention.RULES``).

    Each program holds two (BLOCK_M, D_PAD) fp32 tiles in registers (the accumulator and one
    tap's projection) plus the x and W chunks: 64 rows over 4 warps to head 64, 8 warps at head
    128 (96 padded). fp32 inputs halve the rows. IEEE fp32 dots are FMA loops that keep whole
    operand tiles in registers: 16-row, 16-channel chunks, as the attention kernels found.
    """
    if d_pad not in D_PADS:
        raise ValueError(f"d_pad must be one of {D_PADS}, got {d_pad}")
    _check_rule(cc)
    if precision == "ieee":
        return ProjectionConfig(16, 16, 4, 1)
    warps = 8 if d_pad >= 128 else 4
    if dtype == torch.float32:
        return ProjectionConfig(32, 32, warps, 2)
    return ProjectionConfig(64, 32, warps, 2)


def select_bwd_config(dtype: torch.dtype, d_pad: int, cc: int = 90, precision: str = "tf32",
                      mode: str = "conv", aligned: bool = True) -> ProjectionConfig:
    """Tiles of :func:`pooled_projection_bwd_kernel`, the same kind of rule as
    :func:`select_config`, also by pooling mode (a constexpr: each mode is its own kernel). A
    program holds more fp32 tiles than the forward's (the pre-norm accumulator then d pooled,
    conv's recomputed projection, a (BLOCK_K, D_PAD) dW chunk and a (BLOCK_M, BLOCK_K) dx chunk),
    and its atomics are per element whatever the tile, so it takes 32 rows for every dtype (half
    the forward's for 16-bit inputs), 16 for IEEE fp32, and 8 warps from head 64 (4 warps there
    reached 255 registers and spilled with fp32 conv); fp32 inputs take 16-channel chunks (32
    spilled at head 64 on sm_80).

    The rule holds for Triton 3.6 (the lent GPU machines' release), 3.8 and 3.9, whose register
    allocations differ: 16-bit inputs at head 32 on sm_80 take 16-channel chunks (32 put 16-24 B
    on the stack under 3.6), and IEEE fp32 at head 128 in modes avg and max takes two pipeline
    stages (one stage put 24 B on the sm_90 stack under 3.6 and 430-460 B under 3.9; 32-channel
    chunks spilled 600-720 B under 3.9). Conv at head 128 is narrower still (below): those
    figures came from compiles without MViT's channel counts specialized, and with them (as the
    GPU runs them; the AOT check now compiles that case) the 32-row conv tiles spilled. The
    conv rows below were checked under 3.6 and 3.8 only. A head dim that is no multiple of 16
    (``aligned`` False; MViTv2-L's 72, compiled in as a constant) takes three stages for IEEE fp32
    avg and max at head 128 on sm_90: two put 32 B on the stack under 3.6 (three: none under 3.6
    and 3.8)."""
    if d_pad not in D_PADS:
        raise ValueError(f"d_pad must be one of {D_PADS}, got {d_pad}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_rule(cc)
    # conv at head 128 with MViT's channels (multiples of 16, which Triton specializes): 32 rows
    # put 450-610 B on the stack on every target under Triton 3.6 and on sm_90 under 3.8, with 16-
    # or 32-channel chunks; 16 rows and 32-channel chunks spill nothing. IEEE fp32 conv spilled
    # 24-56 B on sm_90 with one stage; stages per target are the counts free of stack use there
    # under 3.8 (and 3.6, but for sm_80, where one stage leaves 32 B there and any other count
    # spills under 3.8). With channels that are no multiple of 16 (no MViT's) the 2-3 stages of
    # IEEE conv at head 128 spill 170-210 B instead; no count is clean for both, MViT's win.
    if precision == "ieee":
        if mode == "conv":
            stages = ({90: 3, 86: 3}.get(cc, 1) if d_pad >= 128 else 2 if (cc == 90 and d_pad >= 64) else 1)
        elif not aligned and d_pad >= 128 and cc == 90:
            stages = 3
        else:  # sm_80: two stages put 24 B on the stack under 3.6 with MViT's channels, one none
            stages = 2 if (d_pad >= 128 and cc != 80) else 1
        return ProjectionConfig(16, 16, 4, stages)
    warps = 8 if d_pad >= 64 else 4
    if mode == "conv" and d_pad >= 128:
        return ProjectionConfig(16, 32, warps, 1)
    if dtype == torch.float32:
        return ProjectionConfig(32, 16, warps, 1)
    return ProjectionConfig(32, 16 if (cc in MMA_SYNC_RULES and d_pad == 32) else 32, warps, 1)


def recompute_factor(kernel: Sequence[int], stride: Sequence[int], thw: Sequence[int], padding: Optional[Sequence[int]] = None) -> float:
    """Projections per grid token the fused kernel does: prod(kernel) * N_out / N_grid. Without
    padding given, the usual MViT padding kernel // 2."""
    if padding is None:
        padding = [k // 2 for k in kernel]
    return math.prod(kernel) * math.prod(pool_output_thw(thw, kernel, stride, padding)) / math.prod(thw)


def use_fused_projection(kernel: Sequence[int], stride: Sequence[int], thw: Sequence[int], padding: Optional[Sequence[int]] = None) -> bool:
    """The dispatch rule: the fused kernel where its recompute factor is <= MAX_RECOMPUTE = 2, the
    byte/FLOP model's crossover: kernel 3 with stride (1,8,8) (0.42) and (1,4,4) (1.69), not
    (1,2,2) (6.75) or 1 (27). Elsewhere the caller projects once (cuBLAS) and pools."""
    return recompute_factor(kernel, stride, thw, padding) <= MAX_RECOMPUTE


def projected_rows(thw: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], has_cls: bool) -> int:
    """Rows the kernel projects per (batch, head): taps inside the grid summed over outputs (a
    product over axes, since a tap is inside iff it is inside on every axis), plus the class
    token."""
    rows = 1
    for size, k, s, p in zip(thw, kernel, stride, padding):
        rows *= sum(1 for o in range(pool_output_size(size, k, s, p)) for i in range(k) if 0 <= o * s - p + i < size)
    return rows + (1 if has_cls else 0)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """What the forward and backward launchers derive from the same arguments."""
    x: torch.Tensor  # last dim contiguous
    weight: torch.Tensor  # last dim contiguous
    A: int  # rows of one q/k/v slice of the weight
    D: int  # head dim
    h_out: int
    w_out: int
    n_out: int  # pooled rows, class token included
    d_pad: int
    precision: str
    cc: int


def _launch_geometry(x, weight, num_heads: int, thw, kernel, stride, padding, has_cls: bool) -> _Launch:
    x, weight = _check_last_dim(x), _check_last_dim(weight)
    A = weight.shape[0] // 3
    D = A // num_heads
    t_out, h_out, w_out = pool_output_thw(thw, kernel, stride, padding)
    return _Launch(x, weight, A, D, h_out, w_out, t_out * h_out * w_out + (1 if has_cls else 0), next_pow2(D),
                   dot_precision(x), device_cc(x))


def forward(x, weight, bias, which_index: int, num_heads: int, thw, kernel, stride, padding, mode: str,
            pool_weight, has_cls: bool, norm_weight, norm_bias, eps: float) -> torch.Tensor:
    """y (B, heads, N_out, d) contiguous, in x's dtype. Arguments already checked."""
    g = _launch_geometry(x, weight, num_heads, thw, kernel, stride, padding, has_cls)
    x, weight, D, n_out = g.x, g.weight, g.D, g.n_out
    B, N, C = x.shape
    cfg = select_config(x.dtype, g.d_pad, g.cc, g.precision)
    y = torch.empty(B, num_heads, n_out, D, device=x.device, dtype=x.dtype)
    dummy = _dummy(x.device, x.dtype)
    pw = pool_weight.contiguous() if mode == "conv" else dummy
    grid = (triton.cdiv(n_out, cfg.block_m), B * num_heads)
    pooled_projection_fwd_kernel[grid](
        x, weight, dummy if bias is None else bias.contiguous(), pw,
        dummy if norm_weight is None else norm_weight.contiguous(),
        dummy if norm_bias is None else norm_bias.contiguous(), y,
        x.stride(0), x.stride(1), weight.stride(0),
        num_heads, n_out, C, D, which_index * g.A,
        *thw, g.h_out, g.w_out, *stride, *padding, *kernel,
        1.0 / math.prod(kernel), float(eps),
        MODE=mode, HAS_CLS=bool(has_cls), HAS_BIAS=bias is not None, HAS_NORM=norm_weight is not None,
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, D_PAD=g.d_pad, DOT_PRECISION=g.precision,
        HEAD_DIM=head_dim_constexpr(D), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def backward(grad_y, x, weight, bias, which_index: int, num_heads: int, thw, kernel, stride, padding, mode: str,
             pool_weight, has_cls: bool, norm_weight, norm_bias, eps: float):
    """Gradients (dx, dweight, dbias, dpool_weight, dnorm_weight, dnorm_bias), None where the
    input is None (dpool_weight: mode conv only); dweight is the whole (3A, C) gradient, zero outside the
    slice's rows. Accumulated in fp32 (atomics), returned in each input's dtype."""
    g = _launch_geometry(x, weight, num_heads, thw, kernel, stride, padding, has_cls)
    x, weight, D, n_out = g.x, g.weight, g.D, g.n_out
    grad_y = grad_y.contiguous()
    B, N, C = x.shape
    cfg = select_bwd_config(x.dtype, g.d_pad, g.cc, g.precision, mode, aligned=D % 16 == 0)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.zeros(B, N, C, **f32)
    dw = torch.zeros(weight.shape[0], C, **f32)
    dummy = _dummy(x.device, x.dtype)
    dummy32 = _dummy(x.device, torch.float32)
    db = torch.zeros(weight.shape[0], **f32) if bias is not None else dummy32
    dpw = torch.zeros(D, math.prod(kernel), **f32) if mode == "conv" else dummy32
    dnw = torch.zeros(D, **f32) if norm_weight is not None else dummy32
    dnb = torch.zeros(D, **f32) if norm_weight is not None else dummy32
    grid = (triton.cdiv(n_out, cfg.block_m), B * num_heads)
    pooled_projection_bwd_kernel[grid](
        x, weight, dummy if bias is None else bias.contiguous(),
        pool_weight.contiguous() if mode == "conv" else dummy,
        dummy if norm_weight is None else norm_weight.contiguous(), grad_y,
        dx, dw, db, dpw, dnw, dnb,
        x.stride(0), x.stride(1), weight.stride(0), N * C,
        num_heads, n_out, C, D, which_index * g.A,
        *thw, g.h_out, g.w_out, *stride, *padding, *kernel,
        1.0 / math.prod(kernel), float(eps),
        MODE=mode, HAS_CLS=bool(has_cls), HAS_BIAS=bias is not None, HAS_NORM=norm_weight is not None,
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, D_PAD=g.d_pad, DOT_PRECISION=g.precision,
        HEAD_DIM=head_dim_constexpr(D), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (
        dx.to(x.dtype),
        dw.to(weight.dtype),
        None if bias is None else db.to(bias.dtype),
        None if mode != "conv" else dpw.view(pool_weight.shape).to(pool_weight.dtype),
        None if norm_weight is None else dnw.to(norm_weight.dtype),
        None if norm_bias is None else dnb.to(norm_bias.dtype),
    )
