"""linear (+ GELU), fused path: on the CPU, for inference in float32, one oneDNN matmul with the
bias and GELU applied as post-ops (``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU
backend uses) instead of ``addmm`` (which first copies the broadcast bias into the output) and a
separate GELU pass over the MLP's widest activation. Measured on the 2-core VM: MViT-B 16x4 batch 1
inference 0.95 s -> 0.71 s with the MLPs alone switched (2026-11-24, medians of 4 alternating runs).

Under ``torch.compile`` the same inference path is the registered op
``mvit_kernels::linear_onednn`` (opaque to Inductor, which lowers ``_linear_pointwise`` only for
frozen, constant weights): without it the compiled fused model ran the reference's linear and was
slower than the eager one (788 vs 523 ms, MViT-B 16x4 batch 1, `throughput_cpu.md`).

Everywhere else (CUDA, gradients needed, other dtypes, autocast, dispatch modes such as
FlopCounterMode, a torch build without oneDNN) it is the reference, so FLOP counts, autograd and
autocast behave as the reference's.

``mlp`` (fc1 + GELU, fc2) on the same eager inference path runs token chunks where the hidden
activation is large: glibc hands every allocation above 32 MiB fresh pages from the OS, and the
first touch of each page faults. MViT-B 16x4's block 0 (25,089 tokens x 384 hidden, 38.5 MB) spent
~12 of its ~58 ms there (2-core VM, 2026-12-06). Chunks of at most ``MLP_CHUNK_BYTES`` of hidden
activation reuse memory the process holds, and the block's peak memory drops by as much.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import autocast, reference
from ._dispatch import intercepted, needs_grad
from .checks import as_op_error, check_linear_args, check_mlp_args


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_linear_available()


def _run_onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool) -> Tensor:
    attr, algorithm = ("gelu", "none") if gelu else ("none", "")
    # oneDNN reads the bias as dense whatever its strides (a strided one gave a silent wrong answer).
    bias = None if bias is None else bias.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, attr, [], algorithm)


@torch.library.custom_op("mvit_kernels::linear_onednn", mutates_args=())
def _linear_onednn_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool) -> Tensor:
    """The oneDNN inference linear as torch.compile sees it (no autograd: only used without grad)."""
    _check_op(x, weight, bias)
    return _run_onednn(x, weight, bias, gelu)


@_linear_onednn_op.register_fake
def _linear_onednn_fake(x, weight, bias, gelu):
    _check_op(x, weight, bias)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _check_op(x, weight, bias) -> None:
    # oneDNN reads a weight of another rank as the 2-D one, silently (see check_linear_args)
    with as_op_error("mvit_kernels.linear_onednn"):
        check_linear_args(x, weight, bias)
        for t, name in ((x, "x"), (weight, "weight"), (bias, "bias")):
            if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
                raise TypeError(f"{name} must be a float32 CPU tensor (the oneDNN path's), got {t.dtype} on {t.device}")


def uses_onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """The dispatch rule of :func:`linear`."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    return (
        _ONEDNN
        and all(isinstance(t, Tensor) for t in tensors)  # else the reference's checks name the argument
        and x.device.type == "cpu"
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and x.dim() >= 2
        and x.shape[-1] > 0  # oneDNN cannot describe an empty reduction; the reference gives the bias
        and not needs_grad(tensors)
        and (torch.compiler.is_compiling() or not intercepted(x))  # traced: the registered op
        and autocast.autocast_dtype(x) is None  # under autocast F.linear runs in its dtype
    )


#: Hidden activations above this many bytes page-fault on every call (glibc's largest mmap
#: threshold): the eager oneDNN ``mlp`` splits the tokens from there on ...
MLP_CHUNKED_ABOVE_BYTES = 32 << 20
#: ... into chunks whose hidden activation is at most this many bytes.
MLP_CHUNK_BYTES = 8 << 20


def mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
        fc2_bias: Optional[Tensor]) -> Tensor:
    """Same contract as :func:`mvit_kernels.reference.mlp`."""
    check_mlp_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    hidden = fc1_weight.shape[0]
    if (
        torch.compiler.is_compiling()  # the compiler plans the buffers itself
        or not uses_onednn(x, fc1_weight, fc1_bias)
        or not uses_onednn(x, fc2_weight, fc2_bias)
        or x.numel() // max(1, x.shape[-1]) * hidden * x.element_size() <= MLP_CHUNKED_ABOVE_BYTES
    ):
        return linear(linear(x, fc1_weight, fc1_bias, "gelu"), fc2_weight, fc2_bias)
    rows = x.reshape(-1, x.shape[-1])
    out = x.new_empty(rows.shape[0], fc2_weight.shape[0])
    chunk = max(1, MLP_CHUNK_BYTES // (hidden * x.element_size()))
    for start in range(0, rows.shape[0], chunk):
        h = linear(rows[start:start + chunk], fc1_weight, fc1_bias, "gelu")
        out[start:start + chunk] = linear(h, fc2_weight, fc2_bias)
    return out.reshape(*x.shape[:-1], fc2_weight.shape[0])


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    """Same contract as :func:`mvit_kernels.reference.linear`."""
    if activation not in (None, "gelu"):
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    if not uses_onednn(x, weight, bias):
        return reference.linear(x, weight, bias, activation)
    check_linear_args(x, weight, bias)
    if torch.compiler.is_compiling():
        return _linear_onednn_op(x, weight, bias, activation == "gelu")
    return _run_onednn(x, weight, bias, activation == "gelu")
