"""mvit_kernels.pool3d (C++ op) against mvit_kernels.reference.pool3d.

Tolerances (outputs and every gradient):
- float32: atol = rtol = 1e-5 against the reference run in float64 on the same values;
- bfloat16: atol = rtol = 2e-2 against the float32 reference run on the same (bf16-valued)
  inputs: the op accumulates in float32, so only the final rounding to bf16 differs;
- float64: gradcheck (finite differences) on small shapes.
The extension is built before the tests run (pip install -e .), so a missing build fails here.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mvit_kernels
from mvit_kernels import reference

TOLS = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}
# The reference runs in float64 on the same values: the exact answer, so the tolerance measures
# the op's own error (a float32 reference has errors of the same size as the op's).
REF_DTYPE = {torch.float32: torch.float64, torch.bfloat16: torch.float32}

# (B, heads, thw, d, kernel, stride, padding)
CASES = [
    pytest.param(2, 2, (3, 5, 7), 8, (3, 3, 3), (1, 2, 2), (1, 1, 1), id="odd-grid-stride2-pad1"),
    pytest.param(1, 1, (4, 9, 9), 16, (3, 3, 3), (1, 4, 4), (1, 1, 1), id="batch1-kv-stride4"),
    pytest.param(2, 8, (2, 5, 6), 4, (1, 1, 1), (1, 1, 1), (0, 0, 0), id="kernel1-many-heads"),
    pytest.param(1, 3, (5, 3, 4), 8, (3, 2, 3), (2, 2, 3), (0, 1, 0), id="mixed-kernel-pad0"),
    pytest.param(2, 2, (3, 6, 5), 12, (2, 3, 3), (2, 1, 2), (1, 1, 1), id="even-kernel"),
    # d >= 64: the CPU conv loop's 32-channel blocks (two), then a tail of 8; T = 5 gives the
    # forward both outputs computed in t pairs (inner t) and single ones (the edges).
    pytest.param(1, 2, (5, 4, 5), 72, (3, 3, 3), (1, 2, 2), (1, 1, 1), id="d72-blocks-and-tail"),
    # Windows wholly inside the grid take the forward's precomputed-tap loop (blocks of 48, 16
    # and 8 channels, then single ones): d = 100 is 2 x 48 + 4, and with stride 1 most windows
    # are inside, in a t pair (t = 1, 2) and alone (t = 3 of T = 5), next to edge windows.
    pytest.param(1, 2, (5, 5, 6), 100, (3, 3, 3), (1, 1, 1), (1, 1, 1), id="d100-inside-windows"),
    pytest.param(2, 1, (4, 4, 4), 24, (3, 3, 3), (1, 1, 1), (1, 1, 1), id="d24-inside-16-and-8"),
]
MODES = ["max", "avg", "conv"]


def _inputs(B, heads, thw, d, kernel, mode, has_cls, norm, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = thw[0] * thw[1] * thw[2] + (1 if has_cls else 0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x = rand(B, heads, n, d)
    weight = rand(d, 1, *kernel) * 0.3 if mode == "conv" else None
    norm_weight = 1 + 0.5 * rand(d) if norm else None
    norm_bias = 0.5 * rand(d) if norm else None
    return x, weight, norm_weight, norm_bias


def _run(fn, x, thw, kernel, stride, padding, mode, weight, has_cls, norm_weight, norm_bias, grad_seed=1, grad_dtype=None):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, norm_weight, norm_bias)]
    y, thw_out = fn(leaves[0], thw, kernel, stride, padding, mode, leaves[1], has_cls, leaves[2], leaves[3], 1e-6)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(grad_dtype or y.dtype)
    gy = gy.to(device=y.device, dtype=y.dtype)
    y.backward(gy)
    return y.detach(), thw_out, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B, heads, thw, d, kernel, stride, padding", CASES)
def test_matches_reference(B, heads, thw, d, kernel, stride, padding, mode, has_cls, norm, dtype):
    x, w, nw, nb = _inputs(B, heads, thw, d, kernel, mode, has_cls, norm, dtype)
    args = (thw, kernel, stride, padding, mode)
    y, thw_out, grads = _run(mvit_kernels.pool3d, x, *args, w, has_cls, nw, nb)
    up = [None if t is None else t.to(REF_DTYPE[dtype]) for t in (x, w, nw, nb)]
    y_ref, thw_ref, grads_ref = _run(reference.pool3d, up[0], *args, up[1], has_cls, up[2], up[3], grad_dtype=dtype)
    assert thw_out == thw_ref
    assert y.dtype == dtype and y.shape == y_ref.shape
    atol, rtol = TOLS[dtype]
    torch.testing.assert_close(y.to(y_ref.dtype), y_ref, atol=atol, rtol=rtol)
    for name, g, g_ref in zip(("x", "weight", "norm_weight", "norm_bias"), grads, grads_ref):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            assert g.dtype == dtype, name
            torch.testing.assert_close(g.to(g_ref.dtype), g_ref, atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")


def _random_geometry(rng):
    """A valid pooling geometry: kernel 1-3 per axis, stride 1-3, padding <= kernel // 2, grid
    big enough for one output."""
    kernel = [rng.randint(1, 3) for _ in range(3)]
    stride = [rng.randint(1, 3) for _ in range(3)]
    padding = [rng.randint(0, k // 2) for k in kernel]
    thw = [rng.randint(max(1, k - 2 * p), 7) for k, p in zip(kernel, padding)]
    return thw, kernel, stride, padding


@pytest.mark.parametrize("seed", range(24))
def test_random_geometries_match_reference(seed):
    # Random windows, channel counts around the CPU loops' 32-channel blocks and both dtypes:
    # every path of the row loops (t pairs, blocks, tails, edges) against the reference.
    import random

    rng = random.Random(seed)
    thw, kernel, stride, padding = _random_geometry(rng)
    mode = rng.choice(MODES)
    if mode == "avg":  # torch's avg_pool3d needs the grid at least the kernel (checked above)
        thw = [max(s, k) for s, k in zip(thw, kernel)]
    has_cls, norm = rng.random() < 0.5, rng.random() < 0.5
    d = rng.choice([1, 7, 31, 32, 33, 64, 72, 96])
    B, heads = rng.randint(1, 2), rng.randint(1, 3)
    for dtype in (torch.float64, torch.float32):
        x, w, nw, nb = _inputs(B, heads, thw, d, kernel, mode, has_cls, norm, dtype, seed=seed)
        args = (thw, kernel, stride, padding, mode)
        y, thw_out, grads = _run(mvit_kernels.pool3d, x, *args, w, has_cls, nw, nb)
        up = [None if t is None else t.double() for t in (x, w, nw, nb)]
        y_ref, thw_ref, grads_ref = _run(reference.pool3d, up[0], *args, up[1], has_cls, up[2], up[3],
                                         grad_dtype=dtype)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert thw_out == thw_ref
        torch.testing.assert_close(y.double(), y_ref, atol=tol, rtol=tol)
        for g, g_ref in zip(grads, grads_ref):
            if g is not None:
                torch.testing.assert_close(g.double(), g_ref, atol=tol * 10, rtol=tol)


def test_float16_runs_and_matches():
    x, w, nw, nb = _inputs(2, 2, (3, 5, 7), 8, (3, 3, 3), "conv", True, True, torch.float16)
    y, _, grads = _run(mvit_kernels.pool3d, x, (3, 5, 7), 3, (1, 2, 2), 1, "conv", w, True, nw, nb)
    up = [t.float() for t in (x, w, nw, nb)]
    y_ref, _, grads_ref = _run(reference.pool3d, up[0], (3, 5, 7), 3, (1, 2, 2), 1, "conv", up[1], True, up[2], up[3], grad_dtype=torch.float16)
    torch.testing.assert_close(y.to(y_ref.dtype), y_ref, atol=5e-3, rtol=5e-3)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref, atol=1e-2, rtol=5e-3)


@pytest.mark.parametrize("mode", MODES)
def test_eager_path_equals_registered_op(mode, registered_path):
    # Eager calls go through _EagerPool3d (less host time); dispatch modes and torch.compile
    # through the registered op's autograd. Same kernels, so the same bits.
    x, w, nw, nb = _inputs(2, 2, (3, 5, 7), 8, (3, 3, 3), mode, True, True, torch.float32)
    args = ((3, 5, 7), (3, 3, 3), (1, 2, 2), (1, 1, 1), mode)
    y, _, grads = _run(mvit_kernels.pool3d, x, *args, w, True, nw, nb)
    with registered_path():
        y_op, _, grads_op = _run(mvit_kernels.pool3d, x, *args, w, True, nw, nb)
    torch.testing.assert_close(y, y_op, atol=0, rtol=0)
    for g, g_op in zip(grads, grads_op):
        if g is not None:
            torch.testing.assert_close(g, g_op, atol=0, rtol=0)
    leaf = x.clone().requires_grad_()
    assert type(mvit_kernels.pool3d(leaf, *args, w, True, nw, nb)[0].grad_fn).__name__ == "_EagerPool3dBackward"
    with registered_path():
        assert "mvit_kernels_pool3d" in type(mvit_kernels.pool3d(leaf, *args, w, True, nw, nb)[0].grad_fn).__name__


@pytest.mark.parametrize("mode", MODES)
def test_max_ties_route_to_first_index(mode):
    # Small integers give many equal values inside each window.
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (2, 2, 1 + 3 * 5 * 5, 4), generator=g).double()
    w = torch.randn(4, 1, 3, 3, 3, generator=g).double() if mode == "conv" else None
    args = ((3, 5, 5), 3, (1, 2, 2), 1, mode, w, True, None, None)
    y, _, grads = _run(mvit_kernels.pool3d, x, *args)
    y_ref, _, grads_ref = _run(reference.pool3d, x, *args)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    torch.testing.assert_close(grads[0], grads_ref[0], atol=1e-12, rtol=0)


def test_max_windows_of_minus_infinity_route_to_the_first_input():
    # -inf > -inf is false: the arg-max was left unset (-1) and the window's gradient was dropped,
    # silently. torch (the reference) gives it to the window's first input inside the grid.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 1 + 3 * 5 * 5, 4, generator=g).double()
    x[:, :, 1:1 + 2 * 25, :2] = float("-inf")  # whole windows in channels 0-1, partial ones at t = 1-2
    x[0, 1, 5:9, 3] = float("-inf")
    args = ((3, 5, 5), 3, (1, 2, 2), 1, "max", None, True, None, None)
    y, _, grads = _run(mvit_kernels.pool3d, x, *args)
    y_ref, _, grads_ref = _run(reference.pool3d, x, *args)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    assert grads_ref[0][:, :, 1:26, :2].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads_ref[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    x, w, nw, nb = _inputs(2, 2, (3, 4, 5), 5, (3, 3, 3), mode, True, True, torch.float64, seed=4)
    thw, stride = (3, 4, 5), (1, 2, 2)
    tensors = [t.requires_grad_(True) for t in (x, w, nw, nb) if t is not None]

    def f(*ts):
        ts = list(ts)
        xx = ts.pop(0)
        ww = ts.pop(0) if mode == "conv" else None
        return mvit_kernels.pool3d(xx, thw, 3, stride, 1, mode, ww, True, ts[0], ts[1])[0]

    assert torch.autograd.gradcheck(f, tuple(tensors))


def test_gradcheck_float64_no_cls_no_norm():
    x, w, _, _ = _inputs(1, 3, (3, 5, 4), 4, (2, 3, 3), "conv", False, False, torch.float64, seed=5)
    x.requires_grad_(True)
    w.requires_grad_(True)
    f = lambda xx, ww: mvit_kernels.pool3d(xx, (3, 5, 4), (2, 3, 3), (2, 2, 1), (1, 1, 0), "conv", ww, False)[0]
    assert torch.autograd.gradcheck(f, (x, w))


def test_strided_inputs_from_the_qkv_projection_and_transposed():
    B, heads, thw, d = 2, 3, (3, 5, 5), 8
    n = 1 + 75
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(B, n, 3, heads, d, generator=g)
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # (B, heads, N, d), d contiguous, other strides not
    assert not q.is_contiguous()
    xt = torch.randn(B, heads, d, n, generator=g).transpose(2, 3)  # d not contiguous
    w = torch.randn(d, 1, 3, 3, 3, generator=g)
    nw, nb = torch.randn(d, generator=g), torch.randn(d, generator=g)
    for x in (q, xt):
        args = (thw, 3, (1, 2, 2), 1, "conv", w, True, nw, nb)
        y, _, grads = _run(mvit_kernels.pool3d, x, *args)
        y_ref, _, grads_ref = _run(reference.pool3d, x, *args)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_empty_batch():
    x = torch.randn(0, 2, 1 + 2 * 3 * 3, 4, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, 3, requires_grad=True)
    nw, nb = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    y, thw_out = mvit_kernels.pool3d(x, (2, 3, 3), 3, (1, 2, 2), 1, "conv", w, True, nw, nb)
    y_ref, thw_ref = reference.pool3d(x, (2, 3, 3), 3, (1, 2, 2), 1, "conv", w, True, nw, nb)
    assert y.shape == y_ref.shape == (0, 2, 1 + 2 * 2 * 2, 4) and thw_out == thw_ref == (2, 2, 2)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    x, w, nw, nb = _inputs(2, 2, (3, 4, 5), 4, (3, 3, 3), mode, True, True, torch.float32, seed=7)
    for t in (x, w, nw, nb):
        if t is not None:
            t.requires_grad_(True)
    args = (x, [3, 4, 5], [3, 3, 3], [1, 2, 2], [1, 1, 1], mode, w, True, nw, nb, 1e-6)
    torch.library.opcheck(torch.ops.mvit_kernels.pool3d.default, args)
    gy = torch.randn(2, 2, 1 + 3 * 2 * 3, 4)
    bargs = (gy, x.detach(), [3, 4, 5], [3, 3, 3], [1, 2, 2], [1, 1, 1], mode, None if w is None else w.detach(), True,
             nw.detach(), nb.detach(), 1e-6)
    torch.library.opcheck(torch.ops.mvit_kernels.pool3d_backward.default, bargs)


class _PoolKV(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d, 1, 3, 3, 3) * 0.3)
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, x, fn):
        y, thw = fn(x, (3, 5, 5), 3, (1, 2, 2), 1, "conv", self.weight, True, self.norm.weight, self.norm.bias)
        z, _ = fn(y, thw, 3, 1, 1, "max", None, True)
        return z.square().sum()


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    module = _PoolKV(8)
    x = torch.randn(2, 2, 1 + 75, 8, requires_grad=True)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    loss = compiled(x, mvit_kernels.pool3d)
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    loss_ref = module(x, reference.pool3d)
    grads_ref = torch.autograd.grad(loss_ref, [x, *module.parameters()])
    torch.testing.assert_close(loss, loss_ref, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_flop_count_matches_reference(mode):
    x, w, nw, nb = _inputs(2, 3, (3, 5, 7), 8, (3, 3, 3), mode, True, True, torch.float32)
    x.requires_grad_(True)
    if w is not None:
        w.requires_grad_(True)
    counts = []
    for fn in (mvit_kernels.pool3d, reference.pool3d):
        with FlopCounterMode(display=False) as counter:
            y, _ = fn(x, (3, 5, 7), 3, (1, 2, 2), 1, mode, w, True, nw, nb)
            forward = counter.get_total_flops()
            y.sum().backward()
        counts.append((forward, counter.get_total_flops()))
    assert counts[0] == counts[1]
    expected = 2 * 2 * 3 * (3 * 3 * 4) * 8 * 27 if mode == "conv" else 0
    assert counts[0][0] == expected


def _bad(**overrides):
    x = torch.randn(2, 2, 1 + 3 * 4 * 4, 8)
    args = dict(x=x, thw=(3, 4, 4), kernel=3, stride=(1, 2, 2), padding=1, mode="conv",
                weight=torch.randn(8, 1, 3, 3, 3), has_cls=True, norm_weight=torch.ones(8), norm_bias=torch.zeros(8))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, exc, match",
    [
        (dict(x=torch.randn(2, 49, 8)), ValueError, r"x must be a 4-D tensor"),
        (dict(thw=(3, 4, 5)), ValueError, r"x has 49 tokens but thw=\(3, 4, 5\)"),
        (dict(has_cls=False), ValueError, r"x has 49 tokens"),
        # Refused rather than coerced: int(2.5) and bool("False") would be silent wrong answers.
        (dict(thw=(3.0, 4, 4)), ValueError, r"thw must be an int or a sequence of 3 ints"),
        (dict(stride=(1, 2.5, 2)), ValueError, r"stride must be an int or a sequence of 3 ints"),
        (dict(kernel=True), ValueError, r"kernel must be an int or a sequence of 3 ints"),
        (dict(has_cls="False"), TypeError, r"has_cls must be a bool, got str"),
        (dict(has_cls=torch.tensor(True)), TypeError, r"has_cls must be a bool, got Tensor"),
        (dict(eps=-1e-6), ValueError, r"eps must be a finite number >= 0"),
        (dict(eps=float("nan")), ValueError, r"eps must be a finite number >= 0"),
        (dict(kernel=0), ValueError, r"kernel\[t\] must be >= 1"),
        (dict(stride=(1, 0, 2)), ValueError, r"stride\[h\] must be >= 1"),
        (dict(padding=2), ValueError, r"padding\[t\] must be in \[0, kernel//2\]"),
        (dict(mode="median"), ValueError, r"mode must be one of"),
        (dict(weight=torch.randn(8, 1, 3, 3)), ValueError, r"weight must have shape \(8, 1, 3, 3, 3\)"),
        (dict(weight=None), ValueError, r"mode='conv' needs weight"),
        (dict(mode="max"), ValueError, r"weight is only used with mode='conv'"),
        (dict(norm_weight=torch.ones(7)), ValueError, r"norm_weight must have shape \(8,\)"),
        (dict(norm_bias=None), ValueError, r"norm_weight and norm_bias must be given together"),
        (dict(weight=torch.randn(8, 1, 3, 3, 3, dtype=torch.float64)), TypeError, r"weight has dtype torch.float64"),
        (dict(norm_weight=torch.ones(8, device="meta")), ValueError, r"norm_weight is on meta"),
        (dict(x=torch.ones(2, 2, 49, 8, dtype=torch.int32)), TypeError, r"x must be float32, float64"),
        # torch's avg_pool3d refuses a grid smaller than the kernel even where padding makes room.
        (dict(x=torch.randn(2, 2, 1 + 3 * 2 * 4, 8), thw=(3, 2, 4), mode="avg", weight=None), ValueError,
         r"mode='avg' needs thw\[h\]=2 >= kernel\[h\]=3"),
    ],
)
def test_bad_inputs_raise_like_the_reference(overrides, exc, match):
    args = _bad(**overrides)
    with pytest.raises(exc, match=match):
        mvit_kernels.pool3d(**args)
    with pytest.raises(exc, match=match):
        reference.pool3d(**args)


def test_the_cpp_op_checks_its_arguments_too():
    x = torch.randn(2, 2, 1 + 48, 8)
    op = torch.ops.mvit_kernels.pool3d
    with pytest.raises(RuntimeError, match=r"x has 49 tokens but thw="):
        op(x, [3, 4, 5], [3, 3, 3], [1, 1, 1], [1, 1, 1], "max", None, True, None, None, 1e-6)
    # The kernels index a sample's tokens in 32 bits; said before the token count is compared.
    with pytest.raises(RuntimeError, match=r"thw must hold at most 2\^31 - 1 positions"):
        op(x, [2048, 1024, 1024], [3, 3, 3], [1, 1, 1], [1, 1, 1], "max", None, True, None, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"x must be float32, float64, bfloat16 or float16"):
        op(x.int(), [3, 4, 4], [3, 3, 3], [1, 1, 1], [1, 1, 1], "max", None, True, None, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"weight must have shape"):
        op(x, [3, 4, 4], [3, 3, 3], [1, 1, 1], [1, 1, 1], "conv", torch.randn(8, 1, 3, 3), True, None, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"padding\[h\] must be in \[0, kernel//2\]"):
        op(x, [3, 4, 4], [3, 3, 3], [1, 1, 1], [1, 2, 1], "max", None, True, None, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"mode must be one of"):
        op(x, [3, 4, 4], [3, 3, 3], [1, 1, 1], [1, 1, 1], "min", None, True, None, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"norm_bias has dtype"):
        op(x, [3, 4, 4], [3, 3, 3], [1, 1, 1], [1, 1, 1], "max", None, True, torch.ones(8), torch.ones(8).double(), 1e-6)
    with pytest.raises(RuntimeError, match=r"mode='avg' needs thw at least the kernel"):
        op(torch.randn(2, 2, 1 + 3 * 2 * 8, 8), [3, 2, 8], [3, 3, 3], [1, 1, 1], [1, 1, 1], "avg", None, True, None,
           None, 1e-6)
    for eps in (-1e-6, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match=r"eps must be a finite number >= 0"):
            op(x, [3, 4, 4], [3, 3, 3], [1, 1, 1], [1, 1, 1], "max", None, True, torch.ones(8), torch.zeros(8), eps)


def test_a_padded_input_past_32_bits_is_refused():
    # The window loops form offsets from a window's padded start in 32 bits: a kernel of 2^21
    # padded by 2^20 on a 64 x 64 frame overflowed them (the sanitizers found it).
    x = torch.randn(1, 1, 64 * 64, 2)
    geometry = ((1, 64, 64), (2**21, 1, 1), (1, 1, 1), (2**20, 0, 0))
    with pytest.raises(ValueError, match=r"the padded input must hold at most 2\^31 - 1 positions, got "
                                         r"thw=\(1, 64, 64\) and padding=\(1048576, 0, 0\)"):
        mvit_kernels.pool3d(x, *geometry, "max", has_cls=False)
    with pytest.raises(RuntimeError, match=r"the padded input must hold at most 2\^31 - 1 positions"):
        torch.ops.mvit_kernels.pool3d(x, *map(list, geometry), "max", None, False, None, None, 1e-6)
    with pytest.raises(ValueError, match=r"the padded input must hold at most 2\^31 - 1 positions"):
        mvit_kernels.pool_residual_add(x[:, 0], *geometry, x[:, 0, :1], None, False)


@pytest.mark.parametrize("mode", ["avg", "max", "conv"])
def test_a_stride_past_the_padded_axis_pools_like_the_reference(mode):
    # A stride of 2^31 - 1 leaves one output along its axis. The backward's covering range
    # computed a + s - 1 in 32 bits, which wrapped: inputs no window covers took gradient (avg),
    # or read the conv weight far out of bounds (a segfault; the sanitizers found it).
    g = torch.Generator().manual_seed(7)
    thw, kernel, stride, padding = (2, 5, 10), (1, 3, 3), (1, 2, 2**31 - 1), (0, 1, 1)
    x = torch.randn(2, 3, 1 + 100, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, *kernel, generator=g, dtype=torch.float64, requires_grad=True) if mode == "conv" else None
    args = (thw, kernel, stride, padding, mode, w, True)
    y, thw_out = mvit_kernels.pool3d(x, *args)
    want, thw_want = reference.pool3d(x, *args)
    assert y.shape == want.shape == (2, 3, 1 + 2 * 3 * 1, 4) and thw_out == thw_want == (2, 3, 1)
    torch.testing.assert_close(y, want)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    inputs = (x,) if w is None else (x, w)
    for got, expected in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(want, inputs, gy)):
        torch.testing.assert_close(got, expected)


def test_the_cpp_backward_of_zero_channels_is_empty():
    # The Python API refuses d = 0; the C++ op divided by it (SIGFPE) in its backward.
    x = torch.randn(1, 1, 8, 0)
    args = ([2, 2, 2], [1, 1, 1], [1, 1, 1], [0, 0, 0], "avg", None, False, None, None, 1e-5)
    y = torch.ops.mvit_kernels.pool3d(x, *args)
    grads = torch.ops.mvit_kernels.pool3d_backward(torch.ones_like(y), x, *args)
    assert grads[0].shape == x.shape


def test_cuda_build_flag_is_registered():
    assert isinstance(torch.ops.mvit_kernels.built_with_cuda(), bool)
    assert mvit_kernels.has_cuda_kernels() == torch.ops.mvit_kernels.built_with_cuda()


# Runs in a fresh interpreter with idle OpenMP threads sleeping (OMP_WAIT_POLICY=passive), so the
# CPU time outside the calling thread is work the op gave to torch's other intra-op thread.
_THREAD_SHARE_SCRIPT = r"""
import time, torch, mvit_kernels
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 4, 1 + 8 * 28 * 28, 96, generator=g, requires_grad=True)
w, nw, nb = torch.randn(96, 1, 3, 3, 3, generator=g), torch.randn(96, generator=g), torch.randn(96, generator=g)
gy = torch.randn(1, 4, 1 + 8 * 14 * 14, 96, generator=g)
xs = torch.randn(1, 1 + 8 * 28 * 28, 192, generator=g, requires_grad=True)
branch = torch.randn(1, 1 + 8 * 14 * 14, 192, generator=g)
tables = [torch.randn(a, b, 96, generator=g) for a, b in ((8, 8), (28, 14), (28, 14))]
mask = torch.empty(1, 4, 1 + 8 * 28 * 28, 1 + 8 * 14 * 14)
calls = {
    "pool3d": lambda: mvit_kernels.pool3d(x.detach(), (8, 28, 28), (3, 3, 3), (1, 2, 2), (1, 1, 1), "conv", w, True, nw, nb),
    "pool3d backward": lambda: torch.ops.mvit_kernels.pool3d_backward(
        gy, x.detach(), [8, 28, 28], [3, 3, 3], [1, 2, 2], [1, 1, 1], "conv", w, True, nw, nb, 1e-6),
    "pool_residual_add": lambda: mvit_kernels.pool_residual_add(
        xs.detach(), (8, 28, 28), (1, 3, 3), (1, 2, 2), (0, 1, 1), branch),
    "pool_residual_add backward": lambda: torch.ops.mvit_kernels.pool_residual_add_backward(
        branch, xs.detach(), [8, 28, 28], [1, 3, 3], [1, 2, 2], [0, 1, 1], branch, None, True),
    "rel_pos_mask": lambda: torch.ops.mvit_kernels.rel_pos_mask(
        x.detach(), *tables, [8, 28, 28], [8, 14, 14], True, 0, mask),
}
for name, call in calls.items():
    call()
    thread0, process0 = time.thread_time(), time.process_time()
    for _ in range(20):
        call()
    thread, process = time.thread_time() - thread0, time.process_time() - process0
    print(name, (process - thread) / process)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="setup.py builds with OpenMP on Linux only")
