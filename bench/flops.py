"""Parameters and GFLOPs of every preset beside the papers' figures.

    python bench/flops.py            # writes bench/results/flops.md and flops.json

GFLOPs are multiply-adds for one view (the papers' convention), counted on the meta device by
``mvit.flops.count_model``. The "fused" column counts the same model with ``fused=True``, as it
runs off the Triton kernels (on CPUs): where a K/V stride is larger than the kernel (MViT-B's
blocks 0-2), k and v are projected only for the tokens some pooling window reads, and the last
block of a model with a class token computes that token's output alone, so it counts fewer;
every other op registers a FLOP formula equal to what the reference executes. "fused on
CUDA" is what the fused model executes on a GPU by the static dispatch rule, where the blocks
the rule fuses project K/V inside the pooling kernel, once per window tap: the unread tokens
skipped, the windows that overlap along t recomputed (the rule chose it for bytes). Per-shape
tuning may pick the gathered path there instead (the "fused" count for that block).
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
    """The fused model's multiply-adds on CUDA by the static rule: ``gflops`` (the reference's
    count with the fused model's class-token-only last block), less, for k and v in every block
    with K/V pooling, the tokens the projection skips. Blocks the rule
    fuses (``use_fused_projection``: MViT-B's blocks 0-2) project per pooling-window tap (the
    unread tokens skipped, overlaps recomputed: "skipped" < 0 where the recompute wins); other
    blocks whose windows leave tokens unread take the gathered path (each read token once).
    None where Triton is not installed."""
    import importlib
    import math

    try:
        from mvit_kernels.triton import pooled_projection as kernels
    except ImportError:
        return None
    pp = importlib.import_module("mvit_kernels.pooled_projection")
    cfg = get_preset(name)
    saved = 0
    for spec in cfg.block_specs():
        if not spec.pool_kv:
            continue
        geometry = (spec.input_thw, spec.kernel_kv, spec.stride_kv, spec.padding_kv)
        n = math.prod(spec.input_thw) + (1 if cfg.cls_embed else 0)
        if kernels.use_fused_projection(spec.kernel_kv, spec.stride_kv, spec.input_thw, spec.padding_kv):
            rows = kernels.projected_rows(*geometry, cfg.cls_embed)
        elif pp.read_grid(*geometry) is not None:
            rows = pp.read_token_index(*geometry, cfg.cls_embed, "meta").numel()
        else:
            continue
        saved += 2 * (n - rows) * spec.dim_in * spec.attn_dim  # the k and the v slice
    return round(gflops - saved / 1e9, 3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    parser.add_argument("--out", default=RESULTS, help="results folder")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    fused_ok = mvit_kernels.load_extension()
    rows = []
    for name in PRESETS:
        cfg = get_preset(name)
        count = count_model(cfg)
        fig = PAPER_FIGURES.get(name)
        row = {
            "preset": name,
            "input": "x".join(str(s) for s in count.input_size),
            "params": count.params,
            "gflops": round(count.gflops, 3),
            "gflops_fused": _fused_gflops(name) if fused_ok else None,
            "gflops_fused_cuda": _fused_cuda_gflops(name, count_model(cfg, cls_only=cfg.cls_embed).gflops),
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
        "fused GFLOPs: the same count with `fused=True`, as it runs on CPUs: k and v projected only for the",
        "tokens some pooling window reads where a K/V stride exceeds the kernel (MViT-B's blocks 0-2), and, in",
        "models with a class token, the last block computing the class token's output alone (the classifier",
        "reads nothing else); every other op's FLOP formula equals the reference's.",
        "fused on CUDA: what the fused model executes on a GPU by the static rule, where the blocks whose K/V",
        "projection it fuses with the pooling project per window tap: unread tokens skipped, windows that",
        "overlap along t recomputed (chosen by the byte/FLOP model). Per-shape tuning may take the gathered",
        "path of the fused column there instead.",
    ]
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "flops.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "flops.json"), "w") as f:
        json.dump({"date": stamp, "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(text)
    print(f"wrote {os.path.join(args.out, 'flops')}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
