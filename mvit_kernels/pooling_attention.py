"""Pooling attention, fused path.

softmax(q k^T d^-1/2 + rel-pos bias) v (+ q), merged to (B, N_q, heads*d).

- CUDA tensors with MViTv2's rel-pos bias: the Triton kernels of
  :mod:`mvit_kernels.triton.pooling_attention` (flash-style, the decomposed rel-pos bias computed
  in-kernel from KT+KH+KW numbers per query row, residual pooling in the epilogue, output written
  as (B, N_q, heads*d)). Configurations the kernels do not cover (dtype, head_dim < 16 or > 128,
  kv grid with T+H+W > 64) fall back to SDPA, and so does attention without rel-pos, where
  cuDNN's / FlashAttention's SDPA measured faster than these kernels (:func:`prefers_triton`).
  Where ``mvit_kernels.tuning`` is on (CUDA, by default), the clock decides instead, per shape,
  wherever the kernels apply.
- CPU tensors: ``torch.nn.functional.scaled_dot_product_attention`` with the rel-pos bias passed
  as an additive mask; without gradients the mask is written in one pass by the C++ op
  ``mvit_kernels::rel_pos_mask`` (the axes' dot products and the sums, from q and the tables),
  and a mask over 32 MiB is written and used in query chunks through one 16 MiB buffer
  (:func:`_sdpa_rel_pos_inference`).
  :func:`triton_pooling_attention` forces the Triton path (on CPU tensors it
  needs ``TRITON_INTERPRET=1``; the tests use it that way).

Registration: ``torch.library.custom_op`` (not ``triton_op`` + ``wrap_triton``). Both trace under
``torch.compile`` on a GPU, but only ``custom_op`` also compiles under the Triton interpreter
(with ``triton_op`` fake tensors reach the interpreter), so only ``custom_op`` lets
the CPU CI prove ``torch.compile(fullgraph=True)``, ``opcheck`` and the FLOP formulas. The cost
is that Inductor sees the kernel as an opaque op instead of fusing around it, which it would not
do for an attention kernel anyway.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from . import _extension, autocast, reference, tuning
from ._autograd import first_order_only
from ._dispatch import in_functorch_transform, needs_grad, traced_or_intercepted
from .checks import as_op_error, check_attention_args, check_grad_shape, check_interpolated_tables, check_rel_pos_mask_args

try:
    from .triton import pooling_attention as _kernels
except ImportError:  # no Triton in this environment: SDPA everywhere
    _kernels = None


#: CPU inference with MViTv2's rel-pos bias: the mask is written and used in query chunks of at
#: most this many bytes, one buffer reused across the chunks. Whole, the mask is the largest
#: tensor of MViTv2-S's early blocks (39.5 MB at block 0, 78.8 MB at block 1); a fresh buffer of
#: that size page-faults on first touch, and the writes and SDPA's reads of it go to memory. A
#: chunk stays in cache and its buffer stays mapped.
REL_POS_MASK_CHUNKED_ABOVE_BYTES = 32 << 20
REL_POS_MASK_CHUNK_BYTES = 16 << 20


def _rel_pos_term_rows(q, thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w, has_cls):
    """``reference.rel_pos_terms`` with the query grid flattened: each (B, heads, N_grid, K_a) or None."""
    terms = reference.rel_pos_terms(q, thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    return tuple(None if t is None else t.flatten(2, 4) for t in terms)


def _write_rel_pos_mask(mask: Tensor, rel_t: Optional[Tensor], rel_h: Optional[Tensor], rel_w: Optional[Tensor],
                        row0: int, thw_kv: Sequence[int], has_cls: bool) -> None:
    """Query rows row0 .. row0 + mask.shape[2] of the mask (B, heads, N_q, N_kv) into ``mask``, from
    the axes' terms (:func:`_rel_pos_term_rows`) in one pass over it: the class token's row and
    column zero, each grid row the sum of the two smaller axes' terms broadcast against the
    third's, written ``out=`` a view of the mask."""
    s = 1 if has_cls else 0
    if has_cls:
        mask[..., 0].zero_()
        if row0 == 0:
            mask[:, :, 0].zero_()
    g0 = max(row0 - s, 0)  # first grid row of the chunk
    g1 = row0 - s + mask.shape[2]
    grid = mask[:, :, mask.shape[2] - (g1 - g0):, s:].unflatten(3, tuple(thw_kv))  # (B, heads, rows, kt, kh, kw)
    rel_t, rel_h, rel_w = (None if t is None else t[:, :, g0:g1] for t in (rel_t, rel_h, rel_w))
    if rel_h is None:
        grid.copy_(rel_t[..., :, None, None].expand(grid.shape))
        return
    th = rel_h[..., None, :] if rel_t is None else rel_t[..., :, None] + rel_h[..., None, :]  # (..., kt or 1, kh)
    th = th.expand(*th.shape[:-2], thw_kv[0], thw_kv[1])  # out= takes the result's full shape
    torch.add(th[..., None], rel_w[..., None, None, :], out=grid)


