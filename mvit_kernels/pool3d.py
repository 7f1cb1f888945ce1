"""pool3d, fused path: the C++/CUDA op ``torch.ops.mvit_kernels.pool3d``.

Pools the T*H*W token grid of every head (max | avg | depthwise conv) and applies the optional
LayerNorm over d in one pass, directly in the (B, heads, N, d) layout: no reshape, transpose or
contiguous copy (x may be a strided view such as q/k/v sliced out of the qkv projection, as long
as d is contiguous). Kernels: csrc/cpu/pool_ops_cpu.cpp and csrc/cuda/pool_ops_cuda.cu, with the
index math shared in csrc/pool3d_common.h; the schema is in csrc/ops.cpp.

Registered here, on the C++ op: autograd (its backward is the C++ op ``pool3d_backward``; eager
calls take the same op and backward through ``_EagerPool3d``, which costs less host time), fake
implementations of both ops (so ``torch.compile(fullgraph=True)`` traces through them) and FLOP
formulas (conv mode counts like the reference's depthwise ``F.conv3d``; max/avg/norm count 0, as
FlopCounterMode counts nothing for the reference's pooling and LayerNorm).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils import flop_counter
from torch.utils.flop_counter import register_flop_formula

from . import _extension, autocast, reference, tuning
from ._autograd import first_order_only
from ._dispatch import in_functorch_transform, traced_or_intercepted
from .checks import as_op_error, check_grad_shape, check_pool3d_args, pool_output_thw as _out_thw

_extension.load()  # registers torch.ops.mvit_kernels.* when the extension is built


def pool3d(
    x: Tensor,
    thw: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    mode: str,
    weight: Optional[Tensor] = None,
    has_cls: bool = True,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-6,
) -> tuple[Tensor, tuple[int, int, int]]:
    """Same contract as :func:`mvit_kernels.reference.pool3d`; returns (y, thw_out). Under
    autocast it computes in the autocast dtype (``mvit_kernels.autocast``). Where
    :mod:`mvit_kernels.tuning` is on (CUDA by default), each shape runs whichever of the op and the
    reference (in either grid layout) timed faster."""
    x, weight, norm_weight, norm_bias = autocast.for_compute(x, weight, norm_weight, norm_bias)
    thw, kernel, stride, padding = check_pool3d_args(
        x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight, norm_bias, eps
    )
    _extension.require()
    args = (x, list(thw), list(kernel), list(stride), list(padding), mode, weight, bool(has_cls), norm_weight,
            norm_bias, float(eps))
    if in_functorch_transform():  # torch.func cannot run the op's autograd (see _dispatch)
        return _reference_op(*args)
    # The CUDA backward adds the conv and norm parameters' gradients with float atomics.
    return tuning.select("pool3d", _CANDIDATES, args, "fused", trusted="reference", deterministic="reference")(*args)


def _fused_op(x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight, norm_bias, eps):
    if traced_or_intercepted(x):
        y = torch.ops.mvit_kernels.pool3d(x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight, norm_bias,
                                          eps)
    else:
        y = _EagerPool3d.apply(x, weight, norm_weight, norm_bias, (thw, kernel, stride, padding, mode, has_cls, eps))
    return y, _out_thw(thw, kernel, stride, padding)


def _reference_op(x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight, norm_bias, eps,
                  contiguous_grid=False):
    # In the op's output dtype: under autocast the reference's LayerNorm returns fp32.
    y, thw_out = reference.pool3d(x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight, norm_bias, eps,
                                  contiguous_grid)
    return y.to(x.dtype), thw_out


# The reference in both grid layouts (channels-last view, contiguous NCDHW copy): on CUDA they
# take different convolution and pooling kernels (reference.pool3d's contiguous_grid), and an H100
# run had the reference's channels-last depthwise backward at 18 ms for MViT-B's block-1 q pooling
# (batch 8), too slow to be the only alternative.
_CANDIDATES = {
    "fused": _fused_op,
    "reference": _reference_op,
    "reference-ncdhw": functools.partial(_reference_op, contiguous_grid=True),
}


def _gradients(ctx, grad_y):
    """(grad_x, grad_w, grad_norm_weight, grad_norm_bias) from the backward op; None for absent inputs."""
    x, weight, norm_weight, norm_bias = ctx.saved_tensors
    thw, kernel, stride, padding, mode, has_cls, eps = ctx.window
    grad_x, grad_w, grad_nw, grad_nb = torch.ops.mvit_kernels.pool3d_backward(
        grad_y, x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight, norm_bias, eps
    )
    if weight is None:
        grad_w = None
    if norm_weight is None:
        grad_nw = grad_nb = None
    return grad_x, grad_w, grad_nw, grad_nb


class _EagerPool3d(torch.autograd.Function):
    """The same op and backward as the registered autograd, with less host time per call in
    eager mode: the registration's Python autograd wrapper cost ~33 us a call with gradients
    (``fill_defaults`` most of it), this Function ~7 us (CPU, torch 2.14). torch.compile and
    dispatch modes (FlopCounterMode, fake tensors) use the registered op."""

    @staticmethod
    def forward(ctx, x, weight, norm_weight, norm_bias, window):
        thw, kernel, stride, padding, mode, has_cls, eps = window
        ctx.save_for_backward(x, weight, norm_weight, norm_bias)
        ctx.window = window
        # Straight to the CPU/CUDA kernel: this Function is the autograd, and the op's registered
        # Python autograd would only redispatch (~4 us a call).
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.mvit_kernels.pool3d(x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight,
                                                 norm_bias, eps)

    @staticmethod
    @first_order_only("pool3d")
    def backward(ctx, grad_y):
        return (*_gradients(ctx, grad_y), None)


if _extension.load():

    def _fake_output_shape(op, x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight, norm_bias, eps):
        # The op's checks (csrc/pool_args.cpp) in Python: a call the op refuses fails when traced
        # too, not later when the traced program runs (or with an unpacking error here).
        with as_op_error(op):
            check_pool3d_args(x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight, norm_bias, eps)
        t, h, w = _out_thw(thw, kernel, stride, padding)
        B, heads, _, d = x.shape
        return (B, heads, t * h * w + (1 if has_cls else 0), d)

    @torch.library.register_fake("mvit_kernels::pool3d")
    def _pool3d_fake(x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight, norm_bias, eps):
        return x.new_empty(_fake_output_shape("mvit_kernels.pool3d", x, thw, kernel, stride, padding, mode, weight,
                                              has_cls, norm_weight, norm_bias, eps))

    @torch.library.register_fake("mvit_kernels::pool3d_backward")
    def _pool3d_backward_fake(grad_y, x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight, norm_bias, eps):
        op = "mvit_kernels.pool3d_backward"
        y_shape = _fake_output_shape(op, x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight,
                                     norm_bias, eps)
        with as_op_error(op):
            check_grad_shape(grad_y, y_shape, "grad_y", x)
        d = x.shape[3]
        grad_w = x.new_empty(weight.shape) if mode == "conv" else x.new_empty((0,))
        norm_shape = (d,) if norm_weight is not None else (0,)
        return x.new_empty(x.shape), grad_w, x.new_empty(norm_shape), x.new_empty(norm_shape)

    def _setup_context(ctx, inputs, output):
        x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight, norm_bias, eps = inputs
        ctx.save_for_backward(x, weight, norm_weight, norm_bias)
        ctx.window = (thw, kernel, stride, padding, mode, has_cls, eps)

    @first_order_only("pool3d")
    def _backward(ctx, grad_y):
        grad_x, grad_w, grad_nw, grad_nb = _gradients(ctx, grad_y)
        return grad_x, None, None, None, None, None, grad_w, None, grad_nw, grad_nb, None

    torch.library.register_autograd("mvit_kernels::pool3d", _backward, setup_context=_setup_context)

    def _conv_flops(x_shape, thw, kernel, stride, padding, mode) -> int:
        if mode != "conv":
            return 0
        B, heads, _, d = x_shape
        t, h, w = _out_thw(thw, kernel, stride, padding)
        # FlopCounterMode's count for F.conv3d(grid, weight (d, 1, *kernel), groups=d) on
        # (B*heads, d, T, H, W): 2 * batch * out_positions * c_out * (c_in/groups) * prod(kernel).
        return 2 * B * heads * t * h * w * d * kernel[0] * kernel[1] * kernel[2]

    @register_flop_formula(torch.ops.mvit_kernels.pool3d)
    def _pool3d_flops(x_shape, thw, kernel, stride, padding, mode, *args, out_shape=None, **kwargs) -> int:
        return _conv_flops(x_shape, thw, kernel, stride, padding, mode)

    @register_flop_formula(torch.ops.mvit_kernels.pool3d_backward)
    def _pool3d_backward_flops(grad_shape, x_shape, thw, kernel, stride, padding, mode, *args, out_shape=None, **kwargs) -> int:
        if mode != "conv":
            return 0
        # Exactly what FlopCounterMode counts for the reference's convolution_backward (grad
        # input and grad weight) on the equivalent (B*heads, d, T, H, W) grid, so training
        # FLOP counts agree between fused=True and fused=False.
        B, heads, _, d = x_shape
        bh = B * heads
        out = _out_thw(thw, kernel, stride, padding)
        return flop_counter.conv_backward_flop(
            (bh, d, *out), (bh, d, *thw), (d, 1, *kernel), None, stride, padding, (1, 1, 1), False, (0, 0, 0), d,
            (True, True, False), out_val=((bh, d, *thw), (d, 1, *kernel), None),
        )
