"""The CUDA pooling ops' code run on the CPU, against the CPU ops.

csrc/cuda/pool_ops_cuda.cu is compiled as C++ with tests/cpp/cuda_emulation.h in place of the
CUDA runtime (tests/cpp/cuda_emulated_ops.cpp) and registered as ``torch.ops.mvit_cuda_emulated``
with mvit_kernels' schemas. The launchers run unchanged (argument checks, block shapes, grid
sizes from the SM count, the launch sequence of each backward) and so do the kernels: every
thread of every block, with __syncthreads, warp shuffles, shared memory and atomics emulated.
So the CUDA kernels' index math, loops and reductions are checked here, on machines without a
GPU; what a GPU adds (speed, registers, real concurrency) is checked by the GPU suite and the
cubin tests (tests/test_cuda_resources.py).

The CPU ops (tested against the reference in test_pool3d.py / test_pool_residual_add.py) are
the expected values, on the same inputs and in the same dtype. Tolerances, outputs and every
gradient: float64 atol = rtol = 1e-10; float32 1e-5 (both accumulate in float32, in different
orders); bfloat16 / float16 1e-2 (both accumulate in float32; the final rounding may differ by
one unit in the last place). Every input sits between NaNs (``_guarded``), so a read past its
ends fails the comparison, and ``deterministic_fill`` fills fresh memory with NaN, so an output
element no thread writes fails it too.
"""

from __future__ import annotations

import os

import pytest
import torch

import mvit_kernels
from test_pool3d import CUDA_GEOMETRIES as POOL3D_GEOMETRIES
from test_pool3d import _inputs as pool3d_inputs
from test_pool_residual_add import CUDA_GEOMETRIES as RESIDUAL_GEOMETRIES
from test_pool_residual_add import _inputs as residual_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
H100_SMS = 132


