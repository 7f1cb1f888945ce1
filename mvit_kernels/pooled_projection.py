"""Pooled Q/K/V projection, fused path.

One slice (q, k or v) of the qkv Linear applied to x (B, N, C), split into heads, pooled over the
token grid and LayerNorm-ed: the contract of :func:`mvit_kernels.reference.pooled_projection`.

- CUDA tensors where :func:`use_fused_projection` says so (recompute factor <= 2, the byte/FLOP
  model's crossover: kernel 3 with strides (1,8,8) and (1,4,4), MViT-B's blocks 0-2): the Triton
  kernel of :mod:`mvit_kernels.triton.pooled_projection`, which projects only the tokens some
  window reads and never writes the projected slice.
- Elsewhere (CPU tensors, other GPUs, strides the rule does not fuse): the gathered path where
  the pooling windows leave tokens unread (a stride larger than the kernel along some axis:
  MViT's K/V pooling at 1x8x8 and 1x4x4), else the composed path. Composed: the projection of
  every token (``mvit_kernels.linear``: oneDNN for CPU inference, ``F.linear`` otherwise) and the
  ``mvit_kernels.pool3d`` op on the (B, heads, N, d) view (the reference ``pool3d`` where the
  C++ extension is not built). Gathered: the same on the tokens some window reads, copied out
  of x first (one ``index_select``), pooled on their smaller grid with the stride set to the
  kernel, which gives every window the same taps (:func:`read_grid`). Each token is projected
  at most once, so it does fewer multiply-adds than both the composed path and the Triton
  kernel (which recomputes overlaps along t): 1.49 GFLOPs (multiply-adds) fewer than the
  reference for MViT-B 16x4.
- :func:`triton_pooled_projection` forces the Triton kernel (on CPU tensors it needs
  ``TRITON_INTERPRET=1``; the tests use it that way).

Registration: ``torch.library.custom_op`` ("mvit_kernels::pooled_projection_triton"), for the
reason given in :mod:`mvit_kernels.pooling_attention`: it is the registration whose
``torch.compile(fullgraph=True)``, ``opcheck`` and FLOP formula the CPU CI can prove.

Backward: the Triton backward kernel (:func:`mvit_kernels.triton.pooled_projection.backward`,
registered as its own op "mvit_kernels::pooled_projection_triton_backward" so that torch.compile
traces it), every mode: it recomputes the pooled value tile by tile (the forward saves nothing
extra; for max the recompute also finds the tap each output took, torch's first-maximum rule),
runs the LayerNorm backward on chip and goes back through the taps, accumulating dx, dW, d bias,
d pool_weight and the LayerNorm parameters' gradients with fp32 atomics. The backward's tiles
differ from the forward's, so for max two taps within rounding of each other may be ordered
differently than in the forward: the gradient then goes to the other one of a (near-)tie, as
any recompute-based max backward would.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import _extension, autocast, reference, tuning
from ._autograd import first_order_only
from ._dispatch import cached_constant, in_functorch_transform, traced_or_intercepted
from .checks import (PROJECTION_SLICES, as_op_error, check_grad_shape, check_pooled_projection_args, pool_output_size,
                     pool_output_thw as _out_thw)
from .linear import linear as _linear
from .pool3d import pool3d as _pool3d

try:
    from .triton import pooled_projection as _kernels
    from .triton.pooling_attention import covers as _triton_covers
except ImportError:  # no Triton in this environment: the composed path everywhere
    _kernels = _triton_covers = None


def _slice_rows(weight: Tensor, which: str) -> slice:
    A = weight.shape[0] // 3
    i = PROJECTION_SLICES.index(which)
    return slice(i * A, (i + 1) * A)


# ------------------------------------------------------------------------------------------
# The registered op
# ------------------------------------------------------------------------------------------


def _launch(x, weight, bias, pool_weight, norm_weight, norm_bias, which, num_heads, thw, kernel, stride, padding,
            mode, has_cls, eps):
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        return _kernels.forward(
            x, weight, bias, PROJECTION_SLICES.index(which), num_heads, list(thw), list(kernel), list(stride),
            list(padding), mode, pool_weight, bool(has_cls), norm_weight, norm_bias, float(eps),
        )


@torch.library.custom_op("mvit_kernels::pooled_projection_triton", mutates_args=())
def _fwd_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    pool_weight: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    which: str,
    num_heads: int,
    thw: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    mode: str,
    has_cls: bool,
    eps: float,
) -> Tensor:
    """y (B, heads, N_out, d), contiguous."""
    _check_op("mvit_kernels.pooled_projection_triton", x, weight, bias, pool_weight, norm_weight, norm_bias, which,
              num_heads, thw, kernel, stride, padding, mode, has_cls, eps)
    return _launch(x, weight, bias, pool_weight, norm_weight, norm_bias, which, num_heads, thw, kernel, stride,
                   padding, mode, has_cls, eps)


@_fwd_op.register_fake
def _fwd_fake(x, weight, bias, pool_weight, norm_weight, norm_bias, which, num_heads, thw, kernel, stride, padding,
              mode, has_cls, eps):
    return x.new_empty(_check_op("mvit_kernels.pooled_projection_triton", x, weight, bias, pool_weight, norm_weight,
                                 norm_bias, which, num_heads, thw, kernel, stride, padding, mode, has_cls, eps))


def _check_op(op: str, x, weight, bias, pool_weight, norm_weight, norm_bias, which, num_heads, thw, kernel, stride,
              padding, mode, has_cls, eps, grad_y=None) -> tuple[int, int, int, int]:
    """The registered ops' own checks, in their bodies and fakes (torch.compile, torch.export and
    direct callers reach them without :func:`pooled_projection`'s); returns y's shape."""
    with as_op_error(op):
        thw, kernel, stride, padding = check_pooled_projection_args(
            x, weight, bias, which, num_heads, thw, kernel, stride, padding, mode, pool_weight, has_cls, norm_weight,
            norm_bias, eps)
        t, h, w = _out_thw(thw, kernel, stride, padding)
        shape = (x.shape[0], num_heads, t * h * w + (1 if has_cls else 0), weight.shape[0] // 3 // num_heads)
        if grad_y is not None:
            check_grad_shape(grad_y, shape, "grad_y", x)
    return shape


def _launch_backward(grad_y, x, weight, bias, pool_weight, norm_weight, norm_bias, which, num_heads, thw, kernel,
                     stride, padding, mode, has_cls, eps):
    """(dx, dweight, dbias, dpool_weight, dnorm_weight, dnorm_bias), None where the input is None."""
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        return _kernels.backward(
            grad_y, x, weight, bias, PROJECTION_SLICES.index(which), num_heads, list(thw), list(kernel), list(stride),
            list(padding), mode, pool_weight, bool(has_cls), norm_weight, norm_bias, float(eps),
        )


@torch.library.custom_op("mvit_kernels::pooled_projection_triton_backward", mutates_args=())
def _bwd_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    pool_weight: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    which: str,
    num_heads: int,
    thw: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    mode: str,
    has_cls: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dweight (3A, C), dbias, dpool_weight, dnorm_weight, dnorm_bias); an absent
    input's gradient (and dpool_weight outside mode conv) is an empty (0,) tensor."""
    _check_op("mvit_kernels.pooled_projection_triton_backward", x, weight, bias, pool_weight, norm_weight, norm_bias,
              which, num_heads, thw, kernel, stride, padding, mode, has_cls, eps, grad_y)
    grads = _launch_backward(grad_y, x, weight, bias, pool_weight, norm_weight, norm_bias, which, num_heads, thw,
                             kernel, stride, padding, mode, has_cls, eps)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@_bwd_op.register_fake
