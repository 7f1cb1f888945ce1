"""Typed model configuration.

A preset is written in the compact stage grammar of pySlowFast (``DIM_MUL``, ``HEAD_MUL``,
``POOL_Q_STRIDE``, ``POOL_KV_STRIDE_ADAPTIVE``, ``POOL_KVQ_KERNEL``) as an :class:`MViTConfig`;
:meth:`MViTConfig.block_specs` expands it into one explicit :class:`BlockSpec` per block (as
torchvision's ``MSBlockConfig``), which is all the model reads. The expansion reproduces the
reference code's arithmetic exactly (``round_width``, the adaptive K/V stride rule, floor
division of the grid at Q-pooling blocks), so that parameter shapes match its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Optional

from mvit_kernels.checks import pool_output_size

Triple = tuple[int, int, int]
PoolMode = Literal["conv", "avg", "max"]


#: pySlowFast's DATA.MEAN / DATA.STD for Kinetics (and every video dataset here, by default).
KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)
#: ImageNet's, for the image models and for video models fine-tuned from ImageNet-21K weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def round_width(width: float, multiplier: float, min_width: int = 1, divisor: int = 1) -> int:
    """pySlowFast's channel rounding: nearest multiple of ``divisor``, never below 90%."""
    if not multiplier:
        return int(width)
    width *= multiplier
    min_width = min_width or divisor
    width_out = max(min_width, int(width + divisor / 2) // divisor * divisor)
    if width_out < 0.9 * width:
        width_out += divisor
    return int(width_out)


def _tuples(values: dict) -> dict:
    """JSON gives lists where the config holds tuples (nested for the stage grammar)."""

    def conv(v):
        return tuple(conv(x) for x in v) if isinstance(v, (list, tuple)) else v

    return {k: conv(v) for k, v in values.items()}


def _prod(values) -> int:
    return math.prod(values)


@dataclass(frozen=True)
class BlockSpec:
    """Everything one MultiScaleBlock needs, explicit (no config lookups inside the model)."""

    dim_in: int
    dim_out: int
    attn_dim: int  # dim_out with MViTv2's dim_mul_in_att, else dim_in
    num_heads: int
    kernel_q: Triple
    stride_q: Triple
    kernel_kv: Triple
    stride_kv: Triple
    input_thw: Triple  # token grid at the preset's input size (sizes the rel-pos tables)
    drop_path: float

    @property
    def head_dim(self) -> int:
        return self.attn_dim // self.num_heads

    @property
    def pool_q(self) -> bool:
        return _prod(self.kernel_q) > 1 or _prod(self.stride_q) > 1

    @property
    def pool_kv(self) -> bool:
        return _prod(self.kernel_kv) > 1 or _prod(self.stride_kv) > 1

    @property
    def pool_skip(self) -> bool:
        return _prod(self.stride_q) > 1

    @property
    def kernel_skip(self) -> Triple:
        return tuple(s + 1 if s > 1 else s for s in self.stride_q)  # type: ignore[return-value]

    @property
    def padding_skip(self) -> Triple:
        return tuple(k // 2 for k in self.kernel_skip)  # type: ignore[return-value]

    @property
    def padding_q(self) -> Triple:
        return tuple(k // 2 for k in self.kernel_q)  # type: ignore[return-value]

    @property
    def padding_kv(self) -> Triple:
        return tuple(k // 2 for k in self.kernel_kv)  # type: ignore[return-value]


@dataclass(frozen=True)
class MViTConfig:
    """A whole model in the reference repositories' stage grammar.

    Block indices in ``dim_mul``, ``head_mul`` and ``pool_q_stride`` are 0-based block numbers,
    as in pySlowFast's YAML files. All spatial triples are (t, h, w); image models use t = 1.
    """

    name: str = "custom"
    num_classes: int = 400
    input_size: Triple = (16, 224, 224)  # (frames, height, width)
    in_chans: int = 3
    patch_kernel: Triple = (3, 7, 7)
    patch_stride: Triple = (2, 4, 4)
    patch_padding: Triple = (1, 3, 3)
    patch_2d: bool = False  # image models: Conv2d patch embedding, (B, C, H, W) input
    embed_dim: int = 96
    num_heads: int = 1
    depth: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dim_mul: tuple[tuple[int, float], ...] = ((1, 2.0), (3, 2.0), (14, 2.0))
    head_mul: tuple[tuple[int, float], ...] = ((1, 2.0), (3, 2.0), (14, 2.0))
    pool_q_stride: tuple[tuple[int, int, int, int], ...] = ((1, 1, 2, 2), (3, 1, 2, 2), (14, 1, 2, 2))
    pool_kvq_kernel: Optional[Triple] = (3, 3, 3)  # None: kernel = stride + 1 where stride > 1
    pool_kv_stride_adaptive: Optional[Triple] = (1, 8, 8)
    pool_kv_stride: tuple[tuple[int, int, int, int], ...] = ()  # explicit, when not adaptive
    pool_mode: PoolMode = "conv"
    cls_embed: bool = True
    abs_pos: Literal["separate", "joint", "none"] = "separate"
    rel_pos_spatial: bool = False
    rel_pos_temporal: bool = False
    rel_pos_zero_init: bool = False
    residual_pooling: bool = False
    # Whether the residual pooling connection adds the pooled q to the class token's output too:
    # facebookresearch/mvit's image models (and timm's port) do, pySlowFast and torchvision do not.
    residual_pooling_cls: bool = False
    dim_mul_in_att: bool = False
    drop_path_rate: float = 0.2
    head_dropout: float = 0.5
    norm_eps: float = 1e-6
    # LayerNorm eps after Q/K/V pooling; None: norm_eps. pytorchvideo's MViT builds those norms with
    # torch's default, 1e-5, and its other norms with 1e-6.
    pool_norm_eps: Optional[float] = None
    # Blocks whose K/V pooling is switched off even though the grammar gives it (old pySlowFast
    # checkpoints built kernel = stride + 1, so stride-1 blocks had no K/V pooling; SlowFast#456).
    no_kv_pool_blocks: tuple[int, ...] = ()
    # Frames of the source video (at the data's target fps, 30 by default) from one of a clip's
    # frames to the next: pySlowFast's DATA.SAMPLING_RATE, the 4 of "16x4" and the 3 of "32x3".
    # What the weights were trained on; video runs and evaluations sample at it unless told.
    sampling_rate: int = 4
    # The per-channel mean and std (RGB, of pixels in [0, 1]) the weights expect their input
    # normalized with (pySlowFast's DATA.MEAN / DATA.STD). None: the data pipeline's defaults,
    # Kinetics' 0.45 / 0.225 for video and ImageNet's for images. MViTv2-L 40x3, fine-tuned from
    # ImageNet-21K weights, was trained and released with ImageNet's.
    input_mean: Optional[tuple[float, float, float]] = None
    input_std: Optional[tuple[float, float, float]] = None

    def replace(self, **changes) -> "MViTConfig":
        unknown = set(changes) - set(field_names())
        if unknown:
            raise ValueError(f"unknown MViTConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **_tuples(changes))

    def to_dict(self) -> dict:
        """Plain types only (lists for tuples), for JSON and checkpoints."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data) -> "MViTConfig":
        if not isinstance(data, Mapping):
            raise TypeError(f"an MViTConfig is read from a mapping of its fields, got {type(data).__name__}")
        unknown = set(data) - set(field_names())
        if unknown:
            raise ValueError(f"unknown MViTConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**_tuples(dict(data)))

    def grid_for(self, input_size: Triple) -> Triple:
        """Token grid after patch embedding of an input of ``input_size`` (T, H, W)."""
        return tuple(  # type: ignore[return-value]
            (s + 2 * p - k) // st + 1
            for s, k, st, p in zip(input_size, self.patch_kernel, self.patch_stride, self.patch_padding)
        )

    @property
    def patch_grid(self) -> Triple:
        """Token grid after patch embedding at the preset's ``input_size``."""
        return self.grid_for(self.input_size)

    def normalization(self, image: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) to normalize input pixels in [0, 1] with: the config's, else ImageNet's for
        image data and Kinetics' for video."""
        if self.input_mean is not None and self.input_std is not None:
            return tuple(self.input_mean), tuple(self.input_std)
        return (IMAGENET_MEAN, IMAGENET_STD) if image else (KINETICS_MEAN, KINETICS_STD)

    @property
    def head_pool(self) -> str:
        return "cls" if self.cls_embed else "mean"

    def validate(self) -> None:
        for name in ("depth", "num_classes", "in_chans", "embed_dim", "num_heads", "sampling_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for f in dataclasses.fields(self):
            # the type-hinted bools: a string such as "False" is truthy and built the opposite model
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be True or False, got {getattr(self, f.name)!r}")
        if not _is_number(self.mlp_ratio) or not self.mlp_ratio > 0 or not math.isfinite(self.mlp_ratio):
            raise ValueError(f"mlp_ratio must be > 0 (a finite number), got {self.mlp_ratio!r}")
        if not _is_number(self.head_dropout) or not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must be a number in [0, 1), got {self.head_dropout!r}")
        for name, value in (("norm_eps", self.norm_eps), ("pool_norm_eps", self.pool_norm_eps)):
            if value is None and name == "pool_norm_eps":
                continue
            if not _is_number(value) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("input_size", "patch_kernel", "patch_stride", "patch_padding"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 3 or not all(_is_int(v) for v in value):
                raise ValueError(f"{name} must be a (t, h, w) triple of ints, got {value!r}")
            least = 0 if name == "patch_padding" else 1
            if any(v < least for v in value):
                raise ValueError(f"{name} entries must be >= {least}, got {value!r}")
        if any(p >= k for p, k in zip(self.patch_padding, self.patch_kernel)):
            # the border patches would read padding alone
            raise ValueError(f"patch_padding {self.patch_padding} must be below patch_kernel {self.patch_kernel} "
                             f"on every axis")
        for name in ("pool_kvq_kernel", "pool_kv_stride_adaptive"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (tuple, list)) or len(value) != 3
                                      or not all(_is_int(v) and v >= 1 for v in value)):
                raise ValueError(f"{name} must be None or a (t, h, w) triple of ints >= 1, got {value!r}")
        if self.patch_2d and (self.input_size[0] != 1 or self.patch_kernel[0] != 1 or self.patch_stride[0] != 1):
            raise ValueError("patch_2d models need input_size, patch_kernel and patch_stride with t = 1")
        if self.pool_mode not in ("conv", "avg", "max"):
            raise ValueError(f"pool_mode must be 'conv', 'avg' or 'max', got {self.pool_mode!r}")
        if self.abs_pos not in ("separate", "joint", "none"):
            raise ValueError(f"abs_pos must be 'separate', 'joint' or 'none', got {self.abs_pos!r}")
        if self.residual_pooling_cls and not self.residual_pooling:
            raise ValueError("residual_pooling_cls=True needs residual_pooling=True (it says which rows that connection adds to)")
        for name in ("dim_mul", "head_mul", "pool_q_stride", "pool_kv_stride", "no_kv_pool_blocks"):
            if not isinstance(getattr(self, name), (tuple, list)):
                raise ValueError(f"{name} must be a list (one entry per block it changes), got {getattr(self, name)!r}")
        for name in ("dim_mul", "head_mul"):
            for entry in getattr(self, name):
                if (not isinstance(entry, (tuple, list)) or len(entry) != 2 or not _is_int(entry[0])
                        or not _is_number(entry[1]) or not 0 < entry[1] < math.inf):
                    raise ValueError(f"{name} entries must be (block: int, finite multiplier > 0) pairs, got {entry!r}")
                if not 0 <= entry[0] <= self.depth:
                    raise ValueError(f"{name} block index {entry[0]} outside 0..{self.depth}")
            _check_one_entry_per_block(name, getattr(self, name))
        for name in ("pool_q_stride", "pool_kv_stride"):
            for entry in getattr(self, name):
                if (not isinstance(entry, (tuple, list)) or len(entry) != 4 or not all(_is_int(v) for v in entry)
                        or not 0 <= entry[0] < self.depth or any(s < 1 for s in entry[1:])):
                    raise ValueError(f"{name} entry {entry!r} must be (block < {self.depth}, t, h, w), ints, "
                                     f"strides >= 1")
            _check_one_entry_per_block(name, getattr(self, name))
        if self.pool_kv_stride and self.pool_kv_stride_adaptive is not None:
            # The adaptive rule wins in block_specs: the explicit strides were dropped, silently.
            raise ValueError("pool_kv_stride and pool_kv_stride_adaptive are exclusive: "
                             "set pool_kv_stride_adaptive=None to give the K/V strides per block")
        for i in self.no_kv_pool_blocks:
            if not _is_int(i) or not 0 <= i < self.depth:
                raise ValueError(f"no_kv_pool_blocks entries must be block indices in 0..{self.depth - 1}, got {i!r}")
        for name in ("input_mean", "input_std"):
            value = getattr(self, name)
            if value is None:
                continue
            if (not isinstance(value, (tuple, list)) or len(value) != 3
                    or not all(_is_number(v) and math.isfinite(v) for v in value)):
                raise ValueError(f"{name} must be None or three finite numbers (R, G, B), got {value!r}")
            if name == "input_std" and not all(v > 0 for v in value):
                raise ValueError(f"input_std entries must be > 0, got {value!r}")
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("input_mean and input_std go together: set both or neither")
        if not _is_number(self.drop_path_rate) or not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be a number in [0, 1), got {self.drop_path_rate!r}")
        if any(s < 1 for s in self.patch_grid):
            raise ValueError(f"input_size {self.input_size} is too small for the patch embedding")

    def block_specs(self) -> list[BlockSpec]:
        """Expand the stage grammar into one explicit spec per block (pySlowFast's rules)."""
        self.validate()
        depth = self.depth
        dim_mul = [1.0] * (depth + 1)
        head_mul = [1.0] * (depth + 1)
        for i, mul in self.dim_mul:
            dim_mul[i] = mul
        for i, mul in self.head_mul:
            head_mul[i] = mul

        def default_kernel(stride: Triple) -> Triple:
            if self.pool_kvq_kernel is not None:
                return tuple(self.pool_kvq_kernel)  # type: ignore[return-value]
            return tuple(s + 1 if s > 1 else s for s in stride)  # type: ignore[return-value]

        none: Triple = (1, 1, 1)
        stride_q: list[Optional[Triple]] = [None] * depth
        for i, *s in self.pool_q_stride:
            stride_q[i] = tuple(s)  # type: ignore[assignment]
        kernel_q = [default_kernel(s) if s is not None else none for s in stride_q]

        stride_kv: list[Optional[Triple]] = [None] * depth
        if self.pool_kv_stride_adaptive is not None:
            current = list(self.pool_kv_stride_adaptive)
            for i in range(depth):
                if stride_q[i] is not None:
                    current = [max(c // s, 1) for c, s in zip(current, stride_q[i])]
                stride_kv[i] = tuple(current)  # type: ignore[assignment]
        else:
            for i, *s in self.pool_kv_stride:
                stride_kv[i] = tuple(s)  # type: ignore[assignment]
        kernel_kv = [default_kernel(s) if s is not None else none for s in stride_kv]
        for i in self.no_kv_pool_blocks:
            kernel_kv[i] = none
            stride_kv[i] = none

        if depth > 1:
            drop_path = [self.drop_path_rate * i / (depth - 1) for i in range(depth)]
        else:
            drop_path = [0.0]
        specs = []
        embed_dim = self.embed_dim
        num_heads = self.num_heads
        # thw: pySlowFast's floor(n / stride) grids, which size the rel-pos tables (as its
        # checkpoints have them); grid: the grids the poolings give (n + 2 (k // 2) - k) // s + 1,
        # which the checks of what forward will do need (they differ where a stride does not divide)
        thw = grid = self.patch_grid
        for i in range(depth):
            num_heads = round_width(num_heads, head_mul[i])
            if self.dim_mul_in_att:
                dim_out = round_width(embed_dim, dim_mul[i], divisor=round_width(num_heads, head_mul[i]))
            else:
                dim_out = round_width(embed_dim, dim_mul[i + 1], divisor=round_width(num_heads, head_mul[i + 1]))
            attn_dim = dim_out if self.dim_mul_in_att else embed_dim
            if int(attn_dim * self.mlp_ratio) < 1:
                raise ValueError(f"block {i}: mlp_ratio {self.mlp_ratio} gives its MLP (width {attn_dim}) no hidden "
                                 f"units")
            if attn_dim % num_heads:
                raise ValueError(f"block {i}: attention dim {attn_dim} is not divisible by {num_heads} heads")
            specs.append(
                BlockSpec(
                    dim_in=embed_dim,
                    dim_out=dim_out,
                    attn_dim=attn_dim,
                    num_heads=num_heads,
                    kernel_q=kernel_q[i],
                    stride_q=stride_q[i] or none,
                    kernel_kv=kernel_kv[i],
                    stride_kv=stride_kv[i] or none,
                    input_thw=thw,
                    drop_path=drop_path[i],
                )
            )
            if self.pool_mode == "avg":
                _check_avg_windows(i, grid, specs[-1])
            if stride_q[i] is not None:
                check_q_grid_is_the_skips(i, grid, kernel_q[i], stride_q[i])
                grid = tuple(_pooled_length(n, k, st) for n, k, st in zip(grid, kernel_q[i], stride_q[i]))  # type: ignore[assignment]
                thw = tuple(max(s // st, 1) for s, st in zip(thw, stride_q[i]))  # type: ignore[assignment]
            embed_dim = dim_out
        if self.rel_pos_spatial:
            for i, spec in enumerate(specs):
                length = self.rel_pos_lengths(spec)[0]
                if length < 1:  # the reference code's zeros(-1, d) would fail with no word of why
                    raise ValueError(
                        f"block {i}: rel_pos_spatial sizes its tables from max(H, W) = {max(spec.input_thw[1:])} "
                        f"of its {spec.input_thw} grid divided by the q and kv strides along h ({spec.stride_q[1]}, "
                        f"{spec.stride_kv[1]}), as the reference code does: both are 0, a table of {length} "
                        "entries; use a larger input_size or smaller strides"
                    )
        return specs

    def rel_pos_lengths(self, spec: BlockSpec) -> tuple[int, int]:
        """(spatial, temporal) rel-pos table lengths of a block, as the reference code sizes them."""
        t, h, w = spec.input_thw
        size = max(h, w)
        q_size = size // spec.stride_q[1]
        kv_size = size // spec.stride_kv[1]
        return 2 * max(q_size, kv_size) - 1, 2 * t - 1


def _check_one_entry_per_block(name: str, entries) -> None:
    """A second entry for a block replaced the first without a word."""
    seen = [entry[0] for entry in entries]
    repeated = sorted({i for i in seen if seen.count(i) > 1})
    if repeated:
        raise ValueError(f"{name} gives block {repeated[0]} more than one entry: {list(entries)!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pooled_length(n: int, kernel: int, stride: int) -> int:
    """Length of an axis of n tokens pooled as the model pools (padding kernel // 2)."""
    return pool_output_size(n, kernel, stride, kernel // 2)


def _check_avg_windows(block: int, grid: Triple, spec: BlockSpec) -> None:
    """Average pooling (count_include_pad, torch's avg_pool3d) refuses a grid smaller than its
    kernel on some axis, where conv and max pooling pad it: fail when blocks are built at the
    config's input_size, naming the block, not in forward."""
    for what, pooled, kernel in (("q", spec.pool_q, spec.kernel_q), ("k/v", spec.pool_kv, spec.kernel_kv)):
        for axis, n, k in zip("thw", grid, kernel):
            if pooled and n < k:
                raise ValueError(
                    f"block {block}: avg pooling of {what} with kernel {tuple(kernel)} on its {tuple(grid)} grid "
                    f"(axis {axis}: {n} < {k}): average pooling needs the grid at least the kernel on every axis; "
                    "use pool_mode 'conv' or 'max', a smaller pool_kvq_kernel or a larger input_size"
                )


def check_q_grid_is_the_skips(block: int, thw: Triple, kernel: Triple, stride: Triple) -> None:
    """The pooled q and the max-pooled skip (kernel stride + 1 where stride > 1, padding kernel // 2)
    must give the same grid, or the residual add fails in forward with an error about its branch.
    Checked for the config's input_size when blocks are built, and by each block in forward for
    the grid it gets (another input size may give another parity).
    (n + 2 * (k // 2) - k) // s + 1 depends on k only through its parity: an even q kernel where
    the skip's is odd (or the reverse) gives another grid wherever s divides n."""
    for axis, n, k, s in zip("thw", thw, kernel, stride):
        k_skip = s + 1 if s > 1 else s
        q_len, skip_len = (_pooled_length(n, kk, s) for kk in (k, k_skip))
        if q_len != skip_len:
            raise ValueError(
                f"block {block}: q pooling with kernel {tuple(kernel)} (pool_kvq_kernel) and stride {tuple(stride)} "
                f"gives {q_len} tokens on axis {axis} of the {tuple(thw)} grid, the skip's pooling (kernel {k_skip}) "
                f"{skip_len}: on that axis the kernel must be {'odd' if k_skip % 2 else 'even'}"
            )


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(MViTConfig)]


__all__ = ["BlockSpec", "MViTConfig", "round_width", "field_names"]
