"""What every op shares with its reference, whichever path runs it: arguments that are not tensors
are named, float64 stays float64 under autocast (as torch's autocast leaves it), and zero
channels are refused by name. Each case runs on the reference ops and the fused ops, with and
without gradients (the fused ops' eager Functions and their inference paths differ)."""

import contextlib

import pytest
import torch

import mvit_kernels
from mvit_kernels import reference

PATHS = ["reference", "fused", "fused-inference"]


def _ops(path):
    return reference if path == "reference" else mvit_kernels


def _grad_mode(path):
    return torch.inference_mode() if path == "fused-inference" else contextlib.nullcontext()


def _calls(x=None, dtype=torch.float64, channels=4, seed=0):
    """name -> (function of the ops module, the shape of its main input). x replaces the main
    input where given (a list, say)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    d = channels
    grid = 1 + 2 * 5 * 5
    q = rand(2, 2, grid, d) if x is None else x
    tokens = rand(2, grid, d) if x is None else x
    kv = rand(2, 2, 1 + 2 * 3 * 3, d)
    branch = rand(2, 1 + 2 * 3 * 3, d)
    qkv_w = rand(3 * 2 * 3, d)
    return {
        "pool3d": lambda ops: ops.pool3d(q, (2, 5, 5), 3, (1, 2, 2), 1, "conv", rand(d, 1, 3, 3, 3), True,
                                         rand(d), rand(d))[0],
        "pool_residual_add": lambda ops: ops.pool_residual_add(tokens, (2, 5, 5), (1, 3, 3), (1, 2, 2), (0, 1, 1),
                                                               branch, rand(2), True),
        "pooled_projection": lambda ops: ops.pooled_projection(tokens, qkv_w, rand(3 * 2 * 3), "k", 2, (2, 5, 5),
                                                               (1, 3, 3), (1, 4, 4), (0, 1, 1), "max")[0],
        "pooling_attention": lambda ops: ops.pooling_attention(q, kv, kv, (2, 5, 5), (2, 3, 3), True, None,
                                                               rand(9, d), rand(9, d), residual_pooling=True),
        "linear": lambda ops: ops.linear(tokens, rand(5, d), rand(5), "gelu"),
        "mlp": lambda ops: ops.mlp(tokens, rand(7, d), rand(7), rand(3, 7), None),
    }


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(_calls()))
def test_an_argument_that_is_not_a_tensor_is_named(name, path):
    # The fused ops read x.device (autocast's rule, the oneDNN dispatch) before checking x: an
    # AttributeError ("'list' object has no attribute 'device'") instead of the reference's error.
    call = _calls(x=[[1.0, 2.0]])[name]
    main = "q" if name == "pooling_attention" else "x"
    with _grad_mode(path), pytest.raises((TypeError, ValueError), match=rf"^{main} must be a .*tensor.*list"):
        call(_ops(path))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(_calls()))
def test_float64_stays_float64_under_autocast(name, path):
    # torch's autocast never casts float64 (the reference's convs, matmuls and SDPA stay in it);
    # the fused ops cast every floating input to bfloat16, a 1e-2 error where 1e-10 was asked for.
    want = _calls(seed=1)[name](reference)
    with torch.autocast("cpu", dtype=torch.bfloat16), _grad_mode(path):
        got = _calls(seed=1)[name](_ops(path))
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["pool3d", "pool_residual_add", "pooled_projection"])
def test_zero_channels_are_refused_by_name(name, path):
    # Before: the fused pool3d returned an empty tensor where the reference failed inside torch's
    # pooling; pooled_projection failed in an as_strided view on both paths.
    call = _calls(channels=0)[name]
    with _grad_mode(path), pytest.raises(ValueError, match=r"x must have (d|C) >= 1 channels"):
        call(_ops(path))


def _optional_argument_call(op, name, value):
    """op's call with its optional tensor argument ``name`` replaced by ``value``."""
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    d = 4
    q, tokens = rand(2, 2, 1 + 2 * 5 * 5, d), rand(2, 1 + 2 * 5 * 5, d)
    kv, branch = rand(2, 2, 1 + 2 * 3 * 3, d), rand(2, 1 + 2 * 3 * 3, d)
    pool = dict(weight=rand(d, 1, 3, 3, 3), norm_weight=rand(d), norm_bias=rand(d))
    proj = dict(bias=rand(18), pool_weight=rand(3, 1, 1, 3, 3), norm_weight=rand(3), norm_bias=rand(3))
    attn = dict(rel_pos_t=rand(3, d), rel_pos_h=rand(9, d), rel_pos_w=rand(9, d))
    cases = {
        "pool3d": (pool, lambda ops, kw: ops.pool3d(q, (2, 5, 5), 3, (1, 2, 2), 1, "conv", kw["weight"], True,
                                                    kw["norm_weight"], kw["norm_bias"])),
        "pool_residual_add": (dict(scale=rand(2)), lambda ops, kw: ops.pool_residual_add(
            tokens, (2, 5, 5), (1, 3, 3), (1, 2, 2), (0, 1, 1), branch, kw["scale"], True)),
        "pooled_projection": (proj, lambda ops, kw: ops.pooled_projection(
            tokens, rand(18, d), kw["bias"], "k", 2, (2, 5, 5), (1, 3, 3), (1, 4, 4), (0, 1, 1), "conv",
            kw["pool_weight"], True, kw["norm_weight"], kw["norm_bias"])),
        "pooling_attention": (attn, lambda ops, kw: ops.pooling_attention(
            q, kv, kv, (2, 5, 5), (2, 3, 3), True, kw["rel_pos_t"], kw["rel_pos_h"], kw["rel_pos_w"])),
    }
    kwargs, call = cases[op]
    kwargs[name] = value(kwargs[name])
    return lambda ops: call(ops, kwargs)


