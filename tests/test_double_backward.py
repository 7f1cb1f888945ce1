"""The fused ops' backwards are kernels, first-order only (mvit_kernels._autograd).

Under create_graph=True the first-order gradients are the reference's, and a second backward
through the op (a gradient penalty) raises an error that names it. Before, that second backward
silently left out the op's second-order terms (pool3d's d/d(weight) of a penalty was off by 50%).
The reference ops are plain PyTorch: the same penalty backpropagates through them, which shows
each case has second-order terms to lose. Eager calls (the ops' autograd.Functions) and the
registered ops (torch.compile, dispatch modes) are both covered; float64 for the C++ ops,
float32 for the Triton kernels (in the interpreter on CPU tensors, as in CI).
"""

import contextlib
import os

import pytest
import torch

import mvit_kernels
from mvit_kernels import reference
from mvit_kernels.pooled_projection import triton_pooled_projection
from mvit_kernels.pooling_attention import triton_pooling_attention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _pool3d(fused):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 1 + 2 * 4 * 4, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 1, 3, 3, 3, generator=g, dtype=torch.float64)
    nw, nb = torch.randn(2, 6, generator=g, dtype=torch.float64)
    fn = mvit_kernels.pool3d if fused else reference.pool3d
    return lambda x, w, nw, nb: fn(x, (2, 4, 4), 3, (1, 2, 2), 1, "conv", w, True, nw, nb)[0], (x, w, nw, nb)


def _pool3d_max(fused):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 1 + 2 * 5 * 5, 4, generator=g, dtype=torch.float64)
    nw, nb = torch.randn(2, 4, generator=g, dtype=torch.float64)
    fn = mvit_kernels.pool3d if fused else reference.pool3d
    return lambda x, nw, nb: fn(x, (2, 5, 5), 3, (1, 2, 2), 1, "max", None, True, nw, nb)[0], (x, nw, nb)


def _pool_residual_add(fused):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1 + 2 * 5 * 5, 4, generator=g, dtype=torch.float64)
    branch = torch.randn(2, 1 + 2 * 3 * 3, 4, generator=g, dtype=torch.float64)
    scale = torch.randn(2, generator=g, dtype=torch.float64)
    fn = mvit_kernels.pool_residual_add if fused else reference.pool_residual_add
    # grad_branch = scale * grad_out: a penalty on it has a gradient for scale.
    return lambda x, b, s: fn(x, (2, 5, 5), (1, 3, 3), (1, 2, 2), (0, 1, 1), b, s, True), (x, branch, scale)


def _pooled_projection(fused):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1 + 2 * 4 * 4, 8, generator=g)
    w = torch.randn(24, 8, generator=g) / 3
    pw = torch.randn(4, 1, 1, 3, 3, generator=g)
    nw, nb = torch.randn(2, 4, generator=g)
    fn = triton_pooled_projection if fused else reference.pooled_projection
    args = ("k", 2, (2, 4, 4), (1, 3, 3), (1, 2, 2), (0, 1, 1), "conv")
    return lambda x, w, pw, nw, nb: fn(x, w, None, *args, pw, True, nw, nb)[0], (x, w, pw, nw, nb)


def _pooling_attention(fused):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 1 + 2 * 3 * 3, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 1 + 2 * 2 * 2, 16, generator=g)
    rh, rw = torch.randn(2, 5, 16, generator=g) / 4
    fn = triton_pooling_attention if fused else reference.pooling_attention
    return lambda q, k, v, rh, rw: fn(q, k, v, (2, 3, 3), (2, 2, 2), True, None, rh, rw, residual_pooling=True), \
        (q, k, v, rh, rw)


CPU_OPS = {"pool3d": _pool3d, "pool3d-max-norm": _pool3d_max, "pool_residual_add": _pool_residual_add}
TRITON_OPS = {"pooled_projection": _pooled_projection, "pooling_attention": _pooling_attention}


def _gradients_and_penalty(make, fused):
    fn, inputs = make(fused)
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), leaves, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    return grads, penalty, leaves


@pytest.mark.parametrize("path", ["eager", "registered"])
@pytest.mark.parametrize("name", [*CPU_OPS, *TRITON_OPS])
def test_second_backward_names_the_op(name, path, registered_path):
    if name in TRITON_OPS and not INTERPRET:
        pytest.skip("the Triton kernels on CPU tensors need TRITON_INTERPRET=1 (CI sets it)")
    make = {**CPU_OPS, **TRITON_OPS}[name]
    tol = dict(atol=1e-10, rtol=1e-10) if name in CPU_OPS else dict(atol=1e-4, rtol=1e-4)
    ref_grads, ref_penalty, ref_leaves = _gradients_and_penalty(make, fused=False)
    ref_penalty.backward()
    assert any(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in ref_leaves)

    mode = registered_path() if path == "registered" else contextlib.nullcontext()
    with mode:
        grads, penalty, _ = _gradients_and_penalty(make, fused=True)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, **tol)
        op = name.split("-")[0]
        with pytest.raises(RuntimeError, match=f"{op}: the fused op has no double backward"):
            penalty.backward()


def test_first_order_training_is_unchanged():
    # Without create_graph the gradients carry no graph, as before.
    fn, inputs = _pool3d(fused=True)
    leaves = [t.clone().requires_grad_() for t in inputs]
    fn(*leaves).sum().backward()
    assert all(leaf.grad is not None and not leaf.grad.requires_grad for leaf in leaves)
