"""Parameters and GFLOPs of every preset beside the papers' figures.

    python bench/flops.py            # writes bench/results/flops.md and flops.json

GFLOPs are multiply-adds for one view (the papers' convention), counted on the meta device by
``mvit.flops.count_model``. The "fused" column counts the same model with ``fused=True``: the
project's ops register FLOP formulas equal to what the reference path executes, so the two
columns agree. "fused on CUDA" is what the fused model executes on a GPU, where the blocks the
dispatcher fuses project K/V inside the pooling kernel: fewer FLOPs where the stride leaves tokens
unread (1x8x8), more where overlapping windows are recomputed (1x4x4; the model chose it for bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mvit_kernels  # noqa: E402
from mvit.flops import count_model  # noqa: E402
from mvit.presets import PAPER_FIGURES, PRESETS, get_preset  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _fused_gflops(name: str):
    """None where the fused model cannot be counted here (extension not built)."""
    try:
        return round(count_model(get_preset(name), fused=True).gflops, 3)
    except (RuntimeError, NotImplementedError):
        return None


def _fused_cuda_gflops(name: str, gflops: float):
    """The fused model's multiply-adds on CUDA, where blocks whose K/V stride the dispatcher fuses
    (``use_fused_projection``: MViT-B's blocks 0-2) project k and v per pooling-window tap: the
    reference's projection count minus the tokens no window reads plus the recomputed overlaps.
    None where Triton is not installed."""
    import math

    try:
        from mvit_kernels.triton import pooled_projection as kernels
    except ImportError:
        return None
    cfg = get_preset(name)
    saved = 0
    for spec in cfg.block_specs():
        if not spec.pool_kv or not kernels.use_fused_projection(spec.kernel_kv, spec.stride_kv, spec.input_thw, spec.padding_kv):
            continue
        n = math.prod(spec.input_thw) + (1 if cfg.cls_embed else 0)
        rows = kernels.projected_rows(spec.input_thw, spec.kernel_kv, spec.stride_kv, spec.padding_kv, cfg.cls_embed)
        saved += 2 * (n - rows) * spec.dim_in * spec.attn_dim  # the k and the v slice (< 0: recompute)
    return round(gflops - saved / 1e9, 3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=RESULTS, help="results folder")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    fused_ok = mvit_kernels.load_extension()
    rows = []
    for name in PRESETS:
        count = count_model(get_preset(name))
        fig = PAPER_FIGURES.get(name)
        row = {
            "preset": name,
            "input": "x".join(str(s) for s in count.input_size),
            "params": count.params,
            "gflops": round(count.gflops, 3),
            "gflops_fused": _fused_gflops(name) if fused_ok else None,
            "gflops_fused_cuda": _fused_cuda_gflops(name, count.gflops),
            "paper_params_m": fig.params_m if fig else None,
            "paper_gflops": fig.gflops if fig else None,
            "source": fig.source if fig else "not a paper model",
        }
        if fig:
            row["params_diff_pct"] = round(100 * (count.params / 1e6 - fig.params_m) / fig.params_m, 2)
            row["gflops_diff_pct"] = round(100 * (count.gflops - fig.gflops) / fig.gflops, 2)
        rows.append(row)

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [
        f"# Parameters and GFLOPs (multiply-adds, one view) — {stamp}, torch {torch.__version__}, {platform.machine()}",
        "",
        "| preset | input T×H×W | params | paper params | Δ | GFLOPs | fused GFLOPs | fused on CUDA | paper GFLOPs | Δ | source |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        paper_p = f"{r['paper_params_m']} M" if r["paper_params_m"] else "—"
        paper_g = f"{r['paper_gflops']}" if r["paper_gflops"] else "—"
        dp = f"{r['params_diff_pct']:+.2f}%" if "params_diff_pct" in r else ""
        dg = f"{r['gflops_diff_pct']:+.2f}%" if "gflops_diff_pct" in r else ""
        fused = f"{r['gflops_fused']:.3f}" if isinstance(r["gflops_fused"], float) else "n/a"
        cuda = f"{r['gflops_fused_cuda']:.3f}" if isinstance(r["gflops_fused_cuda"], float) else "n/a"
        lines.append(
            f"| {r['preset']} | {r['input']} | {r['params'] / 1e6:.2f} M | {paper_p} | {dp} | {r['gflops']:.3f} | "
            f"{fused} | {cuda} | {paper_g} | {dg} | {r['source']} |"
        )
    lines += [
        "",
        "GFLOPs: the reference model (`fused=False`), counted by torch's FlopCounterMode on the meta device.",
        "fused GFLOPs: the same count with `fused=True` (the ops' FLOP formulas equal the reference's).",
        "fused on CUDA: what the fused model executes on a GPU, where the blocks whose K/V projection it",
        "fuses with the pooling project per window tap: fewer FLOPs at 1x8x8 strides (unread tokens",
        "skipped), more at 1x4x4 (overlapping windows recomputed, chosen by the byte/FLOP model).",
    ]
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "flops.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "flops.json"), "w") as f:
        json.dump({"date": stamp, "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
