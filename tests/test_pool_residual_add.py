"""mvit_kernels.pool_residual_add (C++ op) against mvit_kernels.reference.pool_residual_add.

Tolerances (output and the gradients to x, branch and scale):
- float32: atol = rtol = 1e-5 against the reference run in float64 on the same values;
- bfloat16: atol = rtol = 2e-2 against the float32 reference on the same (bf16-valued) inputs;
- float64: gradcheck on small shapes.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mvit_kernels
from mvit_kernels import reference
from mvit_kernels.checks import pool_output_size

TOLS = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}
# The reference runs in float64 on the same values: the exact answer, so the tolerance measures
# the op's own error (a float32 reference has errors of the same size as the op's).
REF_DTYPE = {torch.float32: torch.float64, torch.bfloat16: torch.float32}

# (B, thw, C, kernel, stride, padding)
CASES = [
    pytest.param(2, (3, 7, 7), 16, (1, 3, 3), (1, 2, 2), (0, 1, 1), id="mvit-skip-odd-grid"),
    pytest.param(1, (2, 8, 6), 24, (1, 3, 3), (1, 2, 2), (0, 1, 1), id="batch1-even-grid"),
    pytest.param(3, (3, 5, 4), 8, (1, 1, 1), (1, 1, 1), (0, 0, 0), id="kernel1"),
    pytest.param(2, (5, 5, 5), 8, (3, 2, 3), (2, 2, 2), (1, 0, 1), id="3d-window-pad-mixed"),
    pytest.param(2, (2, 9, 9), 8, (1, 5, 5), (1, 4, 4), (0, 2, 2), id="kernel5-stride4"),
]


def _inputs(B, thw, C, kernel, stride, padding, has_cls, with_scale, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [pool_output_size(s, k, st, p) for s, k, st, p in zip(thw, kernel, stride, padding)]
    c = 1 if has_cls else 0
    x = torch.randn(B, c + thw[0] * thw[1] * thw[2], C, generator=g).to(dtype)
    branch = torch.randn(B, c + out[0] * out[1] * out[2], C, generator=g).to(dtype)
    scale = (torch.rand(B, generator=g) + 0.5).to(dtype) if with_scale else None
    return x, branch, scale


def _run(fn, x, thw, kernel, stride, padding, branch, scale, has_cls, grad_seed=1, grad_dtype=None):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, branch, scale)]
    out = fn(leaves[0], thw, kernel, stride, padding, leaves[1], leaves[2], has_cls)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(grad_dtype or out.dtype)
    g = g.to(device=out.device, dtype=out.dtype)
    out.backward(g)
    return out.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("with_scale", [True, False], ids=["scale", "noscale"])
def test_eager_path_equals_registered_op(with_scale, registered_path):
    # Eager calls go through _EagerPoolResidualAdd; dispatch modes and torch.compile through the
    # registered op's autograd. Same kernels, so the same bits.
    x, branch, scale = _inputs(2, (3, 7, 7), 16, (1, 3, 3), (1, 2, 2), (0, 1, 1), True, with_scale, torch.float32)
    args = ((3, 7, 7), (1, 3, 3), (1, 2, 2), (0, 1, 1))
    out, grads = _run(mvit_kernels.pool_residual_add, x, *args, branch, scale, True)
    with registered_path():
        out_op, grads_op = _run(mvit_kernels.pool_residual_add, x, *args, branch, scale, True)
    torch.testing.assert_close(out, out_op, atol=0, rtol=0)
    for g, g_op in zip(grads, grads_op):
        assert (g is None) == (g_op is None)
        if g is not None:
            torch.testing.assert_close(g, g_op, atol=0, rtol=0)
    leaf = x.clone().requires_grad_()
    assert type(mvit_kernels.pool_residual_add(leaf, *args, branch, scale, True).grad_fn).__name__ == (
        "_EagerPoolResidualAddBackward")


@pytest.mark.parametrize("seed", range(12))
def test_random_geometries_match_reference(seed):
    # Random windows (kernel 1-3, stride 1-3, padding <= kernel // 2), channel counts around
    # the CPU loops' vector widths, with and without scale and class token, float64 and float32.
    import random

    rng = random.Random(seed)
    kernel = [rng.randint(1, 3) for _ in range(3)]
    stride = [rng.randint(1, 3) for _ in range(3)]
    padding = [rng.randint(0, k // 2) for k in kernel]
    thw = [rng.randint(max(1, k - 2 * p), 7) for k, p in zip(kernel, padding)]
    has_cls, with_scale = rng.random() < 0.5, rng.random() < 0.5
    C, B = rng.choice([1, 7, 8, 33, 96]), rng.randint(1, 3)
    for dtype in (torch.float64, torch.float32):
        x, branch, scale = _inputs(B, thw, C, kernel, stride, padding, has_cls, with_scale, dtype, seed=seed)
        args = (thw, kernel, stride, padding)
        out, grads = _run(mvit_kernels.pool_residual_add, x, *args, branch, scale, has_cls)
        up = [None if t is None else t.double() for t in (x, branch, scale)]
        out_ref, grads_ref = _run(reference.pool_residual_add, up[0], *args, up[1], up[2], has_cls, grad_dtype=dtype)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out.double(), out_ref, atol=tol, rtol=tol)
        for g, g_ref in zip(grads, grads_ref):
            if g is not None:
                torch.testing.assert_close(g.double(), g_ref, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_scale", [True, False], ids=["scale", "noscale"])
@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
@pytest.mark.parametrize("B, thw, C, kernel, stride, padding", CASES)
def test_matches_reference(B, thw, C, kernel, stride, padding, has_cls, with_scale, dtype):
    x, branch, scale = _inputs(B, thw, C, kernel, stride, padding, has_cls, with_scale, dtype)
    args = (thw, kernel, stride, padding)
    out, grads = _run(mvit_kernels.pool_residual_add, x, *args, branch, scale, has_cls)
    up = [None if t is None else t.to(REF_DTYPE[dtype]) for t in (x, branch, scale)]
    out_ref, grads_ref = _run(reference.pool_residual_add, up[0], *args, up[1], up[2], has_cls, grad_dtype=dtype)
    atol, rtol = TOLS[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.to(out_ref.dtype), out_ref, atol=atol, rtol=rtol)
    for name, g, g_ref in zip(("x", "branch", "scale"), grads, grads_ref):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            # grad_scale sums a whole sample: scale the tolerance with its magnitude.
            torch.testing.assert_close(g.to(g_ref.dtype), g_ref, atol=atol * (10 if name == "scale" else 1), rtol=rtol,
                                       msg=lambda m: f"grad {name}: {m}")


def test_class_token_passes_through_unpooled():
    x, branch, scale = _inputs(2, (3, 7, 7), 8, (1, 3, 3), (1, 2, 2), (0, 1, 1), True, True, torch.float32)
    out = mvit_kernels.pool_residual_add(x, (3, 7, 7), (1, 3, 3), (1, 2, 2), (0, 1, 1), branch, scale)
    torch.testing.assert_close(out[:, 0], x[:, 0] + scale[:, None] * branch[:, 0])


def test_max_ties_route_to_first_index():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-2, 3, (2, 1 + 2 * 7 * 7, 4), generator=g).double()
    branch = torch.randn(2, 1 + 2 * 4 * 4, 4, generator=g).double()
    args = ((2, 7, 7), (1, 3, 3), (1, 2, 2), (0, 1, 1), branch, None, True)
    _, grads = _run(mvit_kernels.pool_residual_add, x, *args)
    _, grads_ref = _run(reference.pool_residual_add, x, *args)
    torch.testing.assert_close(grads[0], grads_ref[0], atol=1e-12, rtol=0)


def test_max_windows_of_minus_infinity_route_to_the_first_input():
    # As test_pool3d's: a window of -inf values gives its gradient to its first input, like torch.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 1 + 2 * 7 * 7, 4, generator=g).double()
    x[:, 1:1 + 49, :3] = float("-inf")
    branch = torch.randn(2, 1 + 2 * 4 * 4, 4, generator=g).double()
    args = ((2, 7, 7), (1, 3, 3), (1, 2, 2), (0, 1, 1), branch, None, True)
    _, grads = _run(mvit_kernels.pool_residual_add, x, *args)
    _, grads_ref = _run(reference.pool_residual_add, x, *args)
    assert grads_ref[0][:, 1:50, :3].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads_ref[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("has_cls", [True, False])
def test_gradcheck_float64(has_cls):
    x, branch, scale = _inputs(2, (3, 5, 5), 4, (1, 3, 3), (1, 2, 2), (0, 1, 1), has_cls, True, torch.float64, seed=3)
    f = lambda a, b, s: mvit_kernels.pool_residual_add(a, (3, 5, 5), (1, 3, 3), (1, 2, 2), (0, 1, 1), b, s, has_cls)
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), branch.requires_grad_(), scale.requires_grad_()))


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 1 + 3 * 7 * 7, generator=g).transpose(1, 2)  # (B, N, C), C strided
    branch = torch.randn(1 + 3 * 4 * 4, 2, 16, generator=g).transpose(0, 1)
    scale = (torch.rand(4, generator=g) + 0.5)[::2]
    args = ((3, 7, 7), (1, 3, 3), (1, 2, 2), (0, 1, 1), branch, scale, True)
    out, grads = _run(mvit_kernels.pool_residual_add, x, *args)
    out_ref, grads_ref = _run(reference.pool_residual_add, x, *args)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_scale_without_grad_and_empty_batch():
    x, branch, scale = _inputs(2, (2, 5, 5), 8, (1, 3, 3), (1, 2, 2), (0, 1, 1), True, True, torch.float32)
    x.requires_grad_(True)
    out = mvit_kernels.pool_residual_add(x, (2, 5, 5), (1, 3, 3), (1, 2, 2), (0, 1, 1), branch, scale)
    out.sum().backward()
    assert x.grad is not None and scale.grad is None
    x0 = torch.randn(0, 1 + 50, 8, requires_grad=True)
    b0 = torch.randn(0, 1 + 18, 8, requires_grad=True)
    out0 = mvit_kernels.pool_residual_add(x0, (2, 5, 5), (1, 3, 3), (1, 2, 2), (0, 1, 1), b0, torch.ones(0))
    ref0 = reference.pool_residual_add(x0, (2, 5, 5), (1, 3, 3), (1, 2, 2), (0, 1, 1), b0, torch.ones(0))
    assert out0.shape == ref0.shape == (0, 19, 8)
    out0.sum().backward()
    assert x0.grad.shape == x0.shape and b0.grad.shape == b0.shape


@pytest.mark.parametrize("with_scale", [True, False])
def test_opcheck(with_scale):
    x, branch, scale = _inputs(2, (3, 5, 5), 8, (1, 3, 3), (1, 2, 2), (0, 1, 1), True, with_scale, torch.float32)
    for t in (x, branch, scale):
        if t is not None:
            t.requires_grad_(True)
    args = (x, [3, 5, 5], [1, 3, 3], [1, 2, 2], [0, 1, 1], branch, scale, True)
    torch.library.opcheck(torch.ops.mvit_kernels.pool_residual_add.default, args)
    bargs = (torch.randn_like(branch.detach()), x.detach(), [3, 5, 5], [1, 3, 3], [1, 2, 2], [0, 1, 1],
             branch.detach(), None if scale is None else scale.detach(), True)
    torch.library.opcheck(torch.ops.mvit_kernels.pool_residual_add_backward.default, bargs)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 8)

    def block(x, scale, fn):
        branch = lin(x[:, :19])
        return fn(x, (2, 5, 5), (1, 3, 3), (1, 2, 2), (0, 1, 1), branch, scale, True).square().sum()

    x = torch.randn(2, 51, 8, requires_grad=True)
    scale = torch.rand(2, requires_grad=True)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    loss = compiled(x, scale, mvit_kernels.pool_residual_add)
    grads = torch.autograd.grad(loss, [x, scale, *lin.parameters()])
    loss_ref = block(x, scale, reference.pool_residual_add)
    grads_ref = torch.autograd.grad(loss_ref, [x, scale, *lin.parameters()])
    torch.testing.assert_close(loss, loss_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flop_count_is_zero_like_the_reference():
    x, branch, scale = _inputs(2, (3, 5, 5), 8, (1, 3, 3), (1, 2, 2), (0, 1, 1), True, True, torch.float32)
    x.requires_grad_(True)
    for fn in (mvit_kernels.pool_residual_add, reference.pool_residual_add):
        with FlopCounterMode(display=False) as counter:
            fn(x, (3, 5, 5), (1, 3, 3), (1, 2, 2), (0, 1, 1), branch, scale, True).sum().backward()
        assert counter.get_total_flops() == 0


def _bad(**overrides):
    args = dict(x=torch.randn(2, 1 + 2 * 5 * 5, 8), thw=(2, 5, 5), kernel=(1, 3, 3), stride=(1, 2, 2),
                padding=(0, 1, 1), branch=torch.randn(2, 1 + 2 * 3 * 3, 8), scale=torch.rand(2), has_cls=True)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, exc, match",
    [
        (dict(x=torch.randn(2, 1, 51, 8)), ValueError, r"x must be a 3-D tensor"),
        (dict(thw=(2, 5, 4)), ValueError, r"x has 51 tokens but thw=\(2, 5, 4\)"),
        (dict(kernel=(1, -3, 3)), ValueError, r"kernel\[h\] must be >= 1"),
        (dict(stride=0), ValueError, r"stride\[t\] must be >= 1"),
        (dict(padding=(0, 2, 1)), ValueError, r"padding\[h\] must be in \[0, kernel//2\]"),
        (dict(branch=torch.randn(2, 51, 8)), ValueError, r"branch must have shape \(2, 19, 8\)"),
        (dict(scale=torch.rand(3)), ValueError, r"scale must have shape \(2,\)"),
        (dict(branch=torch.randn(2, 19, 8, dtype=torch.float64)), TypeError, r"branch has dtype torch.float64"),
        (dict(scale=torch.rand(2, device="meta")), ValueError, r"scale is on meta"),
        (dict(x=torch.ones(2, 51, 8, dtype=torch.int64)), TypeError, r"x must be float32, float64"),
    ],
)
def test_bad_inputs_raise_like_the_reference(overrides, exc, match):
    args = _bad(**overrides)
    with pytest.raises(exc, match=match):
        mvit_kernels.pool_residual_add(**args)
    with pytest.raises(exc, match=match):
        reference.pool_residual_add(**args)


def test_the_cpp_op_checks_its_arguments_too():
    op = torch.ops.mvit_kernels.pool_residual_add
    x, branch = torch.randn(2, 51, 8), torch.randn(2, 19, 8)
    with pytest.raises(RuntimeError, match=r"branch must have shape"):
        op(x, [2, 5, 5], [1, 3, 3], [1, 2, 2], [0, 1, 1], branch[:, :5], None, True)
    with pytest.raises(RuntimeError, match=r"scale must have shape"):
        op(x, [2, 5, 5], [1, 3, 3], [1, 2, 2], [0, 1, 1], branch, torch.ones(3), True)
    with pytest.raises(RuntimeError, match=r"x must be float32"):
        op(x.long(), [2, 5, 5], [1, 3, 3], [1, 2, 2], [0, 1, 1], branch.long(), None, True)


# (thw, kernel, stride, padding, has_cls) for the CUDA-vs-CPU checks (here on a GPU, and in
# tests/test_cuda_emulated.py on the CPU).
CUDA_GEOMETRIES = [
    pytest.param((4, 13, 13), (1, 3, 3), (1, 2, 2), (0, 1, 1), True, id="mvit"),  # MViT's skip pooling
    pytest.param((3, 5, 7), (3, 3, 3), (2, 2, 2), (1, 1, 1), False, id="t-stride-nocls"),  # odd sizes
    pytest.param((2, 9, 9), (1, 3, 3), (1, 4, 4), (0, 1, 1), True, id="stride4"),  # inputs no window covers
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("thw, kernel, stride, padding, has_cls", CUDA_GEOMETRIES)
def test_cuda_matches_cpu(thw, kernel, stride, padding, has_cls):
    assert mvit_kernels.has_cuda_kernels(), "CUDA is available but the extension was built without CUDA"
    x, branch, scale = _inputs(2, thw, 96, kernel, stride, padding, has_cls, True, torch.float32)
    args = (thw, kernel, stride, padding)
    out, grads = _run(mvit_kernels.pool_residual_add, x, *args, branch, scale, has_cls)
    out_c, grads_c = _run(mvit_kernels.pool_residual_add, x.cuda(), *args, branch.cuda(), scale.cuda(), has_cls)
    torch.testing.assert_close(out_c.cpu(), out, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4)