OPTIONAL_TENSORS = [("pool3d", "weight"), ("pool3d", "norm_weight"), ("pool3d", "norm_bias"),
                    ("pool_residual_add", "scale"), ("pooled_projection", "bias"),
                    ("pooled_projection", "pool_weight"), ("pooled_projection", "norm_weight"),
                    ("pooling_attention", "rel_pos_t"), ("pooling_attention", "rel_pos_h")]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op, name", OPTIONAL_TENSORS)
@pytest.mark.parametrize("kind", ["float", "numpy"])
def test_an_optional_argument_that_is_not_a_tensor_is_named(op, name, kind, path):
    # These failed on a missing attribute ("'float' object has no attribute 'shape'"), or, for a
    # NumPy array (which has a device and a dtype), with "weight is on cpu but x is on cpu".
    value = (lambda t: 1.0) if kind == "float" else (lambda t: t.numpy())
    call = _optional_argument_call(op, name, value)
    with _grad_mode(path), pytest.raises(TypeError, match=rf"^{name} must be a tensor or None, got "):
        call(_ops(path))


@pytest.mark.parametrize(
    "op, call",
    [
        ("pool3d_backward", lambda x, g: torch.ops.mvit_kernels.pool3d_backward(
            g, x, [2, 5, 5], [3, 3, 3], [1, 2, 2], [1, 1, 1], "conv", torch.randn(4, 1, 3, 3), True, None, None, 1e-6)),
        ("pool_residual_add_backward", lambda x, g: torch.ops.mvit_kernels.pool_residual_add_backward(
            g, x[0], [2, 5, 5], [1, 3, 3], [1, 2, 2], [0, 1, 1], torch.randn(2, 7, 4), None, True)),
    ],
)
def test_the_cpp_backward_ops_name_themselves_in_their_errors(op, call):
    """Their tensor checks are shared with the forward ops, whose name they reported (a backward
    with a bad weight said "mvit_kernels.pool3d: weight must have shape ...")."""
    x = torch.randn(2, 2, 1 + 2 * 5 * 5, 4)
    with pytest.raises(RuntimeError, match=rf"^mvit_kernels\.{op}: (weight|branch) must have shape"):
        call(x, torch.randn(2, 2, 1 + 2 * 3 * 3, 4))


@pytest.mark.parametrize("path", PATHS)
def test_numpy_bools_are_taken_as_bools(path):
    # NumPy 2 names its bool type "bool", not "bool_": has_cls=np.True_ was refused with "has_cls
    # must be a bool, got bool True".
    import numpy as np

    x = torch.randn(1, 2, 1 + 2 * 4 * 4, 4, dtype=torch.float64)
    with _grad_mode(path):
        want = reference.pool3d(x, (2, 4, 4), 3, (1, 2, 2), 1, "max", has_cls=True)[0]
        got = _ops(path).pool3d(x, (2, 4, 4), 3, (1, 2, 2), 1, "max", has_cls=np.bool_(True))[0]
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(TypeError, match=r"has_cls must be a bool, got int8"):
        _ops(path).pool3d(x, (2, 4, 4), 3, (1, 2, 2), 1, "max", has_cls=np.int8(1))
