"""Where one attention call's time goes on a GPU: torch.profiler over fwd+bwd of the Triton path
(and SDPA for comparison) at one MViT block's shapes, CPU and CUDA time per op.

    python bench/profile_attention.py --preset mvit_b_16x4 --block 15 --batch 1 [--rel-pos]

Prints the profiler tables (top ops by self CPU time, then by CUDA time) and the wall time per
call with and without a device synchronization, which together say whether a call is bound by
host overhead (CPU time per call above GPU time) or by the kernels.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import importlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_attention import block_shapes  # noqa: E402

pa = importlib.import_module("mvit_kernels.pooling_attention")


def timed_and_profiled(step, iters: int):
    """(host seconds per step, seconds per step with the device drained, profiler of 5 steps),
    after 3 warm-up steps."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    host = (time.perf_counter() - t0) / iters
    torch.cuda.synchronize()
    total = (time.perf_counter() - t0) / iters
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    return host, total, prof


def profile_module(args) -> int:
    import math

    from mvit import model as model_module
    from mvit.presets import get_preset
    from throughput import sdpa_in_reference

    cfg = get_preset(args.preset)
    if args.rel_pos:  # as for the bare attention below: MViTv2's rel-pos tables and residual pooling
        cfg = cfg.replace(rel_pos_spatial=True, rel_pos_temporal=True, residual_pooling=True)
    spec = cfg.block_specs()[args.block]
    attn = model_module.MultiScaleAttention(spec, cfg).cuda()
    n = math.prod(spec.input_thw) + (1 if cfg.cls_embed else 0)
    x = torch.randn(args.batch, n, spec.dim_in, device="cuda", requires_grad=True)
    for name, fused in (("fused", True), ("ref+sdpa", False)):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out, _ = attn(x, spec.input_thw, fused)
            out.backward(torch.ones_like(out))
        with sdpa_in_reference():
            host, total, prof = timed_and_profiled(step, args.iters)
        print(f"\n## module {name}: {args.preset} block {args.block} B={args.batch}: host {host * 1e3:.3f} ms, "
              f"with sync {total * 1e3:.3f} ms per fwd+bwd")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=70))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    parser.add_argument("--preset", default="mvit_b_16x4")
    parser.add_argument("--block", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rel-pos", action="store_true")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--module", action="store_true",
                        help="profile the whole MultiScaleAttention module (bf16 autocast), fused vs reference+SDPA")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_attention: profiles the CUDA kernels, and no CUDA device is here", file=sys.stderr)
        return 1
    if args.module:
        return profile_module(args)
    shape = next(s for s in block_shapes(args.preset, args.batch) if s["block"] == args.block)
    B, H, d = shape["batch"], shape["heads"], shape["d"]
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16).requires_grad_()
    q, k, v = mk(B, H, shape["n_q"], d), mk(B, H, shape["n_kv"], d), mk(B, H, shape["n_kv"], d)
    tabs = [None, None, None]
    if args.rel_pos:
        tabs = [mk(2 * max(a, b) - 1, d) for a, b in zip(shape["thw_q"], shape["thw_kv"])]
    for name, fn in (("triton", pa.triton_pooling_attention), ("sdpa", pa._sdpa_pooling_attention)):
        def step():
            out = fn(q, k, v, shape["thw_q"], shape["thw_kv"], shape["has_cls"], *tabs, args.rel_pos)
            out.backward(torch.ones_like(out))
        host, total, prof = timed_and_profiled(step, args.iters)
        print(f"\n## {name}: block {args.block} B={B} heads={H} L_q={shape['n_q']} L_kv={shape['n_kv']} rel={args.rel_pos}: "
              f"host time per call {host * 1e3:.3f} ms, with sync {total * 1e3:.3f} ms")
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
        print(table.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=60))
        # Python-level host time (what the profiler's op rows lump into "self CPU").
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.iters):
            step()
        profiler.disable()
        torch.cuda.synchronize()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