def _bwd_fake(grad_y, x, weight, bias, pool_weight, norm_weight, norm_bias, which, num_heads, thw, kernel, stride,
              padding, mode, has_cls, eps):
    _check_op("mvit_kernels.pooled_projection_triton_backward", x, weight, bias, pool_weight, norm_weight, norm_bias,
              which, num_heads, thw, kernel, stride, padding, mode, has_cls, eps, grad_y)

    def like(t, used=True):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if (t is not None and used) else x.new_empty(0)

    return like(x), like(weight), like(bias), like(pool_weight, mode == "conv"), like(norm_weight), like(norm_bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, pool_weight, norm_weight, norm_bias, *args = inputs
    ctx.save_for_backward(x, weight, bias, pool_weight, norm_weight, norm_bias)
    ctx.args = tuple(args)


def _gradients(ctx, grad_y, backward):
    """The six input gradients from the Triton backward (``backward``: the registered op when
    traced, the plain launcher eagerly); None where the input is absent or needs no gradient."""
    grads = backward(grad_y, *ctx.saved_tensors, *ctx.args)
    saved = ctx.saved_tensors
    return tuple(g if (t is not None and need) else None for g, t, need in zip(grads, saved, ctx.needs_input_grad))


@first_order_only("pooled_projection")
def _backward(ctx, grad_y):
    return (*_gradients(ctx, grad_y, _bwd_op), *([None] * len(ctx.args)))


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerTritonProjection(torch.autograd.Function):
    """The same kernel and backward as the registered op, without the op's per-call dispatch
    overhead in eager mode (see ``_EagerTritonAttention``); torch.compile and dispatch modes use
    the registered op."""

    @staticmethod
    def forward(ctx, x, weight, bias, pool_weight, norm_weight, norm_bias, *args):
        y = _launch(x, weight, bias, pool_weight, norm_weight, norm_bias, *args)
        ctx.save_for_backward(x, weight, bias, pool_weight, norm_weight, norm_bias)
        ctx.args = args
        return y

    @staticmethod
    @first_order_only("pooled_projection")
    def backward(ctx, grad_y):
        return (*_gradients(ctx, grad_y, _launch_backward), *([None] * len(ctx.args)))


# ------------------------------------------------------------------------------------------
# FLOPs: what the kernels do (they skip unread tokens, so they count fewer than the reference's
# full F.linear; bench scripts report both). The backward kernel's dots: the forward's recompute
# plus dW and dx (each as many as the forward's): 3x the forward; conv recomputes the projection
# a second time for d pool_weight: 4x.
# ------------------------------------------------------------------------------------------


@register_flop_formula(torch.ops.mvit_kernels.pooled_projection_triton)
def _fwd_flops(x_shape, weight_shape, bias_shape, pw_shape, nw_shape, nb_shape, which, num_heads, thw, kernel, stride,
               padding, mode, has_cls, *args, out_shape=None, **kwargs) -> int:
    B, _, C = x_shape
    A = weight_shape[0] // 3
    rows = _kernels.projected_rows(thw, kernel, stride, padding, has_cls) if _kernels else 0
    return 2 * B * num_heads * rows * C * (A // num_heads)


@register_flop_formula(torch.ops.mvit_kernels.pooled_projection_triton_backward)
def _bwd_flops(grad_y_shape, x_shape, weight_shape, bias_shape, pw_shape, nw_shape, nb_shape, which, num_heads, thw,
               kernel, stride, padding, mode, has_cls, *args, out_shape=None, **kwargs) -> int:
    fwd = _fwd_flops(x_shape, weight_shape, bias_shape, pw_shape, nw_shape, nb_shape, which, num_heads, thw, kernel,
                     stride, padding, mode, has_cls)
    return (4 if mode == "conv" else 3) * fwd


def reference_projection_flops(x_shape: Sequence[int], weight_shape: Sequence[int]) -> int:
    """What FlopCounterMode counts for the unfused path's projection of that slice: F.linear of
    all N tokens, (B*N, C) x (C, A)."""
    B, N, C = x_shape
    return 2 * B * N * C * (weight_shape[0] // 3)


# ------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------


def use_fused_projection(kernel: Sequence[int], stride: Sequence[int], thw: Sequence[int],
                         padding: Optional[Sequence[int]] = None) -> bool:
    """The dispatch rule (see :func:`mvit_kernels.triton.pooled_projection.use_fused_projection`);
    False where Triton is not installed."""
    return _kernels is not None and _kernels.use_fused_projection(kernel, stride, thw, padding)


def triton_pooled_projection(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    which: str,
    num_heads: int,
    thw: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    mode: str,
    pool_weight: Optional[Tensor] = None,
    has_cls: bool = True,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-6,
) -> tuple[Tensor, tuple[int, int, int]]:
    """The Triton path, whatever the device and stride (CPU tensors need ``TRITON_INTERPRET=1``).
    Same contract as :func:`mvit_kernels.reference.pooled_projection`."""
    if _kernels is None:
        raise RuntimeError("triton_pooled_projection needs Triton, which is not installed")
    x, weight, bias, pool_weight, norm_weight, norm_bias = autocast.for_compute(
        x, weight, bias, pool_weight, norm_weight, norm_bias
    )
    thw, kernel, stride, padding = check_pooled_projection_args(
        x, weight, bias, which, num_heads, thw, kernel, stride, padding, mode, pool_weight, has_cls, norm_weight,
        norm_bias, eps
    )
    _kernels.device_cc(x)  # a GPU before Ampere (or a CPU without the interpreter): a clear error
    if not _kernel_covers(x, weight, num_heads):
        raise ValueError(
            f"the Triton kernel does not cover dtype={x.dtype}, head_dim={weight.shape[0] // 3 // num_heads} (max 128)"
        )
    return _run_triton(x, weight, bias, which, num_heads, thw, kernel, stride, padding, mode,
                       pool_weight, has_cls, norm_weight, norm_bias, eps)


def _kernel_covers(x: Tensor, weight: Tensor, num_heads: int) -> bool:
    """Whether the Triton kernel handles x's dtype and device, the head dim and the (batch, head)
    grid (the attention kernels' rule, ``triton.pooling_attention.covers``)."""
    return _kernels is not None and _triton_covers(x, x.shape[0] * num_heads, weight.shape[0] // 3 // num_heads)


def _run_triton(x, weight, bias, which, num_heads, thw, kernel, stride, padding, mode,
                pool_weight, has_cls, norm_weight, norm_bias, eps):
    """The Triton kernel on arguments already cast and checked: the registered op where it must be
    seen (tracing, dispatch modes), the eager Function otherwise."""
    op = _fwd_op if traced_or_intercepted(x) else _EagerTritonProjection.apply
    y = op(x, weight, bias, pool_weight, norm_weight, norm_bias, which, int(num_heads), list(thw), list(kernel),
           list(stride), list(padding), mode, bool(has_cls), float(eps))
    return y, _out_thw(thw, kernel, stride, padding)


#: Set to "0" to keep the K/V projection unfused on CUDA (the kernel has passed the interpreter
#: and AOT checks but not yet run on a GPU; see README).
ENV_SWITCH = "MVIT_KERNELS_FUSED_PROJECTION"


def fused_projection_enabled() -> bool:
    """False when ``MVIT_KERNELS_FUSED_PROJECTION=0``."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def uses_triton(x: Tensor, weight: Tensor, num_heads: int, thw, kernel, stride, padding) -> bool:
    """The dispatch rule of :func:`pooled_projection`: Triton on CUDA where the kernel covers the
    dtype and head dim and the recompute factor is <= 2 (``use_fused_projection``), unless
    ``MVIT_KERNELS_FUSED_PROJECTION=0``."""
    return (
        fused_projection_enabled()
        and x.is_cuda
        and _kernel_covers(x, weight, num_heads)
        and _kernels.use_fused_projection(kernel, stride, thw, padding)
    )


def pooled_projection(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    which: str,
    num_heads: int,
    thw: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    mode: str,
    pool_weight: Optional[Tensor] = None,
    has_cls: bool = True,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-6,
) -> tuple[Tensor, tuple[int, int, int]]:
    """Same contract as :func:`mvit_kernels.reference.pooled_projection`; returns (y, thw_out)."""
    x, weight, bias, pool_weight, norm_weight, norm_bias = autocast.for_compute(
        x, weight, bias, pool_weight, norm_weight, norm_bias
    )
    thw, kernel, stride, padding = check_pooled_projection_args(
        x, weight, bias, which, num_heads, thw, kernel, stride, padding, mode, pool_weight, has_cls, norm_weight,
        norm_bias, eps
    )
    args = (x, weight, bias, which, int(num_heads), thw, kernel, stride, padding, mode, pool_weight, bool(has_cls),
            norm_weight, norm_bias, float(eps))
    if in_functorch_transform():  # torch.func cannot run the ops' autograd (see _dispatch)
        return reference.pooled_projection(*args)
    if uses_triton(x, weight, num_heads, thw, kernel, stride, padding):  # already cast and checked
        # The dispatch rule is a byte/FLOP model; where tuning is on, the clock decides per shape.
        # The Triton backward accumulates every gradient with atomics; composed runs pool3d, which
        # takes its reference there.
        return tuning.select("pooled_projection", _CANDIDATES, args, "triton", trusted="composed",
                             deterministic="composed")(*args)
    return _gathered(*args)


def _composed(x, weight, bias, which, num_heads, thw, kernel, stride, padding, mode, pool_weight, has_cls, norm_weight,
              norm_bias, eps):
    """The projection of every token (the slice's rows of the qkv Linear), then pool3d on the
    (B, heads, N, d) view."""
    B, N, _ = x.shape
    rows = _slice_rows(weight, which)
    A = rows.stop - rows.start
    proj = _linear(x, weight[rows], None if bias is None else bias[rows])
    heads = proj.view(B, N, num_heads, A // num_heads).transpose(1, 2)
    pool = _pool3d if _extension.load() else reference.pool3d
    return pool(heads, thw, kernel, stride, padding, mode, pool_weight, has_cls, norm_weight, norm_bias, eps)


# ------------------------------------------------------------------------------------------
# The gathered path: only the tokens some pooling window reads are projected
# ------------------------------------------------------------------------------------------


def _read_axis(size: int, kernel: int, stride: int, padding: int) -> Optional[int]:
    """How many positions of one axis some window reads, where windows leave gaps between them
    (stride >= kernel) and that is fewer than ``size``; else None.

    Window o covers [o*s - p, o*s - p + k). With s >= k the windows are disjoint: all but the
    first (p positions in the padding) and possibly the last (cut by the end of the axis) lie
    whole inside it. Listed in order, the read positions therefore form a grid on which pooling
    with stride k, the same kernel and the same padding visits exactly the same taps of every
    window, with the same kernel offsets, and the same output length."""
    if stride < kernel:
        return None
    n_out = pool_output_size(size, kernel, stride, padding)
    cut_at_end = max(0, (n_out - 1) * stride - padding + kernel - size)
    read = n_out * kernel - padding - cut_at_end
    # An axis with one window cut at both ends can read fewer positions than the kernel: left
    # whole, as avg pooling (and torch's avg_pool3d) refuses a grid shorter than the kernel.
    return read if kernel <= read < size else None


def read_grid(thw: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
              padding: Sequence[int]) -> Optional[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """(thw_read, stride_read): the grid of the tokens some pooling window reads and the stride
    that pools it to the same output (the kernel's along the axes that shrank), or None where
    every token is read. Padding and kernel are unchanged."""
    axes = [_read_axis(n, k, s, p) for n, k, s, p in zip(thw, kernel, stride, padding)]
    if all(a is None for a in axes):
        return None
    thw_read = tuple(n if a is None else a for n, a in zip(thw, axes))
    stride_read = tuple(s if a is None else k for s, k, a in zip(stride, kernel, axes))
    return thw_read, stride_read  # type: ignore[return-value]


def read_token_index(thw: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                     has_cls: bool, device=None) -> Tensor:
    """The token indices (into x's N) that :func:`read_grid` keeps, in order, the class token
    first. Built on ``device`` with arange arithmetic: a list copied to a GPU would synchronize
    with it on every call."""
    geometry = read_grid(thw, kernel, stride, padding)
    thw_read = geometry[0] if geometry is not None else tuple(thw)
    per_axis = []
    for n, k, s, p, r in zip(thw, kernel, stride, padding, thw_read):
        if r == n:
            per_axis.append(torch.arange(n, device=device))
            continue
        # Window o's taps o*s - p + j, in order; the first p lie in the padding, the last
        # n_out*k - p - r beyond the axis.
        taps = torch.arange(pool_output_size(n, k, s, p), device=device)[:, None] * s - p + torch.arange(k, device=device)[None, :]
        per_axis.append(taps.flatten()[p:p + r])
    it, ih, iw = per_axis
    T, H, W = thw
    grid = ((it[:, None, None] * H + ih[None, :, None]) * W + iw[None, None, :]).flatten()
    if has_cls:
        grid = torch.cat((torch.zeros(1, dtype=grid.dtype, device=device), grid + 1))
    return grid


#: (thw, kernel, stride, padding, has_cls, device) -> read_token_index, for eager calls.
_READ_INDEX_CACHE: dict = {}


def _gathered(x, weight, bias, which, num_heads, thw, kernel, stride, padding, mode, pool_weight, has_cls,
              norm_weight, norm_bias, eps):
    """The composed path on the tokens some window reads (:func:`read_grid`), or on all of x
    where every token is read."""
    geometry = read_grid(thw, kernel, stride, padding)
    if geometry is None:
        return _composed(x, weight, bias, which, num_heads, thw, kernel, stride, padding, mode, pool_weight, has_cls,
                         norm_weight, norm_bias, eps)
    thw_read, stride_read = geometry
    # Eagerly the index is built once per geometry and device (a few small launches on a GPU); in
    # a traced graph it is built in the graph, as a cached tensor would leak between fake and
    # real modes.
    if traced_or_intercepted(x):
        index = read_token_index(thw, kernel, stride, padding, has_cls, x.device)
    else:
        key = (tuple(thw), tuple(kernel), tuple(stride), tuple(padding), bool(has_cls), str(x.device))
        index = cached_constant(_READ_INDEX_CACHE, key,
                                lambda: read_token_index(thw, kernel, stride, padding, has_cls, x.device))
    x_read = x.index_select(1, index)
    return _composed(x_read, weight, bias, which, num_heads, thw_read, kernel, stride_read, padding, mode,
                     pool_weight, has_cls, norm_weight, norm_bias, eps)


def saves_projection(x: Tensor, weight: Tensor, num_heads: int, thw, kernel, stride, padding) -> bool:
    """Whether :func:`pooled_projection` projects fewer tokens (or writes fewer bytes) than the
    projection of every token followed by pool3d: the Triton kernel (:func:`uses_triton`) or
    the gathered path (:func:`read_grid`). The model projects k and v through it where it does."""
    return (uses_triton(x, weight, num_heads, thw, kernel, stride, padding)
            or read_grid(thw, kernel, stride, padding) is not None)


_CANDIDATES = {"triton": _run_triton, "gathered": _gathered, "composed": _composed}