def test_cpu_kernels_run_on_torch_threads():
    """at::parallel_for splits a loop over threads only where the extension was compiled with
    OpenMP; without it every CPU kernel ran on one thread whatever torch.set_num_threads said.
    Every C++ CPU op: the pool ops forward and backward, the rel-pos mask."""
    import os
    import subprocess

    assert torch.ops.mvit_kernels.built_with_cpu_threads()
    env = dict(os.environ, OMP_WAIT_POLICY="passive")
    result = subprocess.run([sys.executable, "-c", _THREAD_SHARE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shares = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines()}
    assert len(shares) == 5, result.stdout
    # Two threads with equal halves of the rows: each share is near 0.5 (0 when serial).
    for name, share in shares.items():
        assert share > 0.2, f"{name}: {share:.2f} of its CPU time on the second thread"


# (thw, kernel, stride, padding, has_cls) for the CUDA-vs-CPU checks (here on a GPU, and in
# tests/test_cuda_emulated.py on the CPU): MViT's q pooling, and geometries the CUDA kernels'
# index math must get right (t stride, odd sizes, no class token, K/V strides with lines where a
# tap is all padding, kernel 1, a kernel of 1 along w). Every one is valid for all three modes
# (avg needs the grid at least the kernel).
CUDA_GEOMETRIES = [
    ((4, 9, 9), (3, 3, 3), (1, 2, 2), (1, 1, 1), True),
    ((3, 5, 7), (3, 3, 3), (2, 2, 2), (1, 1, 1), False),
    ((3, 16, 16), (3, 3, 3), (1, 8, 8), (1, 1, 1), True),
    ((4, 6, 5), (3, 3, 1), (2, 3, 2), (1, 1, 0), True),
    ((2, 3, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), False),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("geometry", CUDA_GEOMETRIES, ids=lambda g: f"thw{g[0]}-k{g[1]}-s{g[2]}-{'cls' if g[4] else 'nocls'}")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu(mode, geometry):
    assert mvit_kernels.has_cuda_kernels(), "CUDA is available but the extension was built without CUDA"
    thw, kernel, stride, padding, has_cls = geometry
    x, w, nw, nb = _inputs(2, 3, thw, 96, kernel, mode, has_cls, True, torch.float32)
    args = (thw, kernel, stride, padding, mode)
    y, _, grads = _run(mvit_kernels.pool3d, x, *args, w, has_cls, nw, nb)
    cuda = [None if t is None else t.cuda() for t in (x, w, nw, nb)]
    y_c, _, grads_c = _run(mvit_kernels.pool3d, cuda[0], *args, cuda[1], has_cls, cuda[2], cuda[3])
    torch.testing.assert_close(y_c.cpu(), y, atol=1e-4, rtol=1e-4)
    for a, b in zip(grads_c, grads):
        if b is not None:
            torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_zero_channels_and_empty_batch():
    # Zero channels are refused by name on every device (test_op_contracts), before the CUDA op.
    x = torch.randn(2, 2, 1 + 2 * 3 * 3, 0, device="cuda")
    with pytest.raises(ValueError, match="x must have d >= 1 channels"):
        mvit_kernels.pool3d(x, (2, 3, 3), 3, (1, 2, 2), 1, "conv", torch.randn(0, 1, 3, 3, 3, device="cuda"), True)
    # An empty batch: nothing to compute, empty outputs and gradients, and no launch (a 0-wide
    # grid would be a division by zero on the host).
    B, d = 0, 8
    x = torch.randn(B, 2, 1 + 2 * 3 * 3, d, device="cuda", requires_grad=True)
    w = torch.randn(d, 1, 3, 3, 3, device="cuda", requires_grad=True)
    y, _ = mvit_kernels.pool3d(x, (2, 3, 3), 3, (1, 2, 2), 1, "conv", w, True)
    y.sum().backward()
    assert y.shape == (B, 2, 9, d) and x.grad.shape == x.shape and not w.grad.any()
    xr = torch.randn(B, 1 + 2 * 3 * 3, d, device="cuda", requires_grad=True)
    out = mvit_kernels.pool_residual_add(xr, (2, 3, 3), (1, 3, 3), (1, 2, 2), (0, 1, 1),
                                         torch.randn(B, 9, d, device="cuda"))
    out.sum().backward()
    assert out.shape == (B, 9, d) and xr.grad.shape == xr.shape


def test_cpu_default_isa_path_matches_reference():
    """The CPU kernels (pool ops, rel-pos mask) have an AVX2 build picked at run time; run the
    portable one too."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, pytest; sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', "
        "'tests/test_pool3d.py::test_matches_reference', 'tests/test_pool_residual_add.py::test_matches_reference', "
        "'tests/test_rel_pos_mask.py::test_matches_reference', "
        "'-k', 'fp32']))"
    )
    env = dict(os.environ, MVIT_KERNELS_CPU_AVX2="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