def _mask_rows_per_chunk(q: Tensor, n_kv: int) -> int:
    """Query rows per chunk of the inference mask: all of them off the CPU and below
    :data:`REL_POS_MASK_CHUNKED_ABOVE_BYTES`, else as many equal chunks as
    :data:`REL_POS_MASK_CHUNK_BYTES` asks for."""
    B, heads, n_q, _ = q.shape
    total = B * heads * n_q * n_kv * q.element_size()
    if q.device.type != "cpu" or total <= REL_POS_MASK_CHUNKED_ABOVE_BYTES:
        return n_q
    chunks = -(-total // REL_POS_MASK_CHUNK_BYTES)
    return -(-n_q // chunks)


def _mask_writer(q: Tensor, thw_q: Sequence[int], thw_kv: Sequence[int], rel_pos_t: Optional[Tensor],
                 rel_pos_h: Optional[Tensor], rel_pos_w: Optional[Tensor], has_cls: bool):
    """f(mask, row0) that writes query rows row0 .. of the inference mask into ``mask``: on CPU the
    C++ op ``mvit_kernels::rel_pos_mask`` (terms and mask in one pass from q and the gathered
    tables), elsewhere (or without the extension) :func:`_write_rel_pos_mask` from the terms."""
    if q.device.type == "cpu" and _extension.load():
        tables = reference.rel_pos_tables(thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w)
        op = torch.ops.mvit_kernels.rel_pos_mask
        return lambda mask, row0: op(q, *tables, list(thw_q), list(thw_kv), has_cls, row0, mask)
    terms = _rel_pos_term_rows(q, thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    return lambda mask, row0: _write_rel_pos_mask(mask, *terms, row0, thw_kv, has_cls)


def _sdpa_rel_pos_inference(q: Tensor, k: Tensor, v: Tensor, rel_pos_t: Optional[Tensor], rel_pos_h: Optional[Tensor],
                            rel_pos_w: Optional[Tensor], thw_q: Sequence[int], thw_kv: Sequence[int], has_cls: bool,
                            residual_pooling: bool) -> Tensor:
    """SDPA with the rel-pos bias, no autograd: the mask written in one pass (:func:`_mask_writer`),
    whole or, on CPU, in query chunks of at most :data:`REL_POS_MASK_CHUNK_BYTES` through one
    buffer. Returns (B, N_q, heads*d)."""
    B, heads, n_q, d = q.shape
    n_kv = k.shape[2]
    write = _mask_writer(q, thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    rows = _mask_rows_per_chunk(q, n_kv)
    if rows >= n_q:
        mask = q.new_empty(B, heads, n_q, n_kv)
        write(mask, 0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if residual_pooling:  # in place: no autograd here (the reference's cat is another pass)
            s = 1 if has_cls else 0
            out[:, :, s:] += q[:, :, s:]
        return out.transpose(1, 2).reshape(B, n_q, heads * d)
    buffer = q.new_empty(B * heads * rows * n_kv)
    out = q.new_empty(B, n_q, heads, d)
    for r0 in range(0, n_q, rows):
        r1 = min(r0 + rows, n_q)
        mask = buffer[: B * heads * (r1 - r0) * n_kv].view(B, heads, r1 - r0, n_kv)
        write(mask, r0)
        q_rows = q[:, :, r0:r1]
        chunk = F.scaled_dot_product_attention(q_rows, k, v, attn_mask=mask)
        dst = out[:, r0:r1].transpose(1, 2)  # (B, heads, rows, d) view of the output
        dst.copy_(chunk)
        if residual_pooling:  # as the whole path: the class token's output takes no residual
            s = 1 if has_cls and r0 == 0 else 0
            dst[:, :, s:] += q_rows[:, :, s:]
    return out.view(B, n_q, heads * d)


@torch.library.custom_op("mvit_kernels::sdpa_rel_pos_inference", mutates_args=())
def _sdpa_rel_pos_inference_op(q: Tensor, k: Tensor, v: Tensor, rel_pos_t: Optional[Tensor],
                               rel_pos_h: Optional[Tensor], rel_pos_w: Optional[Tensor], thw_q: Sequence[int],
                               thw_kv: Sequence[int], has_cls: bool, residual_pooling: bool) -> Tensor:
    """:func:`_sdpa_rel_pos_inference` as torch.compile sees it (no autograd): Dynamo rejects the
    strided ``out=``, and Inductor's own loop for the mask's sum was 3x slower on CPU (MViTv2-S
    16x4: 0.80 vs 0.64 s a clip compiled vs eager)."""
    _check_op("mvit_kernels.sdpa_rel_pos_inference", q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls,
              residual_pooling)
    return _sdpa_rel_pos_inference(q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls, residual_pooling)


@_sdpa_rel_pos_inference_op.register_fake
def _sdpa_rel_pos_inference_fake(q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls, residual_pooling):
    _check_op("mvit_kernels.sdpa_rel_pos_inference", q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls,
              residual_pooling)
    B, heads, n_q, d = q.shape
    return q.new_empty(B, n_q, heads * d)


if _extension.load():

    @torch.library.register_fake("mvit_kernels::rel_pos_mask")
    def _rel_pos_mask_fake(q, table_t, table_h, table_w, thw_q, thw_kv, has_cls, row0, out):
        # Also what runs when one argument is on the meta device: unchecked, out stayed unwritten.
        with as_op_error("mvit_kernels.rel_pos_mask"):
            check_rel_pos_mask_args(q, table_t, table_h, table_w, thw_q, thw_kv, has_cls, row0, out)
        return None

    @register_flop_formula(torch.ops.mvit_kernels.rel_pos_mask)
    def _rel_pos_mask_flops(q_shape, t_shape, h_shape, w_shape, thw_q, thw_kv, has_cls, row0, mask_shape, **kwargs) -> int:
        # The axes' dot products, as the einsums of reference.rel_pos_terms count them (the sums
        # of the terms are not multiply-adds).
        B, heads, rows, _ = mask_shape
        grid_rows = rows - (1 if has_cls and row0 == 0 and rows > 0 else 0)
        keys = sum(shape[1] for shape in (t_shape, h_shape, w_shape) if shape is not None)
        return 2 * B * heads * grid_rows * q_shape[3] * keys


def _sdpa_pooling_attention(q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling):
    """SDPA, with MViTv2's decomposed rel-pos bias as its additive mask (B, heads, N_q, N_kv), zero
    on the class token's row and column.

    With gradients the mask is the reference's bias, padded (``out=`` is not differentiable):
    :func:`_sdpa_with_reference_mask`. Without, :func:`_sdpa_rel_pos_inference` writes it in one
    pass, in query chunks on CPU where it is large (the registered op under torch.compile):
    building it as the reference does (zeros, three broadcast adds, then a pad) made five passes
    over the largest tensor of MViTv2-S's early blocks, a quarter of its CPU inference time; the
    chunks took another 0.1 s of its ~1.15 s a clip (2-core VM, 2026-12-06: block 0's 37.6 MiB
    mask 78 -> 55 ms, block 1's 75.1 MiB 125 -> 80 ms, block 3's 37.6 MiB 66 -> 43 ms, attention
    with the mask's writes)."""
    if (rel_pos_t is not None or rel_pos_h is not None) and not needs_grad((q, k, v, rel_pos_t, rel_pos_h, rel_pos_w)):
        run = _sdpa_rel_pos_inference_op if torch.compiler.is_compiling() else _sdpa_rel_pos_inference
        return run(q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, list(thw_q), list(thw_kv), bool(has_cls),
                   bool(residual_pooling))
    return _sdpa_with_reference_mask(q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w,
                                     residual_pooling)


def _sdpa_with_reference_mask(q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling):
    """SDPA with the reference's bias as its mask (zeros, three broadcast adds, the pad; none
    without tables), differentiable: the unfused way to run SDPA with MViTv2's bias."""
    if q.numel() == 0 or k.numel() == 0:
        # SDPA's backward of an empty batch leaves the mask out of the graph: the tables would get
        # no gradient instead of the zeros the reference gives them.
        return reference.pooling_attention(q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w,
                                           residual_pooling=residual_pooling)
    B, heads, n_q, d = q.shape
    mask = None
    if rel_pos_t is not None or rel_pos_h is not None:
        mask = reference.decomposed_rel_pos(q, thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
        mask = F.pad(mask, (1, 0, 1, 0)) if has_cls else mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if residual_pooling:
        out = reference.add_residual_pooling(out, q, has_cls)
    return out.transpose(1, 2).reshape(B, n_q, heads * d)


# ------------------------------------------------------------------------------------------
# The registered ops. Tables given to the ops are already interpolated to 2*max(q, k) - 1 rows
# (in torch, so autograd handles the interpolation's backward).
# ------------------------------------------------------------------------------------------


def _check_op(op: str, q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls, residual_pooling,
              interpolated: bool = False) -> None:
    """The registered ops' own checks, in their bodies and fakes: torch.compile, torch.export and
    direct callers reach them without the public functions' checks, and the kernels index
    without bounds."""
    with as_op_error(op):
        thw_q, thw_kv = check_attention_args(q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w,
                                             residual_pooling)
        if interpolated:
            check_interpolated_tables(q, thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w)


def _rel_pad(q: Tensor, thw_kv: Sequence[int]) -> int:
    """The rel tile's width the launcher picks (``RelTables``), for the fakes' shapes."""
    return _kernels.select_r_pad(sum(thw_kv), q.dtype, _kernels.device_cc(q))


@torch.library.custom_op("mvit_kernels::pooling_attention_triton", mutates_args=())
def _fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_pos_t: Optional[Tensor],
    rel_pos_h: Optional[Tensor],
    rel_pos_w: Optional[Tensor],
    thw_q: Sequence[int],
    thw_kv: Sequence[int],
    has_cls: bool,
    residual_pooling: bool,
    for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (out (B, N_q, heads*d), lse (B, heads, N_q) fp32, rel (B, heads, N_q, R_PAD) fp32
    or empty, o_attn (B, N_q, heads*d) or empty); lse, rel and o_attn (the output before the
    residual pooling term) are what the backward needs, written only when for_backward."""
    _check_op("mvit_kernels.pooling_attention_triton", q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv,
              has_cls, residual_pooling, interpolated=True)
    with torch.cuda.device(q.device) if q.is_cuda else _nullcontext():
        return _kernels.forward(
            q, k, v, list(thw_q), list(thw_kv), has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling, for_backward
        )


@_fwd_op.register_fake
def _fwd_fake(q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls, residual_pooling, for_backward):
    _check_op("mvit_kernels.pooling_attention_triton", q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv,
              has_cls, residual_pooling, interpolated=True)
    B, H, n_q, D = q.shape
    has_rel = rel_pos_t is not None or rel_pos_h is not None
    out = q.new_empty(B, n_q, H * D)
    lse = q.new_empty(B, H, n_q, dtype=torch.float32)
    rel_shape = (B, H, n_q, _rel_pad(q, thw_kv)) if (for_backward and has_rel) else (0,)
    o_attn = q.new_empty((B, n_q, H * D) if (for_backward and residual_pooling) else (0,))
    return out, lse, q.new_empty(rel_shape, dtype=torch.float32), o_attn


def _check_backward_op(dout, q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls, residual_pooling):
    op = "mvit_kernels.pooling_attention_triton_backward"
    _check_op(op, q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls, residual_pooling, interpolated=True)
    B, H, n_q, D = q.shape
    with as_op_error(op):
        check_grad_shape(dout, (B, n_q, H * D), "dout", q)


@torch.library.custom_op("mvit_kernels::pooling_attention_triton_backward", mutates_args=())
def _bwd_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o_attn: Tensor,
    lse: Tensor,
    rel: Tensor,
    rel_pos_t: Optional[Tensor],
    rel_pos_h: Optional[Tensor],
    rel_pos_w: Optional[Tensor],
    thw_q: Sequence[int],
    thw_kv: Sequence[int],
    has_cls: bool,
    residual_pooling: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, d rel); the tables' gradients are formed from d rel in torch.
    o_attn is the forward's output before the residual pooling term (its out without one)."""
    _check_backward_op(dout, q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls, residual_pooling)
    return _launch_backward(
        dout, q, k, v, o_attn, lse, rel, rel_pos_t, rel_pos_h, rel_pos_w, list(thw_q), list(thw_kv), has_cls, residual_pooling
    )


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, o_attn, lse, rel, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls, residual_pooling):
    _check_backward_op(dout, q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls, residual_pooling)
    B, H, n_q, D = q.shape
    has_rel = rel_pos_t is not None or rel_pos_h is not None
    drel_shape = (B, H, n_q, _rel_pad(q, thw_kv)) if has_rel else (0,)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        q.new_empty(drel_shape, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls, residual_pooling, _ = inputs
    out, lse, rel, o_attn = output
    ctx.save_for_backward(q, k, v, o_attn if residual_pooling else out, lse, rel, rel_pos_t, rel_pos_h, rel_pos_w)
    ctx.args = (list(thw_q), list(thw_kv), bool(has_cls), bool(residual_pooling))


def _gradients(saved, args, dout, backward, eager: bool):
    """The gradients of (q, k, v, t, h, w) from the saved tensors, with ``backward`` the
    launcher (the registered op when traced, the plain function eagerly)."""
    q, k, v, o_attn, lse, rel, rel_pos_t, rel_pos_h, rel_pos_w = saved
    thw_q, thw_kv, has_cls, residual_pooling = args[:4]
    if q.numel() == 0 or k.numel() == 0:  # an empty batch: every gradient is zero (nothing to launch)
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                *(None if t is None else torch.zeros_like(t) for t in (rel_pos_t, rel_pos_h, rel_pos_w)))
    if ((rel_pos_t is not None or rel_pos_h is not None) and rel.numel() == 0) or o_attn.numel() == 0:
        raise RuntimeError("pooling_attention_triton: backward of a call made with for_backward=False")
    extra = {"tabs": args[4]} if len(args) > 4 else {}
    dq, dk, dv, drel = backward(
        dout, q, k, v, o_attn, lse, rel, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls, residual_pooling,
        **extra,
    )
    dt = dh = dw = None
    if rel_pos_t is not None or rel_pos_h is not None:
        dt, dh, dw = _kernels.rel_table_grads(drel, q, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w,
                                              cached_index=eager)
    return dq, dk, dv, dt, dh, dw


@first_order_only("pooling_attention")
def _backward(ctx, dout, _dlse, _drel, _do_attn):
    return (*_gradients(ctx.saved_tensors, ctx.args, dout, _bwd_op, eager=False), None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _launch_backward(dout, q, k, v, o_attn, lse, rel, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls, residual_pooling,
                     tabs=None):
    with torch.cuda.device(q.device) if q.is_cuda else _nullcontext():
        return _kernels.backward(
            dout, q, k, v, o_attn, lse, rel, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling,
            tabs=tabs,
        )


class _EagerTritonAttention(torch.autograd.Function):
    """The same kernels and gradients as the registered op, without the op's dispatch: in eager
    mode ``torch.library.custom_op`` adds about 0.75 ms of host time per call (its per-call
    checks, measured with cProfile on an H100 host, torch 2.11), more than the kernels take at
    MViT's later blocks. torch.compile traces the registered op instead (``triton_pooling_attention``)."""

    @staticmethod
    def forward(ctx, q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, thw_q, thw_kv, has_cls, residual_pooling, for_backward):
        with torch.cuda.device(q.device) if q.is_cuda else _nullcontext():
            # Built once and kept for the backward (the concatenated fp32 tables, the indices).
            tabs = _kernels.RelTables(q, thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w)
            out, lse, rel, o_attn = _kernels.forward(
                q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling, for_backward, tabs=tabs
            )
        ctx.save_for_backward(q, k, v, o_attn if residual_pooling else out, lse, rel, rel_pos_t, rel_pos_h, rel_pos_w)
        ctx.args = (thw_q, thw_kv, has_cls, residual_pooling, tabs)
        ctx.mark_non_differentiable(lse, rel, o_attn)
        return out, lse, rel, o_attn

    @staticmethod
    @first_order_only("pooling_attention")
    def backward(ctx, dout, _dlse, _drel, _do_attn):
        return (*_gradients(ctx.saved_tensors, ctx.args, dout, _launch_backward, eager=True),
                None, None, None, None, None)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------
# FLOP formulas: what FlopCounterMode counts for the reference path, so fused and reference
# models report the same FLOPs. Reference forward: q k^T and attn v (2 bmm) plus one einsum per
# rel-pos axis (q . R over the grid rows, K_axis columns). Reference backward: 2 bmm per
# forward bmm, 2 per einsum. The backward op covers the attention bmms and the rel-pos term of
# dq; the tables' einsum runs in torch (rel_table_grads) and is counted there.
# ------------------------------------------------------------------------------------------


def _rel_flops(q_shape, thw_q, thw_kv, has_t: bool, has_hw: bool) -> int:
    B, H, _, D = q_shape
    n_grid = thw_q[0] * thw_q[1] * thw_q[2]
    cols = (thw_kv[0] if has_t else 0) + ((thw_kv[1] + thw_kv[2]) if has_hw else 0)
    return 2 * B * H * n_grid * D * cols


@register_flop_formula(torch.ops.mvit_kernels.pooling_attention_triton)
def _fwd_flops(q_shape, k_shape, v_shape, t_shape, h_shape, w_shape, thw_q, thw_kv, *args, out_shape=None, **kwargs) -> int:
    B, H, n_q, D = q_shape
    n_kv = k_shape[2]
    return 2 * (2 * B * H * n_q * n_kv * D) + _rel_flops(q_shape, thw_q, thw_kv, t_shape is not None, h_shape is not None)


@register_flop_formula(torch.ops.mvit_kernels.pooling_attention_triton_backward)
def _bwd_flops(dout_shape, q_shape, k_shape, v_shape, out_shape_, lse_shape, rel_shape, t_shape, h_shape, w_shape,
               thw_q, thw_kv, *args, out_shape=None, **kwargs) -> int:
    B, H, n_q, D = q_shape
    n_kv = k_shape[2]
    return 4 * (2 * B * H * n_q * n_kv * D) + _rel_flops(q_shape, thw_q, thw_kv, t_shape is not None, h_shape is not None)


# FlopCounterMode has formulas for the CUDA SDPA kernels only, so the CPU one (the fused path's
# attention on CPU, the class token's row of the last block) counted as nothing: a fused model's
# FLOPs on CPU tensors were 15% short of the same count on meta. The same formulas for it.
_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _CPU_SDPA is not None and _CPU_SDPA not in flop_registry:

    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)

_CPU_SDPA_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
if _CPU_SDPA_BACKWARD is not None and _CPU_SDPA_BACKWARD not in flop_registry:

    @register_flop_formula(_CPU_SDPA_BACKWARD)
    def _cpu_sdpa_backward_flops(grad_out_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, q_shape, k_shape, v_shape)


# ------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------


def triton_pooling_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    thw_q: Sequence[int],
    thw_kv: Sequence[int],
    has_cls: bool = True,
    rel_pos_t: Optional[Tensor] = None,
    rel_pos_h: Optional[Tensor] = None,
    rel_pos_w: Optional[Tensor] = None,
    residual_pooling: bool = False,
) -> Tensor:
    """The Triton path, whatever the device (CPU tensors need ``TRITON_INTERPRET=1``). Same
    contract as :func:`mvit_kernels.reference.pooling_attention`."""
    if _kernels is None:
        raise RuntimeError("triton_pooling_attention needs Triton, which is not installed")
    q, k, v, rel_pos_t, rel_pos_h, rel_pos_w = autocast.for_compute(q, k, v, rel_pos_t, rel_pos_h, rel_pos_w)
    thw_q, thw_kv = check_attention_args(
        q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling
    )
    if not _kernels.supports(q, thw_kv, rel_pos_t is not None or rel_pos_h is not None):
        raise ValueError(
            f"the Triton kernel does not cover dtype={q.dtype}, head_dim={q.shape[-1]} (max 128), "
            f"kv grid {thw_kv} with rel-pos (T+H+W max 64)"
        )
    return _run_triton(q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling)


def _run_triton(q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling) -> Tensor:
    """The Triton kernels on checked arguments: tables interpolated to the grids (in torch, so
    autograd covers it), then the registered op where it must be seen (tracing, dispatch modes)
    or the eager Function."""
    tables = []
    for axis, table in enumerate((rel_pos_t, rel_pos_h, rel_pos_w)):
        if table is not None:
            table = reference.interpolate_rel_pos(table, reference.rel_pos_table_length(thw_q[axis], thw_kv[axis]))
        tables.append(table)
    for_backward = needs_grad((q, k, v, *tables))
    op = _fwd_op if traced_or_intercepted(q) else _EagerTritonAttention.apply
    out, _, _, _ = op(q, k, v, *tables, list(thw_q), list(thw_kv), bool(has_cls), bool(residual_pooling), for_backward)
    return out


def prefers_triton(is_cuda: bool, has_rel: bool) -> bool:
    """Which implementation :func:`pooling_attention` wants, by measurement (H100, bf16, MViT-B
    16x4 shapes, batch 8, fwd+bwd; ``bench/results/gpu_NVIDIA_H100_80GB_HBM3_2026-11-24``): with
    MViTv2's rel-pos bias the Triton kernels are 1.3-2.3x faster than SDPA with a materialized
    bias; without it SDPA (cuDNN / FlashAttention) is 1.4-3.8x faster than them, so plain
    attention takes SDPA (residual pooling then adds q in torch). CPU tensors always take SDPA."""
    return is_cuda and has_rel


def uses_triton(q: Tensor, thw_kv: Sequence[int], has_rel: bool) -> bool:
    """The dispatch rule of :func:`pooling_attention`: Triton on CUDA with rel-pos, where the
    kernels apply (:func:`prefers_triton`, ``supports``)."""
    return prefers_triton(q.is_cuda, has_rel) and _triton_applies(q, thw_kv, has_rel)


def pooling_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    thw_q: Sequence[int],
    thw_kv: Sequence[int],
    has_cls: bool = True,
    rel_pos_t: Optional[Tensor] = None,
    rel_pos_h: Optional[Tensor] = None,
    rel_pos_w: Optional[Tensor] = None,
    residual_pooling: bool = False,
) -> Tensor:
    """Same contract as :func:`mvit_kernels.reference.pooling_attention`. On CUDA, where the
    Triton kernels apply and :mod:`mvit_kernels.tuning` is on, each shape runs whichever of them
    and SDPA timed faster; :func:`prefers_triton` is the choice without tuning."""
    q, k, v, rel_pos_t, rel_pos_h, rel_pos_w = autocast.for_compute(q, k, v, rel_pos_t, rel_pos_h, rel_pos_w)
    thw_q, thw_kv = check_attention_args(
        q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling
    )
    has_rel = rel_pos_t is not None or rel_pos_h is not None
    args = (q, k, v, list(thw_q), list(thw_kv), bool(has_cls), rel_pos_t, rel_pos_h, rel_pos_w, bool(residual_pooling))
    if in_functorch_transform():
        # torch.func cannot run the Triton op's autograd (see _dispatch), nor vmap SDPA's CPU
        # kernel with a mask that requires grad.
        return reference.pooling_attention(*args)
    if _triton_applies(q, thw_kv, has_rel):  # already checked
        default = "triton" if prefers_triton(True, has_rel) else "sdpa"
        return tuning.select("pooling_attention", _CANDIDATES, args, default, trusted="sdpa")(*args)
    return _sdpa_pooling_attention(*args)


def _triton_applies(q: Tensor, thw_kv: Sequence[int], has_rel: bool) -> bool:
    """Whether the Triton kernels are a candidate: CUDA tensors they cover."""
    return _kernels is not None and q.is_cuda and _kernels.supports(q, thw_kv, has_rel)


_CANDIDATES = {"triton": _run_triton, "sdpa": _sdpa_pooling_attention}
