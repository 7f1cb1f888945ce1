"""pool_residual_add, fused path: the C++/CUDA op ``torch.ops.mvit_kernels.pool_residual_add``.

out = maxpool_skip(x) + scale[:, None, None] * branch in one pass over the output: each output
token takes the max over its window of x and adds the (scaled) branch; the pooled skip is never
materialized. The class token is passed through unpooled. Kernels: csrc/cpu/pool_ops_cpu.cpp and
csrc/cuda/pool_ops_cuda.cu (index math shared with pool3d in csrc/pool3d_common.h).

Registered here: autograd (backward op ``pool_residual_add_backward``: gradients to x, branch
and scale; max routes to the first arg-max as PyTorch does; eager calls take the same op and
backward through ``_EagerPoolResidualAdd``, which costs less host time), fake implementations and FLOP
formulas (0: FlopCounterMode counts nothing for the reference's max pooling and add).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import _extension, autocast, reference, tuning
from ._autograd import first_order_only
from ._dispatch import in_functorch_transform, traced_or_intercepted
from .checks import as_op_error, check_grad_shape, check_pool_residual_add_args

_extension.load()


def pool_residual_add(
    x: Tensor,
    thw: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    branch: Tensor,
    scale: Optional[Tensor] = None,
    has_cls: bool = True,
) -> Tensor:
    """Same contract as :func:`mvit_kernels.reference.pool_residual_add`. Where
    :mod:`mvit_kernels.tuning` is on (CUDA by default), each shape runs whichever of the op and the
    reference (in either grid layout) timed faster."""
    x, branch, scale = autocast.for_add(x, branch, scale)
    thw, kernel, stride, padding, _ = check_pool_residual_add_args(
        x, thw, kernel, stride, padding, branch, scale, has_cls
    )
    _extension.require()
    args = (x, list(thw), list(kernel), list(stride), list(padding), branch, scale, bool(has_cls))
    if in_functorch_transform():  # torch.func cannot run the op's autograd (see _dispatch)
        return reference.pool_residual_add(*args)
    # The CUDA backward adds scale's gradient with float atomics.
    return tuning.select("pool_residual_add", _CANDIDATES, args, "fused", trusted="reference",
                         deterministic="reference" if (scale is not None and scale.requires_grad) else None)(*args)


def _fused_op(x, thw, kernel, stride, padding, branch, scale, has_cls):
    if traced_or_intercepted(x):
        return torch.ops.mvit_kernels.pool_residual_add(x, thw, kernel, stride, padding, branch, scale, has_cls)
    return _EagerPoolResidualAdd.apply(x, branch, scale, (thw, kernel, stride, padding, has_cls))


# The reference in both grid layouts, as pool3d's candidates.
_CANDIDATES = {
    "fused": _fused_op,
    "reference": reference.pool_residual_add,
    "reference-ncdhw": functools.partial(reference.pool_residual_add, contiguous_grid=True),
}


def _gradients(ctx, grad_out):
    """(grad_x, grad_branch, grad_scale) from the backward op; grad_scale None without a scale."""
    x, branch, scale = ctx.saved_tensors
    thw, kernel, stride, padding, has_cls = ctx.window
    grad_x, grad_branch, grad_scale = torch.ops.mvit_kernels.pool_residual_add_backward(
        grad_out, x, thw, kernel, stride, padding, branch, scale, has_cls
    )
    return grad_x, grad_branch, grad_scale if scale is not None else None


class _EagerPoolResidualAdd(torch.autograd.Function):
    """The registered op and its backward without the registration's Python autograd wrapper in
    eager mode (host time, see ``pool3d._EagerPool3d``); torch.compile and dispatch modes use the
    registered op."""

    @staticmethod
    def forward(ctx, x, branch, scale, window):
        thw, kernel, stride, padding, has_cls = window
        ctx.save_for_backward(x, branch, scale)
        ctx.window = window
        with torch._C._AutoDispatchBelowAutograd():  # as _EagerPool3d: straight to the kernel
            return torch.ops.mvit_kernels.pool_residual_add(x, thw, kernel, stride, padding, branch, scale, has_cls)

    @staticmethod
    @first_order_only("pool_residual_add")
    def backward(ctx, grad_out):
        return (*_gradients(ctx, grad_out), None)


if _extension.load():

    # The fakes check as the op does (csrc/pool_args.cpp): a call the op refuses fails when traced
    # too, instead of taking the branch's shape and failing only when the traced program runs.
    @torch.library.register_fake("mvit_kernels::pool_residual_add")
    def _fake(x, thw, kernel, stride, padding, branch, scale, has_cls):
        with as_op_error("mvit_kernels.pool_residual_add"):
            check_pool_residual_add_args(x, thw, kernel, stride, padding, branch, scale, has_cls)
        return branch.new_empty(branch.shape)

    @torch.library.register_fake("mvit_kernels::pool_residual_add_backward")
    def _backward_fake(grad_out, x, thw, kernel, stride, padding, branch, scale, has_cls):
        with as_op_error("mvit_kernels.pool_residual_add_backward"):
            check_pool_residual_add_args(x, thw, kernel, stride, padding, branch, scale, has_cls)
            check_grad_shape(grad_out, branch.shape, "grad_out", x)
        grad_scale = x.new_empty((x.shape[0],)) if scale is not None else x.new_empty((0,))
        return x.new_empty(x.shape), branch.new_empty(branch.shape), grad_scale

    def _setup_context(ctx, inputs, output):
        x, thw, kernel, stride, padding, branch, scale, has_cls = inputs
        ctx.save_for_backward(x, branch, scale)
        ctx.window = (thw, kernel, stride, padding, has_cls)

    @first_order_only("pool_residual_add")
    def _backward(ctx, grad_out):
        grad_x, grad_branch, grad_scale = _gradients(ctx, grad_out)
        return grad_x, None, None, None, None, grad_branch, grad_scale, None

    torch.library.register_autograd("mvit_kernels::pool_residual_add", _backward, setup_context=_setup_context)

    @register_flop_formula(torch.ops.mvit_kernels.pool_residual_add)
    def _flops(*args, out_shape=None, **kwargs) -> int:
        return 0

    @register_flop_formula(torch.ops.mvit_kernels.pool_residual_add_backward)
    def _backward_flops(*args, out_shape=None, **kwargs) -> int:
        return 0
