"""Argument validation shared by the reference ops and the fused ops.

Both paths raise the same errors for the same bad input, so a user who switches ``fused`` on
or off never meets a different failure mode. Every message names the argument and what was
expected.
"""

from __future__ import annotations

import contextlib
import math
import operator
from typing import Optional, Sequence

import torch

from .autocast import autocast_dtype

POOL_MODES = ("max", "avg", "conv")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INT32_MAX = 2**31 - 1


def _as_int(value) -> int:
    """value as an int if it is one (Python, NumPy or SymInt; an integer 0-d tensor), else
    TypeError. Floats are refused rather than truncated (a size of 2.5 is a caller's bug), and
    so are bools (True is an int to Python, but never meant as a size)."""
    if isinstance(value, bool):
        raise TypeError("bool")
    return operator.index(value)


def triple(value, name: str) -> tuple[int, int, int]:
    """Normalize an int or a length-3 sequence of ints to a tuple of three ints.

    A list or tuple (what the model passes) is read without trying it as an int first: under
    torch.compile with torch 2.11, Dynamo turns the TypeError of ``operator.index((1, 2, 2))``
    into an internal error instead of letting the ``except`` catch it (torch 2.14 catches it)."""
    if not isinstance(value, (list, tuple)):
        try:
            one = _as_int(value)
        except TypeError:
            pass
        else:
            return (one, one, one)
    try:
        items = tuple(_as_int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a sequence of 3 ints, got {value!r}") from None
    if len(items) != 3:
        raise ValueError(f"{name} must have 3 entries (t, h, w), got {len(items)}: {value!r}")
    return items  # type: ignore[return-value]


def check_flag(value, name: str) -> bool:
    """A bool argument (Python or NumPy bool): a string such as "False" or a tensor would
    otherwise be read by its truth value, silently."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")):
        return bool(value)  # NumPy 2 names its bool type "bool", NumPy 1 "bool_"
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_eps(eps) -> float:
    """LayerNorm's eps: a finite number >= 0 (a negative one makes var + eps negative)."""
    # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) a module's float
    # is a SymFloat, which isfinite would turn into a graph break (NaN fails both comparisons).
    if isinstance(eps, bool) or not isinstance(eps, (int, float, torch.SymInt, torch.SymFloat)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return eps if isinstance(eps, torch.SymFloat) else float(eps)


def pool_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Conv/pool output length with floor rounding (ceil_mode=False)."""
    return (size + 2 * padding - kernel) // stride + 1


def pool_output_thw(thw, kernel, stride, padding) -> tuple[int, int, int]:
    """The pooled (T, H, W) grid: :func:`pool_output_size` on each axis."""
    return tuple(pool_output_size(s, k, st, p) for s, k, st, p in zip(thw, kernel, stride, padding))  # type: ignore[return-value]


def check_window(kernel, stride, padding) -> tuple[tuple[int, int, int], ...]:
    kernel = triple(kernel, "kernel")
    stride = triple(stride, "stride")
    padding = triple(padding, "padding")
    for axis, k, s, p in zip("thw", kernel, stride, padding):
        if k < 1:
            raise ValueError(f"kernel[{axis}] must be >= 1, got {k}")
        if s < 1:
            raise ValueError(f"stride[{axis}] must be >= 1, got {s}")
        if p < 0 or 2 * p > k:
            raise ValueError(f"padding[{axis}] must be in [0, kernel//2] = [0, {k // 2}], got {p}")
        if s > INT32_MAX:
            raise ValueError(f"stride[{axis}] must be at most 2^31 - 1, got {s}")
    taps = kernel[0] * kernel[1] * kernel[2]
    if not isinstance(taps, torch.SymInt) and taps > INT32_MAX:
        # the C++ kernels count a window's taps in 32 bits (a kernel of 2^61 divided by zero there)
        raise ValueError(f"kernel must have at most 2^31 - 1 taps, got {kernel}")
    return kernel, stride, padding


def check_padded_input(thw, kernel, padding) -> None:
    """Every kernel fits its padded axis, and the padded grid holds at most 2^31 - 1 positions:
    the kernels form offsets from a window's first position, which may lie in the padding, in 32
    bits."""
    padded = 1
    for axis, size, k, p in zip("thw", thw, kernel, padding):
        if size + 2 * p < k:
            raise ValueError(f"kernel[{axis}]={k} is larger than the padded input ({size} + 2*{p}); no output")
        padded *= size + 2 * p
    if not isinstance(padded, torch.SymInt) and padded > INT32_MAX:
        raise ValueError(f"the padded input must hold at most 2^31 - 1 positions, got thw={tuple(thw)} and "
                         f"padding={tuple(padding)}")


def check_thw(thw: Sequence[int], num_tokens: int, has_cls: bool, name: str = "x") -> tuple[int, int, int]:
    check_flag(has_cls, "has_cls")
    thw = triple(thw, "thw")
    if any(s < 1 for s in thw):
        raise ValueError(f"thw must be positive, got {thw}")
    grid = thw[0] * thw[1] * thw[2]
    if not isinstance(grid, torch.SymInt) and grid > INT32_MAX:
        raise ValueError(f"thw must hold at most 2^31 - 1 positions (the kernels index a sample's grid in 32 "
                         f"bits), got {thw}")
    expected = grid + (1 if has_cls else 0)
    if num_tokens != expected:
        cls = " + 1 class token" if has_cls else ""
        raise ValueError(
            f"{name} has {num_tokens} tokens but thw={thw}{cls} implies {expected}"
        )
    return thw


@contextlib.contextmanager
def as_op_error(op: str):
    """These checks' errors raised as the C++ ops raise theirs (RuntimeError "op: message"): the
    ops' fake implementations check with them, so that tracing a call the op would refuse fails
    there, with the op's message, instead of giving the output a shape."""
    try:
        yield
    except (TypeError, ValueError) as exc:
        raise RuntimeError(f"{op}: {exc}") from None


def check_grad_shape(grad, expected, name: str, x: torch.Tensor) -> None:
    """A backward op's incoming gradient: the forward output's shape, x's dtype and device."""
    _check_tensor(grad, name)
    if tuple(grad.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(grad.shape)}")
    check_same(grad, x, name, "x")


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def check_same(t: Optional[torch.Tensor], ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t is None:
        return
    _check_tensor(t, name)  # a NumPy array has a device and a dtype too: the message would not say why
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def _check_tensor(value, name: str, optional: bool = False) -> None:
    """A tensor (or None where optional): another type would fail later on a missing attribute,
    far from the argument."""
    if not isinstance(value, torch.Tensor) and not (optional and value is None):
        raise TypeError(f"{name} must be a tensor{' or None' if optional else ''}, got {type(value).__name__}")


def _check_weight_bias(weight: torch.Tensor, bias: Optional[torch.Tensor], w_name: str, b_name: str) -> None:
    _check_tensor(weight, w_name)
    _check_tensor(bias, b_name, optional=True)
    if weight.dim() != 2:
        raise ValueError(f"{w_name} must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{b_name} must have shape ({weight.shape[0]},) to match {w_name}, got {tuple(bias.shape)}")


def check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      names: Sequence[str] = ("x", "weight", "bias")) -> None:
    """A linear layer's arguments: weight (out_features, in_features), bias None or
    (out_features,), x (..., in_features); floating dtypes, one device, one dtype unless autocast
    is on for x's device (it mixes them on purpose). oneDNN's fused path would otherwise read a
    weight of another rank as the 2-D one silently, fail on a bias of the wrong length with an
    error that names neither, and return uninitialized memory for a weight on the meta device."""
    x_name, w_name, b_name = names
    _check_tensor(x, x_name)
    _check_weight_bias(weight, bias, w_name, b_name)
    if x.dim() < 1:
        raise ValueError(f"{x_name} must be (..., in_features), got a 0-d tensor")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{x_name} has {x.shape[-1]} features but {w_name} expects {weight.shape[1]}")
    check_float(x, x_name)
    _check_parameters_like(x, x_name, (weight, w_name), (bias, b_name))


def _check_parameters_like(x: torch.Tensor, x_name: str, *named) -> None:
    """(tensor or None, name) pairs: floating, on x's device, in x's dtype unless autocast is on."""
    for t, name in named:
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")
        check_float(t, name)
        if t.dtype != x.dtype and autocast_dtype(x) is None:
            raise TypeError(f"{name} has dtype {t.dtype} but {x_name} has dtype {x.dtype} (and autocast is off)")


def check_mlp_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) -> None:
    """The MLP's two linear layers (:func:`check_linear_args`), fc2 reading fc1's output."""
    check_linear_args(x, fc1_weight, fc1_bias, ("x", "fc1_weight", "fc1_bias"))
    _check_weight_bias(fc2_weight, fc2_bias, "fc2_weight", "fc2_bias")
    _check_parameters_like(x, "x", (fc2_weight, "fc2_weight"), (fc2_bias, "fc2_bias"))
    if fc2_weight.shape[1] != fc1_weight.shape[0]:
        raise ValueError(f"fc2_weight expects {fc2_weight.shape[1]} features but fc1_weight gives {fc1_weight.shape[0]}")


def check_pool3d_args(
    x: torch.Tensor,
    thw,
    kernel,
    stride,
    padding,
    mode: str,
    weight: Optional[torch.Tensor],
    has_cls: bool,
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    eps: float = 1e-6,
    weight_name: str = "weight",
):
    """Validate pool3d's arguments; return (thw, kernel, stride, padding) as tuples. weight_name
    is how the caller's signature names the conv weight (the errors name it)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D tensor (B, heads, N, d), got {shape}")
    check_float(x, "x")
    if x.shape[3] < 1:  # torch's pooling and conv (the reference) refuse it too, less clearly
        raise ValueError(f"x must have d >= 1 channels, got shape {tuple(x.shape)}")
    if mode not in POOL_MODES:
        raise ValueError(f"mode must be one of {POOL_MODES}, got {mode!r}")
    kernel, stride, padding = check_window(kernel, stride, padding)
    thw = check_thw(thw, x.shape[2], has_cls)
    check_padded_input(thw, kernel, padding)
    for axis, size, k in zip("thw", thw, kernel):
        if mode == "avg" and size < k:
            # torch's avg_pool3d (the reference) refuses this even when padding makes room.
            raise ValueError(f"mode='avg' needs thw[{axis}]={size} >= kernel[{axis}]={k}, as torch's avg_pool3d does")
    d = x.shape[3]
    for t, name in ((weight, weight_name), (norm_weight, "norm_weight"), (norm_bias, "norm_bias")):
        _check_tensor(t, name, optional=True)
    if mode == "conv":
        if weight is None:
            raise ValueError(f"mode='conv' needs {weight_name} of shape (d, 1, kT, kH, kW)")
        expected = (d, 1) + kernel
        if tuple(weight.shape) != expected:
            raise ValueError(f"{weight_name} must have shape {expected} (d, 1, *kernel), got {tuple(weight.shape)}")
        check_same(weight, x, weight_name, "x")
    elif weight is not None:
        raise ValueError(f"{weight_name} is only used with mode='conv', got mode={mode!r}")
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("norm_weight and norm_bias must be given together")
    for t, name in ((norm_weight, "norm_weight"), (norm_bias, "norm_bias")):
        if t is not None:
            if tuple(t.shape) != (d,):
                raise ValueError(f"{name} must have shape ({d},) to normalize over d, got {tuple(t.shape)}")
            check_same(t, x, name, "x")
    check_eps(eps)
    return thw, kernel, stride, padding


PROJECTION_SLICES = ("q", "k", "v")


def check_pooled_projection_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    which: str,
    num_heads: int,
    thw,
    kernel,
    stride,
    padding,
    mode: str,
    pool_weight: Optional[torch.Tensor],
    has_cls: bool,
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    eps: float = 1e-6,
):
    """Validate pooled_projection's arguments; return (thw, kernel, stride, padding) as tuples.

    x (B, N, C) tokens; weight (3A, C) and bias (3A,) the qkv Linear's, rows [q | k | v]. The
    pooling arguments are checked by :func:`check_pool3d_args` against the (B, heads, N, d) shape
    the projected slice has (a zero-stride view stands in for it: nothing is allocated)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 3-D tensor (B, N, C), got {shape}")
    check_float(x, "x")
    if x.shape[2] < 1:
        raise ValueError(f"x must have C >= 1 channels, got shape {tuple(x.shape)}")
    if which not in PROJECTION_SLICES:
        raise ValueError(f"which must be one of {PROJECTION_SLICES}, got {which!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D tensor (3*A, C) (the qkv Linear's), got {shape}")
    rows, C = weight.shape
    if C != x.shape[2]:
        raise ValueError(f"weight has {C} input channels (columns) but x has C={x.shape[2]}")
    if rows % 3 != 0:
        raise ValueError(f"weight must have 3*A rows ([q | k | v]), got {rows}")
    check_same(weight, x, "weight", "x")
    _check_tensor(bias, "bias", optional=True)
    if bias is not None:
        if tuple(bias.shape) != (rows,):
            raise ValueError(f"bias must have shape ({rows},) (one per weight row), got {tuple(bias.shape)}")
        check_same(bias, x, "bias", "x")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    A = rows // 3
    if A % num_heads != 0:
        raise ValueError(f"num_heads={num_heads} does not divide A = weight rows / 3 = {A}")
    thw = check_thw(thw, x.shape[1], has_cls)
    B, N, _ = x.shape
    heads_view = x.as_strided((B, num_heads, N, A // num_heads), (0, 0, 0, 0))
    return check_pool3d_args(
        heads_view, thw, kernel, stride, padding, mode, pool_weight, has_cls, norm_weight, norm_bias, eps,
        weight_name="pool_weight",
    )


def check_pool_residual_add_args(x, thw, kernel, stride, padding, branch, scale, has_cls):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 3-D tensor (B, N, C), got {shape}")
    check_float(x, "x")
    if x.shape[2] < 1:
        raise ValueError(f"x must have C >= 1 channels, got shape {tuple(x.shape)}")
    kernel, stride, padding = check_window(kernel, stride, padding)
    thw = check_thw(thw, x.shape[1], has_cls)
    check_padded_input(thw, kernel, padding)
    out_thw = pool_output_thw(thw, kernel, stride, padding)
    n_out = out_thw[0] * out_thw[1] * out_thw[2] + (1 if has_cls else 0)
    expected = (x.shape[0], n_out, x.shape[2])
    if not isinstance(branch, torch.Tensor) or tuple(branch.shape) != expected:
        got = tuple(branch.shape) if isinstance(branch, torch.Tensor) else type(branch).__name__
        raise ValueError(f"branch must have shape {expected} (the pooled x), got {got}")
    check_same(branch, x, "branch", "x")
    _check_tensor(scale, "scale", optional=True)
    if scale is not None:
        if tuple(scale.shape) != (x.shape[0],):
            raise ValueError(f"scale must have shape ({x.shape[0]},) (one factor per sample), got {tuple(scale.shape)}")
        check_same(scale, x, "scale", "x")
    return thw, kernel, stride, padding, out_thw


def check_attention_args(q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling=False):
    check_flag(residual_pooling, "residual_pooling")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (B, heads, N, d), got {shape}")
    check_float(q, "q")
    check_same(k, q, "k", "q")
    check_same(v, q, "v", "q")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head_dim"
        )
    if q.shape[3] == 0:
        raise ValueError(f"q, k and v need head_dim >= 1, got shape {tuple(q.shape)}")
    thw_q = check_thw(thw_q, q.shape[2], has_cls, "q")
    thw_kv = check_thw(thw_kv, k.shape[2], has_cls, "k")
    for t, name in ((rel_pos_t, "rel_pos_t"), (rel_pos_h, "rel_pos_h"), (rel_pos_w, "rel_pos_w")):
        _check_tensor(t, name, optional=True)
    if (rel_pos_h is None) != (rel_pos_w is None):
        raise ValueError("rel_pos_h and rel_pos_w must be given together")
    d = q.shape[3]
    for t, name in ((rel_pos_t, "rel_pos_t"), (rel_pos_h, "rel_pos_h"), (rel_pos_w, "rel_pos_w")):
        if t is not None:
            if t.dim() != 2 or t.shape[1] != d or t.shape[0] == 0:
                raise ValueError(f"{name} must have shape (L, {d}) with L >= 1, got {tuple(t.shape)}")
            check_same(t, q, name, "q")
    return thw_q, thw_kv


def check_interpolated_tables(q, thw_q, thw_kv, rel_pos_t, rel_pos_h, rel_pos_w) -> None:
    """The registered attention ops take the rel-pos tables already interpolated to
    2 max(Q_a, K_a) - 1 rows (the kernels index them without bounds)."""
    from .reference import rel_pos_table_length  # reference imports this module

    for axis, (t, name) in enumerate(((rel_pos_t, "rel_pos_t"), (rel_pos_h, "rel_pos_h"), (rel_pos_w, "rel_pos_w"))):
        if t is not None:
            rows = rel_pos_table_length(thw_q[axis], thw_kv[axis])
            if t.shape[0] != rows:
                raise ValueError(f"{name} must have {rows} rows (2 max(q, kv) - 1 along its axis, interpolated), "
                                 f"got {tuple(t.shape)}")


def check_rel_pos_mask_args(q, table_t, table_h, table_w, thw_q, thw_kv, has_cls, row0, out) -> None:
    """``mvit_kernels::rel_pos_mask``'s checks (csrc/cpu/rel_pos_mask_cpu.cpp), for its fake."""
    _check_tensor(q, "q")
    _check_tensor(out, "out")
    if q.dim() != 4 or out.dim() != 4:
        raise ValueError(f"q must be (B, heads, N_q, d) and out (B, heads, rows, N_kv), got {tuple(q.shape)} "
                         f"and {tuple(out.shape)}")
    check_float(q, "q")
    check_same(out, q, "out", "q")
    thw_q = check_thw(thw_q, q.shape[2], check_flag(has_cls, "has_cls"), "q")
    thw_kv = triple(thw_kv, "thw_kv")
    n_kv = math.prod(thw_kv) + (1 if has_cls else 0)
    if tuple(out.shape[:2]) != tuple(q.shape[:2]) or out.shape[3] != n_kv:
        raise ValueError(f"out must be ({q.shape[0]}, {q.shape[1]}, rows, {n_kv}), got {tuple(out.shape)}")
    if not 0 <= row0 <= row0 + out.shape[2] <= q.shape[2]:
        raise ValueError(f"rows [{row0}, {row0 + out.shape[2]}) are outside the {q.shape[2]} query rows")
    if (table_h is None) != (table_w is None) or (table_t is None and table_h is None):
        raise ValueError("needs table_t, or table_h and table_w, or all three")
    for axis, (t, name) in enumerate(((table_t, "table_t"), (table_h, "table_h"), (table_w, "table_w"))):
        if t is not None:
            _check_tensor(t, name)
            expected = (thw_q[axis], thw_kv[axis], q.shape[3])
            if tuple(t.shape) != expected:
                raise ValueError(f"{name} must be the gathered table {expected}, got {tuple(t.shape)}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
