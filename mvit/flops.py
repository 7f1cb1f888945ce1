"""Parameter and FLOP counting (``mvit flops``).

FLOPs follow the papers' convention: multiply-adds for one view (one clip or image), counted by
``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 per multiply-add; halved here) over
matmuls, linears and convolutions. Norms, softmax, pooling and element-wise ops count zero, as in
fvcore and torchvision's tables. The project's own ops register FLOP formulas that count what
the reference path counts; a fused model (``fused=True``) counts fewer only where it skips the
K/V projection of tokens no pooling window reads (``mvit_kernels.pooled_projection``) and, with
a class token, the last block's other tokens (``MViT.forward_features(cls_only=True)``), which
is what it executes off the Triton kernels.

Counting runs on the meta device: no memory is allocated and no arithmetic is done, so even
MViT-B 64x3 counts in about a second.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from mvit_kernels.checks import INT32_MAX

from .config import MViTConfig
from .model import MViT
from .presets import PAPER_FIGURES, PRESETS, get_preset


@dataclass
class StageCount:
    stage: int
    blocks: str
    tokens: int  # grid tokens entering the stage (class token excluded)
    dim: int  # channels the stage outputs
    heads: int
    params: int
    gflops: float


@dataclass
class ModelCount:
    name: str
    input_size: tuple[int, int, int]
    params: int
    gflops: float
    stages: list[StageCount]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _stage_starts(model: MViT) -> list[int]:
    """A new stage starts at every block that pools Q with a stride (resolution drops)."""
    starts = [0] + [i for i, spec in enumerate(model.specs) if spec.pool_skip and i > 0]
    return sorted(set(starts))


def count_model(
    cfg: MViTConfig,
    input_size: Optional[Sequence[int]] = None,
    fused: bool = False,
    device: str = "meta",
    cls_only: Optional[bool] = None,
) -> ModelCount:
    """Parameters and GFLOPs (multiply-adds, one view) of a model, with a per-stage breakdown.

    ``input_size`` (T, H, W) feeds the model an input other than its preset's (the model is
    still built at the preset's size, as when a trained model is evaluated on another crop).
    ``cls_only``: as :meth:`MViT.forward`'s (None: the fused model's last block computes the
    class token alone, the reference's every token).
    """
    t, h, w = tuple(input_size) if input_size is not None else cfg.input_size
    if cfg.patch_2d and t != 1:
        # The image model reads (B, C, H, W): the count would be one frame's under a header of T.
        raise ValueError(f"input_size: {cfg.name} is an image model, T must be 1, got {t}")
    grid = cfg.grid_for((t, h, w))
    if min(t, h, w) < 1 or min(grid) < 1:
        raise ValueError(f"input_size {(t, h, w)} is too small for {cfg.name}'s patch embedding")
    tokens = math.prod(grid)
    if tokens > INT32_MAX:
        # the kernels index a sample's tokens in 32 bits; the attention matrix's size overflowed
        # int64 in torch ("Storage size calculation overflowed") a little above this
        raise ValueError(f"input_size {(t, h, w)} gives {tokens:,} tokens, more than 2^31 - 1")
    with torch.device(device):
        model = MViT(cfg, fused=fused)
    model.eval()
    shape = (1, cfg.in_chans, h, w) if cfg.patch_2d else (1, cfg.in_chans, t, h, w)
    x = torch.empty(shape, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, cls_only=cls_only)
    per_module = counter.get_flop_counts()
    total = counter.get_total_flops() / 2 / 1e9

    starts = _stage_starts(model)
    bounds = list(zip(starts, starts[1:] + [len(model.specs)]))
    stages = []
    # token counts per block come from the same grid arithmetic the model runs
    grid = cfg.grid_for((t, h, w))
    grids = []
    for spec in model.specs:
        grids.append(grid)
        if spec.pool_q:
            grid = tuple((g + 2 * p - k) // s + 1 for g, k, s, p in zip(grid, spec.kernel_q, spec.stride_q, spec.padding_q))
    for index, (lo, hi) in enumerate(bounds):
        flops = 0
        params = 0
        for b in range(lo, hi):
            key = f"MViT.blocks.{b}"
            flops += sum(per_module.get(key, {}).values())
            params += count_parameters(model.blocks[b])
        g = grids[lo]
        stages.append(
            StageCount(
                stage=index + 1,
                blocks=f"{lo}-{hi - 1}" if hi - 1 > lo else f"{lo}",
                tokens=g[0] * g[1] * g[2],
                dim=model.specs[hi - 1].dim_out,
                heads=model.specs[hi - 1].num_heads,
                params=params,
                gflops=flops / 2 / 1e9,
            )
        )
    return ModelCount(cfg.name, (t, h, w), count_parameters(model), total, stages)


def format_count(count: ModelCount) -> str:
    lines = [
        f"{count.name}: input {count.input_size[0]}x{count.input_size[1]}x{count.input_size[2]} (T x H x W), one view",
        f"  parameters: {count.params:,} ({count.params / 1e6:.2f} M)",
        f"  GFLOPs (multiply-adds): {count.gflops:.3f}",
        "",
        f"  {'stage':>5}  {'blocks':>7}  {'tokens in':>9}  {'dim':>5}  {'heads':>5}  {'params (M)':>10}  {'GFLOPs':>8}",
    ]
    for s in count.stages:
        lines.append(
            f"  {s.stage:>5}  {s.blocks:>7}  {s.tokens:>9,}  {s.dim:>5}  {s.heads:>5}  {s.params / 1e6:>10.2f}  {s.gflops:>8.3f}"
        )
    rest = count.gflops - sum(s.gflops for s in count.stages)
    lines.append(f"  {'':>5}  {'stem+head':>7}  {'':>9}  {'':>5}  {'':>5}  {'':>10}  {rest:>8.3f}")
    figures = PAPER_FIGURES.get(count.name)
    if figures is not None:
        # the published figures are for the preset's input: say so beside a count at another size
        t, h, w = get_preset(count.name).input_size
        at = "" if tuple(count.input_size) == (t, h, w) else f" (for {t}x{h}x{w}, not this input)"
        lines.append("")
        lines.append(f"  paper{at}: {figures.gflops} GFLOPs, {figures.params_m} M params ({figures.source})")
        if figures.exact_params is not None:
            lines.append(f"  torchvision{at}: {figures.exact_gflops} GFLOPs, {figures.exact_params:,} params")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    names = sorted(PRESETS) if args.preset == "all" else [args.preset]
    results = []
    for name in names:
        cfg = get_preset(name)
        input_size = None
        if args.input_size is not None:
            input_size = _parse_size(args.input_size, cfg)
        count = count_model(cfg, input_size)
        results.append(count)
        if not args.json:
            print(format_count(count))
            print()
    if args.json:
        print(json.dumps([asdict(c) for c in results], indent=2))
    return 0


def _parse_size(values: Sequence[int], cfg: MViTConfig) -> tuple[int, int, int]:
    if len(values) == 1:
        return (cfg.input_size[0], values[0], values[0])
    if len(values) == 2:
        return (cfg.input_size[0], values[0], values[1])
    if len(values) == 3:
        return (values[0], values[1], values[2])
    raise ValueError(f"--input-size takes 1 (crop), 2 (H W) or 3 (T H W) numbers, got {len(values)}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "flops",
        help="parameters and GFLOPs of a preset, per stage",
        description="Print parameters and GFLOPs (multiply-adds, one view) with a per-stage breakdown.",
    )
    p.add_argument("--preset", required=True, help=f"preset name or 'all' ({', '.join(sorted(PRESETS))})")
    p.add_argument(
        "--input-size",
        type=int,
        nargs="+",
        metavar="N",
        help="input size: CROP, H W, or T H W (default: the preset's)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run)
