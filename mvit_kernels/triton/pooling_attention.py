"""Triton kernels for pooling attention: flash-style forward and backward with MViTv2's
decomposed relative-position bias and the residual pooling connection.

Layouts: q (B, heads, N_q, d), k/v (B, heads, N_kv, d), last dim contiguous; the output and its
gradient are (B, N_q, heads*d), the layout the output projection reads.

The rel-pos bias of grid query m against grid key n is rel_t[m, kt(n)] + rel_h[m, kh(n)] +
rel_w[m, kw(n)], with rel_a[m, j] = q[m] . R_a[idx_a[a(m), j]] (``reference.rel_pos_index``).
Each query row therefore needs only KT+KH+KW numbers ("rel", a few dozen), not N_kv. The kernels
keep them packed in one (BLOCK_M, R_PAD) tile, columns [0,KT) t, [KT,KT+KH) h, [KT+KH, ...) w, and
expand them to the (BLOCK_M, BLOCK_N) score tile with a single one-hot matrix product
rel @ onehot, onehot[j, n] = 1 where column j is one of key n's three coordinates. The same
one-hot product, transposed, reduces dS to the rel gradient in the backward. The score matrix and
the bias are never written to memory; only the log-sum-exp (and, when a gradient is needed, the
rel tile, R_PAD floats a row) are stored for the backward.

Class token (has_cls): row 0 and column 0 get no bias (their rel row / one-hot column is zero)
and row 0 gets no residual.

Softmax runs in base 2 (exp2 with log2(e) folded into the scale); ``lse`` is stored in base 2.

Precision on a GPU: the rel tile stays fp32 and its one-hot product runs as a tf32 tl.dot (the
one-hot side is exact, the rel values keep 10 mantissa bits, more than the bf16 the reference's
einsum produces under autocast). fp32 inputs with torch's TF32 switch off run every dot in IEEE
fp32 (``dot_precision``). The interpreter computes every tl.dot in fp32, so the CPU tests
check the algorithm, and tf32/bf16 rounding is left to the GPU benchmark's comparison.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _head_tile(H, D, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    """This program's (pid_bh, b, h, offs, offs_d, d_mask): the tile program_id(0) along the
    sequence and the (batch, head) program_id(1). pid_bh, b and h are int64 so the per-head base
    pointers cannot overflow (batch * tokens * channels passes 2^31 at large batches); the offsets
    inside one head stay int32 (registers)."""
    pid_bh = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    return pid_bh, pid_bh // H, pid_bh % H, offs, offs_d, offs_d < D


@triton.jit
def _query_coords(offs_m, N_Q, QH, QW, HAS_CLS: tl.constexpr):
    """(grid_row, qt, qh, qw): whether each query row is a grid token (not the class token, not
    past N_Q) and its grid coordinates (0 elsewhere)."""
    g = offs_m - HAS_CLS
    grid_row = (g >= 0) & (offs_m < N_Q)
    g = tl.where(grid_row, g, 0)
    return grid_row, g // (QH * QW), (g // QW) % QH, g % QW


@triton.jit
def _table_rows(R, IDX, coord, K, j, grid_row, offs_d, d_mask, D):
    """R[idx[coord, j]] per query row, (BLOCK_M, D_PAD) fp32, zero on the other rows."""
    ridx = tl.load(IDX + coord * K + j, mask=grid_row, other=0)
    mask = grid_row[:, None] & d_mask[None, :]
    return tl.load(R + ridx[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _rel_axis(rel, qf, R, IDX, coord, K, col0, grid_row, cols, offs_d, d_mask, D):
    """Columns [col0, col0 + K) of the rel tile: q . R[idx[coord, j]] for one axis."""
    for j in range(K):
        r = _table_rows(R, IDX, coord, K, j, grid_row, offs_d, d_mask, D)
        rel = tl.where(cols[None, :] == col0 + j, tl.sum(qf * r, 1)[:, None], rel)
    return rel


@triton.jit
def _rel_axis_grad(dq, drel, R, IDX, coord, K, col0, grid_row, cols, offs_d, d_mask, D):
    """dq += d rel[:, col0 + j] * R[idx[coord, j]] for one axis: the backward of _rel_axis."""
    for j in range(K):
        r = _table_rows(R, IDX, coord, K, j, grid_row, offs_d, d_mask, D)
        dq += tl.sum(tl.where(cols[None, :] == col0 + j, drel, 0.0), 1)[:, None] * r
    return dq


@triton.jit
def _rel_tile(
    q, R, IDX_T, IDX_H, IDX_W, offs_m, offs_d, d_mask, N_Q, D,
    QH, QW, KT, KH, KW,
    HAS_CLS: tl.constexpr, HAS_T: tl.constexpr, HAS_HW: tl.constexpr, BLOCK_M: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """rel[m, j] = q[m] . R[idx[a(m), j]] for the query tile (zero on class/out-of-range rows)."""
    grid_row, qt, qh, qw = _query_coords(offs_m, N_Q, QH, QW, HAS_CLS)
    cols = tl.arange(0, R_PAD)
    qf = q.to(tl.float32)
    rel = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    if HAS_T:
        rel = _rel_axis(rel, qf, R, IDX_T, qt, KT, 0, grid_row, cols, offs_d, d_mask, D)
    if HAS_HW:
        rel = _rel_axis(rel, qf, R, IDX_H, qh, KH, KT, grid_row, cols, offs_d, d_mask, D)
        rel = _rel_axis(rel, qf, R, IDX_W, qw, KW, KT + KH, grid_row, cols, offs_d, d_mask, D)
    return rel


@triton.jit
def _key_onehot(offs_n, N_KV, KT, KH, KW, HAS_CLS: tl.constexpr, R_PAD: tl.constexpr):
    """(R_PAD, BLOCK_N) float one-hot: 1 where rel column j is one of key n's coordinates."""
    g = offs_n - HAS_CLS
    ok = (g >= 0) & (offs_n < N_KV)
    g = tl.where(ok, g, 0)
    kt = g // (KH * KW)
    kh = (g // KW) % KH
    kw = g % KW
    cols = tl.arange(0, R_PAD)[:, None]
    hit = (cols == kt[None, :]) | (cols == KT + kh[None, :]) | (cols == KT + KH + kw[None, :])
    return tl.where(hit & ok[None, :], 1.0, 0.0).to(tl.float32)


@triton.jit
def pooling_attention_fwd_kernel(
    Q, K, V, R, IDX_T, IDX_H, IDX_W, Out, Lse, Rel, OAttn,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, N_Q, N_KV, D, sm_scale,
    QH, QW, KT, KH, KW,
    HAS_CLS: tl.constexpr, HAS_REL: tl.constexpr, HAS_T: tl.constexpr, HAS_HW: tl.constexpr,
    RESIDUAL: tl.constexpr, STORE_REL: tl.constexpr, STORE_OATTN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr = 0,
):
    if HEAD_DIM:  # a head dim that is not a multiple of 16 (head_dim_constexpr)
        D = HEAD_DIM
    pid_bh, b, h, offs_m, offs_d, d_mask = _head_tile(H, D, BLOCK_M, D_PAD)
    m_mask = offs_m < N_Q
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if HAS_REL:
        rel = _rel_tile(q, R, IDX_T, IDX_H, IDX_W, offs_m, offs_d, d_mask, N_Q, D, QH, QW, KT, KH, KW,
                        HAS_CLS, HAS_T, HAS_HW, BLOCK_M, R_PAD)
        if STORE_REL:
            cols = tl.arange(0, R_PAD)
            tl.store(Rel + pid_bh * N_Q * R_PAD + offs_m[:, None] * R_PAD + cols[None, :], rel, mask=m_mask[:, None])
        rel = rel * 1.4426950408889634
    qk_scale = sm_scale * 1.4426950408889634
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start_n in range(0, N_KV, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N_KV
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_REL:
            s += tl.dot(rel, _key_onehot(offs_n, N_KV, KT, KH, KW, HAS_CLS, R_PAD), input_precision=DOT_PRECISION)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    out_off = (b * N_Q * H + h) * D + offs_m[:, None] * (H * D) + offs_d[None, :]
    if STORE_OATTN:
        # The attention output before the residual: the backward's delta = rowsum(dO * O_attn)
        # from it, not from the stored sum minus q, which loses bits where |q| >> |O_attn|.
        tl.store(OAttn + out_off, out.to(OAttn.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    if RESIDUAL:
        grid_row = (offs_m - HAS_CLS) >= 0
        out += tl.where(grid_row[:, None], q.to(tl.float32), 0.0)
    tl.store(Out + out_off, out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(Lse + pid_bh * N_Q + offs_m, m_i + tl.log2(l_i), mask=m_mask)


@triton.jit
def pooling_attention_bwd_delta_kernel(
    DO, OA, Delta, H, N_Q, D,
    BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM: tl.constexpr = 0,
):
    """delta[b, h, m] = dO[b, m, h, :] . O_attn[b, m, h, :] in fp32, both in the (B, N_q, heads*d)
    layout: one pass over the two, instead of torch's casts, product, sum and transposed copy."""
    if HEAD_DIM:  # a head dim that is not a multiple of 16 (head_dim_constexpr)
        D = HEAD_DIM
    pid_bh, b, h, offs_m, offs_d, d_mask = _head_tile(H, D, BLOCK_M, D_PAD)
    m_mask = offs_m < N_Q
    mask = m_mask[:, None] & d_mask[None, :]
    off = (b * N_Q * H + h) * D + offs_m[:, None] * (H * D) + offs_d[None, :]
    do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
    oa = tl.load(OA + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh * N_Q + offs_m, tl.sum(do * oa, 1), mask=m_mask)


@triton.jit
def pooling_attention_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, Rel, DK, DV,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, N_Q, N_KV, D, sm_scale,
    KT, KH, KW, M_PER_SPLIT,
    HAS_CLS: tl.constexpr, HAS_REL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr = 0,
):
    """One program per (key tile, query split); loops over the split's query tiles. With one
    split DK/DV are the gradients; with several (long queries against few keys: MViT-B's first
    block has 7 key tiles per head and 25,089 queries) they are fp32 partials, one slab per
    split, summed by the launcher."""
    if HEAD_DIM:  # a head dim that is not a multiple of 16 (head_dim_constexpr)
        D = HEAD_DIM
    pid_s = tl.program_id(2)
    pid_bh, b, h, offs_n, offs_d, d_mask = _head_tile(H, D, BLOCK_N, D_PAD)
    n_mask = offs_n < N_KV
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    if HAS_REL:
        onehot = _key_onehot(offs_n, N_KV, KT, KH, KW, HAS_CLS, R_PAD)
        cols = tl.arange(0, R_PAD)
    qk_scale = sm_scale * 1.4426950408889634
    q_base = Q + b * stride_qb + h * stride_qh
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    m_begin = pid_s * M_PER_SPLIT
    m_end = tl.minimum(m_begin + M_PER_SPLIT, N_Q)
    for start_m in range(m_begin, m_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        qm_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=qm_mask, other=0.0)
        do = tl.load(DO + (b * N_Q * H + h) * D + offs_m[:, None] * (H * D) + offs_d[None, :], mask=qm_mask, other=0.0)
        lse = tl.load(Lse + pid_bh * N_Q + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(Delta + pid_bh * N_Q + offs_m, mask=m_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_REL:
            rel = tl.load(Rel + pid_bh * N_Q * R_PAD + offs_m[:, None] * R_PAD + cols[None, :], mask=m_mask[:, None], other=0.0)
            s += tl.dot(rel * 1.4426950408889634, onehot, input_precision=DOT_PRECISION)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    dk = dk * sm_scale
    # Slab pid_s of (splits, B*H, N_KV, D); pid_bh is int64, so is the whole offset.
    out_off = (pid_s * tl.num_programs(1) + pid_bh) * N_KV * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def pooling_attention_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, Rel, R, IDX_T, IDX_H, IDX_W, DQ, DRel,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, N_Q, N_KV, D, sm_scale,
    QH, QW, KT, KH, KW,
    HAS_CLS: tl.constexpr, HAS_REL: tl.constexpr, HAS_T: tl.constexpr, HAS_HW: tl.constexpr,
    RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr = 0,
):
    """One program per query tile: dq (attention + rel-pos + residual terms) and d rel."""
    if HEAD_DIM:  # a head dim that is not a multiple of 16 (head_dim_constexpr)
        D = HEAD_DIM
    pid_bh, b, h, offs_m, offs_d, d_mask = _head_tile(H, D, BLOCK_M, D_PAD)
    m_mask = offs_m < N_Q
    qm_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :], mask=qm_mask, other=0.0)
    do = tl.load(DO + (b * N_Q * H + h) * D + offs_m[:, None] * (H * D) + offs_d[None, :], mask=qm_mask, other=0.0)
    lse = tl.load(Lse + pid_bh * N_Q + offs_m, mask=m_mask, other=float("inf"))
    delta = tl.load(Delta + pid_bh * N_Q + offs_m, mask=m_mask, other=0.0)
    if HAS_REL:
        cols = tl.arange(0, R_PAD)
        rel2 = tl.load(Rel + pid_bh * N_Q * R_PAD + offs_m[:, None] * R_PAD + cols[None, :], mask=m_mask[:, None], other=0.0)
        rel2 = rel2 * 1.4426950408889634
        drel = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start_n in range(0, N_KV, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N_KV
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_REL:
            onehot = _key_onehot(offs_n, N_KV, KT, KH, KW, HAS_CLS, R_PAD)
            s += tl.dot(rel2, onehot, input_precision=DOT_PRECISION)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        if HAS_REL:
            drel += tl.dot(ds, tl.trans(onehot), input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    grid_row, qt, qh, qw = _query_coords(offs_m, N_Q, QH, QW, HAS_CLS)
    if HAS_REL:
        # d rel[m, j] flows to q[m] through R[idx[a(m), j]]: the same gather as the forward.
        drel = tl.where(grid_row[:, None], drel, 0.0)
        tl.store(DRel + pid_bh * N_Q * R_PAD + offs_m[:, None] * R_PAD + cols[None, :], drel, mask=m_mask[:, None])
        if HAS_T:
            dq = _rel_axis_grad(dq, drel, R, IDX_T, qt, KT, 0, grid_row, cols, offs_d, d_mask, D)
        if HAS_HW:
            dq = _rel_axis_grad(dq, drel, R, IDX_H, qh, KH, KT, grid_row, cols, offs_d, d_mask, D)
            dq = _rel_axis_grad(dq, drel, R, IDX_W, qw, KW, KT + KH, grid_row, cols, offs_d, d_mask, D)
    if RESIDUAL:
        dq += tl.where(grid_row[:, None], do.to(tl.float32), 0.0)
    tl.store(DQ + pid_bh * N_Q * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qm_mask)


# ---------------------------------------------------------------------------------------------
# Host side: configuration rule and launchers (plain tensors in, tensors out; no autograd here).
# ---------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402
import functools  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

import torch  # noqa: E402

from .._dispatch import cached_constant  # noqa: E402

#: head_dim is padded to the next of these (tl.arange needs a power of two); larger heads fall
#: back to SDPA.
D_PADS = (16, 32, 64, 128)
#: The packed rel tile holds KT+KH+KW columns; 64 covers MViT-B's widest kv grid (8x14x14 -> 36).
R_PADS = (16, 32, 64)
KERNELS = ("fwd", "bwd_delta", "bwd_dkdv", "bwd_dq")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: The tile rules, named by the target the AOT check compiles each for, with the shared memory
#: per block (opt-in maximum, bytes) its configs may use. A GPU takes the first rule whose limit
#: its own shared memory reaches (:func:`rule_for`):
#:   90: 227 KB, H100/H200 (sm_90), B200/B300 (sm_100/103);
#:   80: 163 KB, A100 (sm_80), Jetson Orin (sm_87);
#:   86:  99 KB, RTX 30/40/50 and RTX PRO, A10/A40, L4/L40S (sm_86/89/120).
RULES = {90: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024}
#: The rules whose GPUs run tl.dot as mma.sync (Ampere, Ada, and the 99 KB Blackwell cards, which
#: have no wgmma): their register budgets follow what the AOT figures showed on sm_80.
MMA_SYNC_RULES = (80, 86)
#: CUDA's limit on grid axes 1 and 2: the kernels put (batch, head) on axis 1, so B * heads above
#: it (MViTv2 image inference at batch 8,192) takes SDPA. Triton does not check it at launch.
MAX_GRID_Y = 65535
#: bf16 tensor-core dots need Ampere; older GPUs (Volta, Turing) take SDPA and the unfused ops.
MIN_CAPABILITY = (8, 0)
#: Opt-in shared memory by compute capability, for torch releases whose device properties
#: lack ``shared_memory_per_block_optin``; other capabilities are taken to have 99 KB.
_SMEM_OPTIN = {(8, 0): 166912, (8, 7): 166912, (9, 0): 232448, (10, 0): 232448, (10, 3): 232448}


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    block_m: int  # query rows per tile (the long axis: L_q up to 25,089)
    block_n: int  # keys per tile (L_kv is short: 393 or 1,569)
    num_warps: int
    num_stages: int


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def head_dim_constexpr(head_dim: int) -> int:
    """The kernels' HEAD_DIM: 0 where the head dim is a multiple of 16 (MViT-B's 96, MViTv2-H's 64),
    passed as the runtime D that Triton specializes as such; else the head dim itself, compiled
    in as a constant (MViTv2-L's 72). With a runtime D of no known divisibility every load and
    store along d is masked element by element: at head 72 the forward put 800-1,264 B per thread
    on the stack and dq 144-240 B (AOT, every target), 0-120 B with the constant (and none with
    the tiles select_config gives it)."""
    return 0 if head_dim % 16 == 0 else head_dim


def select_config(kernel: str, dtype: torch.dtype, d_pad: int, cc: int = 90, precision: str = "tf32",
                  aligned: bool = True) -> AttentionConfig:
    """The one rule that picks tiles, by kernel, dtype, padded head dim and compute capability
    (no autotune: the interpreter cannot run it, and the AOT test compiles exactly what this
    returns for each rule's target, sm_80, sm_86 and sm_90; the interpreter uses the sm_90
    rule). ``cc`` names the rule (:data:`RULES`, :func:`device_cc`); rule 86 is rule 80 within
    99 KB of shared memory.

    Forward: a 128-row query tile streams the few short key tiles (L_kv is 393 or 1,569 while
    L_q reaches 25,089); q, the fp32 accumulator, the packed rel tile and a 128x64 score tile
    live in registers, which takes 8 warps from head 64 up. The backward holds two fp32
    accumulators (dk+dv, or dq+d rel): 64x64 tiles, narrowed to 32 rows where the AOT figures
    showed spills (dk/dv at head 128; dq on sm_80 from head 64, where mma.sync needs more
    registers than sm_90's wgmma). fp32 inputs halve the tiles to stay in the same budget.
    IEEE fp32 dots (fp32 with TF32 off: an accuracy mode, not a fast one) are FMA loops that
    hold whole operand tiles in registers: 16x16 tiles over 8 warps are the largest the AOT
    figures showed free of stack use at every head dim.

    ``aligned``: whether the head dim is a multiple of 16. Others (:func:`head_dim_constexpr`)
    take narrower 16-bit tiles at head 128 where the AOT figures at head 72 showed stack use
    with these: forward 32-key tiles on sm_90 (64: 32-80 B), 16 on sm_80 (32: 32 B) and 64-row
    tiles on sm_86 (128: 8-24 B); dq 32x32 tiles on sm_90 (64x64: 112-120 B).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if d_pad not in D_PADS:
        raise ValueError(f"d_pad must be one of {D_PADS}, got {d_pad}")
    _check_rule(cc)
    sm80 = cc in MMA_SYNC_RULES
    if kernel == "bwd_delta":  # elementwise and a row sum: 64 rows, no dots, no pipelining
        return AttentionConfig(64, 16, 4, 1)
    if precision == "ieee":
        return AttentionConfig(16, 16, 8, 1)
    if dtype == torch.float32:
        if kernel == "fwd":
            return AttentionConfig(64, 32, 8 if d_pad >= 128 else 4, 2)
        if kernel == "bwd_dkdv" and cc == 86 and d_pad >= 128:
            return AttentionConfig(16, 32, 4, 1)  # 32x32 takes 104 KB of shared memory
        return AttentionConfig(32, 32, 4, 1)
    if not aligned and d_pad >= 128 and kernel == "fwd":
        return AttentionConfig(64 if cc == 86 else 128, {90: 32, 80: 16}.get(cc, 64), 8, 2)
    if not aligned and d_pad >= 128 and kernel == "bwd_dq" and cc == 90:
        return AttentionConfig(32, 32, 8, 2)
    if kernel == "fwd":
        # sm_80 at head 128: 32-key tiles (64 put 24 B on the stack once the forward also
        # stores the pre-residual output); sm_86: 16 (32 put 24 B there, and 64-row tiles
        # 24-312 B).
        block_n = (16 if cc == 86 else 32) if (sm80 and d_pad >= 128) else 64
        return AttentionConfig(128, block_n, 8 if d_pad >= 64 else 4, 2 if d_pad >= 128 else 3)
    warps = 8 if d_pad >= 128 else 4
    if kernel == "bwd_dkdv":
        # sm_80 at head 64: 32-key tiles (64 sat at 255 registers and put 40-80 B on the stack
        # under Triton 3.6, though not under 3.8).
        return AttentionConfig(32 if d_pad >= 128 else 64, 32 if (sm80 and d_pad == 64) else 64, warps, 2)
    return AttentionConfig(32 if (sm80 and d_pad >= 64) else 64, 64, warps, 2)


def select_r_pad(width: int, dtype: torch.dtype, cc: int = 90) -> int:
    """The packed rel tile's width (one of :data:`R_PADS`) for key grid axes summing to ``width``
    (at most ``R_PADS[-1]``): the narrowest that holds it on sm_90 with 16-bit inputs, else the
    widest. All three kernels share it (the forward stores the tile the backward reads), and
    the dq kernel's narrower tiles spilled everywhere else (AOT figures, Triton 3.6 and 3.8, MViT's
    strides and head dims specialized: 16-bit inputs on sm_80/86, 40-1,920 B; fp32 at head 128,
    450-570 B on every target), while 64 spilled nothing. The narrow tile saves one-hot work
    (2 * N_q * N_kv * R_PAD FLOPs per head) where it compiles cleanly, as on the H100s."""
    if cc == 90 and dtype in (torch.bfloat16, torch.float16):
        return next_pow2(width)
    return R_PADS[-1]


def query_splits(programs: int, query_tiles: int, q: torch.Tensor) -> int:
    """How many query splits the dk/dv kernel uses: enough programs for two waves of the GPU's
    multiprocessors (one split when the key tiles alone fill them), never more than there are
    query tiles. Splits cost a fp32 partial per split and one sum."""
    if not q.is_cuda:
        return 1 if programs >= 4 else min(query_tiles, 2)  # the interpreter: exercise the split path cheaply
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(query_tiles, (2 * sms) // max(programs, 1)))


def _check_rule(cc: int) -> None:
    if cc not in RULES:
        raise ValueError(f"cc must name a tile rule, one of {tuple(RULES)} (see device_cc), got {cc}")


def rule_for(capability: Sequence[int], smem_per_block_optin: int) -> Optional[int]:
    """The tile rule (:data:`RULES`) for a GPU of this compute capability and opt-in shared
    memory per block, or None where the kernels do not run (before Ampere)."""
    if tuple(capability) < MIN_CAPABILITY:
        return None
    return next((rule for rule, limit in RULES.items() if smem_per_block_optin >= limit), None)


def _memo(fn):
    """``functools.lru_cache`` for the dispatch rules, as a plain dict: torch.compile traces these
    functions (the dispatch runs inside the user's graph), and Dynamo warns about every
    lru_cache-wrapped function it meets ("Silent incorrectness is only a potential risk") where
    it traces a dict lookup silently. ``cache_clear`` as lru_cache's."""
    cache: dict = {}

    @functools.wraps(fn)
    def cached(*args):
        if args not in cache:
            cache[args] = fn(*args)
        return cache[args]

    cached.cache_clear = cache.clear
    return cached


@_memo
def _device_rule(index: int) -> Optional[int]:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or _SMEM_OPTIN.get((props.major, props.minor), RULES[86])
    return rule_for((props.major, props.minor), smem)


def _cuda_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def runs_on(t: torch.Tensor) -> bool:
    """Whether the kernels can take t's device: a GPU with a tile rule (Ampere or newer), or
    the CPU under the interpreter (see :func:`device_cc`)."""
    return not t.is_cuda or _device_rule(_cuda_index(t)) is not None


def device_cc(t: torch.Tensor) -> int:
    """The tile rule for t's device (:data:`RULES`; the sm_90 rule under the interpreter).
    Every launcher asks it first, so it also refuses, with a clear error, a device the kernels
    cannot run on: a GPU before Ampere, or CPU tensors without a working interpreter (see
    :func:`interpreter_problem`)."""
    if t.is_cuda:
        rule = _device_rule(_cuda_index(t))
        if rule is None:
            major, minor = torch.cuda.get_device_capability(t.device)
            raise RuntimeError(
                f"mvit_kernels Triton kernels need a GPU of compute capability >= 8.0 (Ampere or newer); "
                f"{torch.cuda.get_device_name(t.device)} is {major}.{minor}. The dispatching ops "
                "(pooling_attention, pooled_projection) use SDPA and the unfused ops there."
            )
        return rule
    problem = interpreter_problem()
    if problem is not None:
        raise RuntimeError(f"mvit_kernels Triton kernels got a {t.device.type} tensor: {problem}")
    return 90


@_memo
def interpreter_problem() -> Optional[str]:
    """Why the Triton interpreter cannot run these kernels on CPU tensors, or None if it can.

    Triton decides at import whether ``@triton.jit`` functions are interpreted (TRITON_INTERPRET=1
    set before triton is imported). Triton 3.6's interpreter turns a loop bound into a Python int
    with ``int(array)`` on a one-element array, which NumPy 2.4 rejects ("only 0-dimensional
    arrays can be converted to Python scalars") in the middle of a kernel; Triton 3.7 fixed it."""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(pooling_attention_fwd_kernel, InterpretedFunction):
        return "CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
    import numpy

    def release(version: str) -> tuple[int, int]:
        major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:2])
        return major, minor

    if release(triton.__version__) < (3, 7) and release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails under NumPy {numpy.__version__} (its loop bounds "
                "need NumPy < 2.4); install 'numpy<2.4' or Triton >= 3.7")
    return None


def covers(t: torch.Tensor, batch_heads: int, head_dim: int) -> bool:
    """Whether the kernels (attention and projection alike) launch for inputs like t with
    ``batch_heads`` (batch, head) programs on grid axis 1 and heads of ``head_dim``."""
    if t.dtype not in DTYPES or head_dim > D_PADS[-1] or not runs_on(t):
        return False
    if t.is_cuda and head_dim < 16:
        # Heads narrower than one 16-wide tile: an H100 run (Triton 3.6) of a bf16 head-8 case
        # ended in an illegal address that compute-sanitizer could not reproduce in isolation;
        # no MViT has such heads, so they take the unfused ops rather than risk it.
        return False
    return batch_heads <= MAX_GRID_Y  # a launch past the axis' limit fails


def supports(q: torch.Tensor, thw_kv: Sequence[int], has_rel: bool) -> bool:
    """Whether the Triton kernels cover this call (else the caller falls back to SDPA)."""
    if not covers(q, q.shape[0] * q.shape[1], q.shape[-1]):
        return False
    return not (has_rel and sum(thw_kv) > R_PADS[-1])


_REL_INDEX_CACHE: dict = {}


def rel_index(q_size: int, k_size: int, device, offset: int = 0, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """``reference.rel_pos_index`` + ``offset`` as ``dtype`` on ``device``, cached: a model calls
    this with a few grid sizes, and a fresh host-to-device copy per call would synchronize (and
    the offset or a cast, done per call, would each cost a kernel launch)."""
    from ..reference import rel_pos_index

    key = (q_size, k_size, offset, dtype, str(device))
    return cached_constant(_REL_INDEX_CACHE, key,
                           lambda: (rel_pos_index(q_size, k_size) + offset).to(device=device, dtype=dtype).contiguous())


_DUMMY_CACHE: dict = {}


def _dummy(device, dtype) -> torch.Tensor:
    """A one-element placeholder for pointer arguments a launch does not read (no rel-pos, no bias);
    cached, since allocating it each call costs more host time than the kernel at small shapes."""
    key = (str(device), dtype)
    return cached_constant(_DUMMY_CACHE, key, lambda: torch.zeros(1, device=device, dtype=dtype))


class RelTables:
    """The interpolated tables concatenated into one (L, d) fp32 array, and the per-axis gather
    indices (q_size, k_size) into it (``reference.rel_pos_index`` plus the table's offset)."""

    def __init__(self, q, thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w):
        dev = q.device
        self.has_t = rel_pos_t is not None
        self.has_hw = rel_pos_h is not None
        self.has_rel = self.has_t or self.has_hw
        self.lengths = []
        tables, offset = [], 0
        dummy_idx = _dummy(dev, torch.int32)
        self.idx = [dummy_idx, dummy_idx, dummy_idx]
        for axis, table in enumerate((rel_pos_t, rel_pos_h, rel_pos_w)):
            if table is None:
                continue
            length = 2 * max(thw_q[axis], thw_kv[axis]) - 1
            if table.shape[0] != length:
                # The gather indexes rows up to length-1: a shorter table would read out of bounds.
                raise ValueError(f"rel-pos table {'thw'[axis]} must be interpolated to {length} rows, got {table.shape[0]}")
            self.idx[axis] = rel_index(thw_q[axis], thw_kv[axis], dev, offset)
            tables.append(table.float())
            offset += table.shape[0]
        self.table = torch.cat(tables).contiguous() if tables else _dummy(dev, torch.float32)
        self.r_pad = select_r_pad(sum(thw_kv), q.dtype, device_cc(q)) if self.has_rel else 16


def dot_precision(q: torch.Tensor) -> str:
    """tl.dot's input precision: fp32 CUDA inputs follow torch's TF32 switch for matmuls (what
    cuBLAS does for the reference path), so fp32 with TF32 off is IEEE fp32 end to end. (The
    interpreter computes fp32 either way; it keeps the fast path's tiles.)"""
    if q.is_cuda and q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _check_last_dim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling, store_rel, tabs=None):
    """Returns out (B, N_q, heads*d), lse (B, heads, N_q) fp32 base 2, rel (B, heads, N_q, R_PAD)
    fp32 (empty unless store_rel and a rel-pos table is given), o_attn (B, N_q, heads*d): the
    output before the residual pooling term (empty unless store_rel and residual_pooling; without
    the residual the backward reads ``out`` itself). ``tabs``: the call's :class:`RelTables`, when
    the caller keeps them for the backward (else built here)."""
    q, k, v = (_check_last_dim(t) for t in (q, k, v))
    B, H, n_q, D = q.shape
    n_kv = k.shape[2]
    tabs = tabs or RelTables(q, thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w)
    d_pad = next_pow2(D)
    precision = dot_precision(q)
    cfg = select_config("fwd", q.dtype, d_pad, device_cc(q), precision, aligned=D % 16 == 0)
    out = torch.empty(B, n_q, H * D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, n_q, device=q.device, dtype=torch.float32)
    store_oattn = bool(store_rel and residual_pooling)
    store_rel = bool(store_rel and tabs.has_rel)
    rel = torch.empty((B, H, n_q, tabs.r_pad) if store_rel else (0,), device=q.device, dtype=torch.float32)
    o_attn = torch.empty((B, n_q, H * D) if store_oattn else (0,), device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(n_q, cfg.block_m), B * H)
    pooling_attention_fwd_kernel[grid](
        q, k, v, tabs.table, *tabs.idx, out, lse, rel, o_attn,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        H, n_q, n_kv, D, D**-0.5,
        thw_q[1], thw_q[2], *thw_kv,
        HAS_CLS=bool(has_cls), HAS_REL=tabs.has_rel, HAS_T=tabs.has_t, HAS_HW=tabs.has_hw,
        RESIDUAL=bool(residual_pooling), STORE_REL=store_rel, STORE_OATTN=store_oattn,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D_PAD=d_pad, R_PAD=tabs.r_pad,
        DOT_PRECISION=precision, HEAD_DIM=head_dim_constexpr(D), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse, rel, o_attn


def backward(dout, q, k, v, o_attn, lse, rel, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling,
             tabs=None):
    """Returns dq, dk, dv (B, heads, N, d) and d rel (B, heads, N_q, R_PAD) fp32 (zero rows for
    the class token; empty without rel-pos). ``tabs``: the forward's :class:`RelTables`, if kept."""
    q, k, v = (_check_last_dim(t) for t in (q, k, v))
    dout = dout.contiguous()
    B, H, n_q, D = q.shape
    n_kv = k.shape[2]
    tabs = tabs or RelTables(q, thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w)
    d_pad = next_pow2(D)
    # delta = rowsum(dO * O_attn), O_attn the softmax output before the residual q is added
    # (the forward's o_attn with residual pooling, else its out).
    delta = torch.empty(B, H, n_q, device=q.device, dtype=torch.float32)
    cfg = select_config("bwd_delta", q.dtype, d_pad, device_cc(q))
    pooling_attention_bwd_delta_kernel[(triton.cdiv(n_q, cfg.block_m), B * H)](
        dout, o_attn.contiguous(), delta, H, n_q, D,
        BLOCK_M=cfg.block_m, D_PAD=d_pad, HEAD_DIM=head_dim_constexpr(D), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    dq = torch.empty(B, H, n_q, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, H, n_kv, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, H, n_kv, D, device=q.device, dtype=v.dtype)
    drel = torch.empty((B, H, n_q, tabs.r_pad) if tabs.has_rel else (0,), device=q.device, dtype=torch.float32)
    if not tabs.has_rel:
        rel = drel
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    precision = dot_precision(q)
    flags = dict(HAS_CLS=bool(has_cls), HAS_REL=tabs.has_rel, D_PAD=d_pad, R_PAD=tabs.r_pad, DOT_PRECISION=precision,
                 HEAD_DIM=head_dim_constexpr(D))
    aligned = D % 16 == 0
    cfg = select_config("bwd_dkdv", q.dtype, d_pad, device_cc(q), precision, aligned)
    n_tiles = triton.cdiv(n_kv, cfg.block_n)
    splits = query_splits(n_tiles * B * H, triton.cdiv(n_q, cfg.block_m), q)
    m_per_split = triton.cdiv(triton.cdiv(n_q, cfg.block_m), splits) * cfg.block_m
    splits = triton.cdiv(n_q, m_per_split)
    if splits == 1:
        dk_buf, dv_buf = dk, dv
    else:  # fp32 partials, one slab per query split
        dk_buf = torch.empty(splits, B, H, n_kv, D, device=q.device, dtype=torch.float32)
        dv_buf = torch.empty_like(dk_buf)
    pooling_attention_bwd_dkdv_kernel[(n_tiles, B * H, splits)](
        q, k, v, dout, lse, delta, rel, dk_buf, dv_buf, *strides,
        H, n_q, n_kv, D, D**-0.5, *thw_kv, m_per_split,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )
    if splits > 1:
        torch.sum(dk_buf, 0, out=dk) if dk.dtype == torch.float32 else dk.copy_(dk_buf.sum(0))
        torch.sum(dv_buf, 0, out=dv) if dv.dtype == torch.float32 else dv.copy_(dv_buf.sum(0))
    cfg = select_config("bwd_dq", q.dtype, d_pad, device_cc(q), precision, aligned)
    pooling_attention_bwd_dq_kernel[(triton.cdiv(n_q, cfg.block_m), B * H)](
        q, k, v, dout, lse, delta, rel, tabs.table, *tabs.idx, dq, drel, *strides,
        H, n_q, n_kv, D, D**-0.5, thw_q[1], thw_q[2], *thw_kv,
        HAS_T=tabs.has_t, HAS_HW=tabs.has_hw, RESIDUAL=bool(residual_pooling),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )
    return dq, dk, dv, drel


def rel_table_grads(drel, q, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, cached_index: bool = False):
    """Gradients of the (interpolated) tables from d rel: for axis a,
    dR_a[idx_a[i, j]] += sum over grid rows m with a(m) = i of drel[m, col_a(j)] * q[m].
    The contraction is one einsum per axis (what the reference's einsum backward costs), then a
    scatter-add of (q_size*k_size) rows into the table."""
    from ..reference import rel_pos_index

    B, H, n_q, D = q.shape
    s = 1 if has_cls else 0
    qt, qh, qw = thw_q
    kt, kh, kw = thw_kv
    dr = drel[:, :, s:].reshape(B, H, qt, qh, qw, -1)
    qg = q[:, :, s:].reshape(B, H, qt, qh, qw, D).float()
    grads = []
    spans = ((0, kt, "bnthwj,bnthwc->tjc"), (kt, kh, "bnthwj,bnthwc->hjc"), (kt + kh, kw, "bnthwj,bnthwc->wjc"))
    for axis, (table, (start, size, eq)) in enumerate(zip((rel_pos_t, rel_pos_h, rel_pos_w), spans)):
        if table is None:
            grads.append(None)
            continue
        g = torch.einsum(eq, dr[..., start:start + size], qg)
        # Eagerly, the cached device index (building it costs a few small launches a call).
        # Under torch.compile this runs in the traced backward, where a cached tensor would leak
        # between fake and real modes: there the index is built on the device in the graph.
        if cached_index:
            idx = rel_index(thw_q[axis], thw_kv[axis], q.device, dtype=torch.int64)
        else:
            idx = rel_pos_index(thw_q[axis], thw_kv[axis], q.device)
        dtable = torch.zeros(table.shape, device=q.device, dtype=torch.float32)
        dtable.index_add_(0, idx.reshape(-1), g.reshape(-1, D))
        grads.append(dtable.to(table.dtype))
    return grads