@pytest.fixture(scope="module")
def emulated():
    from torch.utils import cpp_extension

    mvit_kernels.require_fused()  # torch.ops.mvit_kernels: the CPU ops, the expected values
    build = os.path.join(ROOT, "build", "cuda_emulated")
    os.makedirs(build, exist_ok=True)
    cpp_extension.load(
        name="mvit_cuda_emulated",
        sources=[os.path.join(ROOT, "tests", "cpp", "cuda_emulated_ops.cpp"), os.path.join(ROOT, "csrc", "pool_args.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "cuda"), os.path.join(ROOT, "tests", "cpp")],
        extra_cflags=["-O2", "-std=c++20"],
        build_directory=build,
        is_python_module=False,
    )
    return torch.ops.mvit_cuda_emulated


@pytest.fixture
def device_like(emulated):
    """configure(sms, reverse): how many SMs the emulated device reports (the launchers size their
    grids by it) and whether blocks and threads run last to first. Restored after the test."""

    def configure(multiprocessors=2, reverse_order=False):
        emulated.configure(multiprocessors, reverse_order)

    yield configure
    emulated.configure(2, False)


@pytest.fixture(autouse=True)
def deterministic_fill():
    # torch.empty fills with NaN (floats) / the max value (ints) while deterministic algorithms are on.
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _guarded(t):
    """t's values in the middle of a NaN-filled buffer: a kernel that reads past either end of an
    input gets NaN, which no pooling mode hides (max takes a NaN), so the comparison fails."""
    if t is None:
        return None
    pad = 256
    buf = torch.full((2 * pad + t.numel(),), float("nan"), dtype=t.dtype)
    buf[pad:pad + t.numel()] = t.flatten()
    return buf[pad:pad + t.numel()].view(t.shape)


def _close(actual, expected, dtype, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    tol = TOLS[dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _pool3d_inputs(B, heads, thw, d, kernel, mode, has_cls, norm, dtype, qkv_slice=False):
    x, weight, nw, nb = pool3d_inputs(B, heads, thw, d, kernel, mode, has_cls, norm, dtype)
    if qkv_slice:  # k as the model slices it out of the qkv projection: strided over B, heads and N
        qkv = torch.randn(B, x.shape[2], 3, heads, d, generator=torch.Generator().manual_seed(2)).to(dtype)
        x = _guarded(qkv).permute(2, 0, 3, 1, 4)[1]
    else:
        x = _guarded(x)
    return x, _guarded(weight), _guarded(nw), _guarded(nb)


def _check_pool3d(emulated, B, heads, thw, d, kernel, stride, padding, mode, has_cls, norm, dtype, qkv_slice=False):
    x, w, nw, nb = _pool3d_inputs(B, heads, thw, d, kernel, mode, has_cls, norm, dtype, qkv_slice)
    args = (list(thw), list(kernel), list(stride), list(padding), mode, w, has_cls, nw, nb, 1e-6)
    y = torch.ops.mvit_kernels.pool3d(x, *args)
    _close(emulated.pool3d(x, *args), y, dtype, "y")
    gy = _guarded(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    expected = torch.ops.mvit_kernels.pool3d_backward(gy, x, *args)
    got = emulated.pool3d_backward(gy, x, *args)
    for name, a, b in zip(("grad_x", "grad_weight", "grad_norm_weight", "grad_norm_bias"), got, expected):
        _close(a, b, dtype, name)


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("mode", ["max", "avg", "conv"])
@pytest.mark.parametrize("geometry", POOL3D_GEOMETRIES, ids=lambda g: f"thw{g[0]}-k{g[1]}-s{g[2]}-{'cls' if g[4] else 'nocls'}")
def test_pool3d_matches_cpu(emulated, geometry, mode, norm):
    thw, kernel, stride, padding, has_cls = geometry
    # d = 24: blocks of 32 x 16 threads, 8 lanes of each row idle (c >= d)
    _check_pool3d(emulated, 2, 2, thw, 24, kernel, stride, padding, mode, has_cls, norm, torch.float32)


def test_max_windows_of_minus_infinity(emulated):
    # The arg-max of a window of -inf values is its first input (as on the CPU and in torch), not
    # unset; the gradient reaches it.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2, 1 + 3 * 5 * 5, 24, generator=g)
    x[:, :, 1:51, :12] = float("-inf")
    x = _guarded(x)
    args = ([3, 5, 5], [3, 3, 3], [1, 2, 2], [1, 1, 1], "max", None, True, None, None, 1e-6)
    y = torch.ops.mvit_kernels.pool3d(x, *args)
    gy = torch.randn(y.shape, generator=g)
    expected = torch.ops.mvit_kernels.pool3d_backward(gy, x, *args)[0]
    assert expected[:, :, 1:26, :12].abs().sum() > 0
    _close(emulated.pool3d_backward(gy, x, *args)[0], expected, torch.float32, "grad_x")
    xr = _guarded(x[:, 0].contiguous())  # (B, N, C) for the max-pooled skip
    branch = torch.randn(2, 1 + 3 * 3 * 3, 24, generator=g)
    rargs = ([3, 5, 5], [3, 3, 3], [1, 2, 2], [1, 1, 1])
    grad = torch.randn(branch.shape, generator=g)
    expected = torch.ops.mvit_kernels.pool_residual_add_backward(grad, xr, *rargs, branch, None, True)[0]
    got = emulated.pool_residual_add_backward(grad, xr, *rargs, branch, None, True)[0]
    _close(got, expected, torch.float32, "pool_residual_add grad_x")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=["fp64", "bf16", "fp16"])
@pytest.mark.parametrize("mode", ["max", "avg", "conv"])
def test_pool3d_dtypes(emulated, mode, dtype):
    _check_pool3d(emulated, 2, 2, (3, 5, 7), 40, (3, 3, 3), (1, 2, 2), (1, 1, 1), mode, True, True, dtype)


@pytest.mark.parametrize("d", [1, 96, 600, 1024], ids=lambda d: f"d{d}")
def test_pool3d_channel_counts(emulated, d):
    # d = 96: MViT-B's head; 600: a block row wider than 512 threads, and the gathers' blocks of
    # 512 threads loop over channels; 1024: the widest block CUDA allows.
    for mode in ("max", "conv"):
        _check_pool3d(emulated, 1, 1, (2, 5, 5), d, (3, 3, 3), (1, 2, 2), (1, 1, 1), mode, True, True, torch.float32)


def test_pool3d_rejects_more_than_1024_channels(emulated):
    x = torch.randn(1, 1, 1 + 2 * 3 * 3, 1025)
    with pytest.raises(RuntimeError, match=r"support 1 to 1024 channels, got 1025"):
        emulated.pool3d(x, [2, 3, 3], [1, 3, 3], [1, 2, 2], [0, 1, 1], "max", None, True, None, None, 1e-6)


@pytest.mark.parametrize("mode", ["max", "avg", "conv"])
def test_pool3d_reads_strided_q_k_v_in_place(emulated, mode):
    _check_pool3d(emulated, 2, 3, (3, 6, 5), 16, (3, 3, 3), (1, 2, 2), (1, 1, 1), mode, True, True, torch.float32,
                  qkv_slice=True)


@pytest.mark.parametrize("multiprocessors, reverse_order", [(1, False), (H100_SMS, False), (2, True)],
                         ids=["1-sm", "h100-grid", "reverse-order"])
@pytest.mark.parametrize("mode", ["max", "avg", "conv"])
def test_pool3d_any_grid_and_order(emulated, device_like, mode, multiprocessors, reverse_order):
    # One SM: a single block strides over every row and line; 132 SMs: each block takes one step;
    # reversed order: a result that depends on the order of blocks or threads is a race.
    device_like(multiprocessors, reverse_order)
    _check_pool3d(emulated, 2, 2, (4, 9, 9), 24, (3, 3, 3), (1, 2, 2), (1, 1, 1), mode, True, True, torch.float32)


def _residual_inputs(B, thw, C, kernel, stride, padding, has_cls, with_scale, dtype):
    return tuple(_guarded(t) for t in residual_inputs(B, thw, C, kernel, stride, padding, has_cls, with_scale, dtype))


def _check_residual(emulated, B, thw, C, kernel, stride, padding, has_cls, with_scale, dtype):
    x, branch, scale = _residual_inputs(B, thw, C, kernel, stride, padding, has_cls, with_scale, dtype)
    args = (list(thw), list(kernel), list(stride), list(padding))
    out = torch.ops.mvit_kernels.pool_residual_add(x, *args, branch, scale, has_cls)
    _close(emulated.pool_residual_add(x, *args, branch, scale, has_cls), out, dtype, "out")
    grad = _guarded(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    expected = torch.ops.mvit_kernels.pool_residual_add_backward(grad, x, *args, branch, scale, has_cls)
    got = emulated.pool_residual_add_backward(grad, x, *args, branch, scale, has_cls)
    for name, a, b in zip(("grad_x", "grad_branch", "grad_scale"), got, expected):
        _close(a, b, dtype, name)


@pytest.mark.parametrize("with_scale", [True, False], ids=["scale", "noscale"])
@pytest.mark.parametrize("thw, kernel, stride, padding, has_cls", RESIDUAL_GEOMETRIES)
def test_pool_residual_add_matches_cpu(emulated, thw, kernel, stride, padding, has_cls, with_scale):
    _check_residual(emulated, 2, thw, 40, kernel, stride, padding, has_cls, with_scale, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=["fp64", "bf16", "fp16"])
def test_pool_residual_add_dtypes(emulated, dtype):
    _check_residual(emulated, 2, (3, 7, 7), 40, (1, 3, 3), (1, 2, 2), (0, 1, 1), True, True, dtype)


@pytest.mark.parametrize("C", [1, 600], ids=lambda c: f"C{c}")
def test_pool_residual_add_channel_counts(emulated, C):
    _check_residual(emulated, 2, (2, 5, 5), C, (1, 3, 3), (1, 2, 2), (0, 1, 1), True, True, torch.float32)


@pytest.mark.parametrize("multiprocessors, reverse_order", [(1, False), (H100_SMS, False), (2, True)],
                         ids=["1-sm", "h100-grid", "reverse-order"])
def test_pool_residual_add_any_grid_and_order(emulated, device_like, multiprocessors, reverse_order):
    device_like(multiprocessors, reverse_order)
    _check_residual(emulated, 3, (4, 9, 9), 24, (1, 3, 3), (1, 2, 2), (0, 1, 1), True, True, torch.float32)


def test_empty_batch_and_zero_channels(emulated):
    # Nothing to compute: empty outputs, zero parameter gradients, no launch (a zero-wide block
    # would be a division by zero on the host).
    for B, d in ((2, 0), (0, 8)):
        x = torch.randn(B, 2, 1 + 2 * 3 * 3, d)
        w = torch.randn(d, 1, 3, 3, 3)
        args = ([2, 3, 3], [3, 3, 3], [1, 2, 2], [1, 1, 1], "conv", w, True, None, None, 1e-6)
        y = emulated.pool3d(x, *args)
        assert y.shape == (B, 2, 1 + 2 * 2 * 2, d)
        gx, gw, _, _ = emulated.pool3d_backward(torch.randn(y.shape), x, *args)
        assert gx.shape == x.shape and gw.shape == w.shape and not gw.any()
        xr = torch.randn(B, 1 + 2 * 3 * 3, d)
        args = ([2, 3, 3], [1, 3, 3], [1, 2, 2], [0, 1, 1])
        out = emulated.pool_residual_add(xr, *args, torch.randn(B, 1 + 2 * 2 * 2, d), torch.rand(B), True)
        assert out.shape == (B, 1 + 2 * 2 * 2, d)
        gx, gb, gs = emulated.pool_residual_add_backward(torch.randn(out.shape), xr, *args, torch.randn(out.shape),
                                                          torch.rand(B), True)
        assert gx.shape == xr.shape and gb.shape == out.shape and gs.shape == (B,) and not gs.any()


# The emulator itself.

@pytest.mark.parametrize("rows, d", [(37, 200), (3, 1000), (100, 5)])
def test_emulated_block_reduction(emulated, device_like, rows, d):
    # pool_ops_cuda.cu's row_sum (warp shuffles, then shared memory across the row's warps) in a
    # grid-stride loop: each row's sum, whatever the block shape and order.
    x = torch.randn(rows, d)
    for reverse in (False, True):
        device_like(2, reverse)
        torch.testing.assert_close(emulated.row_sums(x), x.sum(1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("which, message", [
    ("early_exit_before_sync", r"63 threads wait at __syncthreads but 1 have exited"),
    ("divergent_shuffle", r"16 lanes wait at a full-mask shuffle while 16 have exited"),
    ("too_many_threads", r"invalid block \(64, 32, 1\)"),
])
def test_emulator_rejects_what_a_gpu_would_not_run(emulated, which, message):
    with pytest.raises(RuntimeError, match=message):
        emulated.broken_kernel(which)
