"""Benchmark the C++/CUDA pooling ops against the plain-PyTorch reference at MViT-B 16x4 shapes.

Cases (derived from ``mvit.build_model("mvit_b_16x4").specs``, the blocks where each pooling
first appears):
- pool3d, conv mode + LayerNorm: K/V pooling of block 0 (stride (1,8,8)), Q and K/V pooling of
  block 1 (strides (1,2,2) and (1,4,4)); x is the strided q/k/v view of the qkv projection, as in
  the model;
- pool_residual_add: block 1's max-pooled skip + scale * attention branch.
Batch 1 and 4, forward and forward+backward, median of repeats with min/max printed, ratio
reference / op (>1: the op is faster). The reference runs in both of its grid layouts
(``reference.pool3d``'s contiguous_grid: the channels-last view, and torchvision's contiguous
NCDHW copy, which reach different kernels on CUDA); the ratio is against the faster one, which
is what per-shape tuning would run in the op's place. On CPU the threads are fixed (default 2). On a GPU, CUDA
events time it and the achieved bandwidth (the minimum bytes each pass must move: inputs read
once, outputs written once) is reported against the GPU's copy bandwidth from --ceilings
(bench/ceilings.py), else against the H100's 3.0 TB/s (the issues' figure).

    python bench/bench_pool_ops.py [--device cpu|cuda] [--threads 2] [--repeats 5] [--dtype float32]
                                   [--ceilings ceilings.json]

Writes bench/results/pool_ops_<device>[_<dtype> unless float32][<suffix>].md and .json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mvit_kernels  # noqa: E402
from mvit import build_model  # noqa: E402
from mvit_kernels import reference, tuning  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ceilings import load as load_ceilings  # noqa: E402


@dataclass
class Case:
    name: str
    op: str  # "pool3d" | "pool_residual_add"
    batch: int
    heads: int
    thw: tuple
    dim: int  # head_dim for pool3d, channels for pool_residual_add
    kernel: tuple
    stride: tuple
    padding: tuple


def mvit_b_cases(batch: int) -> list[Case]:
    specs = build_model("mvit_b_16x4").specs
    cases = []
    b0, b1 = specs[0], specs[1]
    cases.append(Case(f"b0 kv pool conv+LN stride{b0.stride_kv}", "pool3d", batch, b0.num_heads, b0.input_thw,
                      b0.head_dim, b0.kernel_kv, b0.stride_kv, b0.padding_kv))
    cases.append(Case(f"b1 q pool conv+LN stride{b1.stride_q}", "pool3d", batch, b1.num_heads, b1.input_thw,
                      b1.head_dim, b1.kernel_q, b1.stride_q, b1.padding_q))
    cases.append(Case(f"b1 kv pool conv+LN stride{b1.stride_kv}", "pool3d", batch, b1.num_heads, b1.input_thw,
                      b1.head_dim, b1.kernel_kv, b1.stride_kv, b1.padding_kv))
    cases.append(Case(f"b1 skip maxpool{b1.kernel_skip}+add", "pool_residual_add", batch, 1, b1.input_thw,
                      b1.dim_in, b1.kernel_skip, b1.stride_q, b1.padding_skip))
    return cases


def make_inputs(case: Case, device, dtype, grad: bool):
    g = torch.Generator().manual_seed(0)
    T, H, W = case.thw
    n = 1 + T * H * W
    out = [(s + 2 * p - k) // st + 1 for s, k, st, p in zip(case.thw, case.kernel, case.stride, case.padding)]
    n_out = 1 + out[0] * out[1] * out[2]

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    if case.op == "pool3d":
        d = case.dim
        # q/k/v as the model has them: a strided view of the qkv projection output.
        qkv = rand(case.batch, n, 3, case.heads, d).requires_grad_(grad)
        x = qkv.permute(2, 0, 3, 1, 4)[1]
        leaves = [qkv, rand(d, 1, *case.kernel, s=0.2).requires_grad_(grad),
                  (1 + rand(d, s=0.1)).requires_grad_(grad), rand(d, s=0.1).requires_grad_(grad)]
        args = (x, case.thw, case.kernel, case.stride, case.padding, "conv", leaves[1], True, leaves[2], leaves[3])
        bytes_fwd = x.numel() * x.element_size() + case.batch * case.heads * n_out * d * x.element_size()
        return args, leaves, bytes_fwd
    C = case.dim
    x = rand(case.batch, n, C).requires_grad_(grad)
    branch = rand(case.batch, n_out, C).requires_grad_(grad)
    scale = (torch.rand(case.batch, generator=g) + 0.5).to(device=device, dtype=dtype)
    args = (x, case.thw, case.kernel, case.stride, case.padding, branch, scale, True)
    bytes_fwd = (x.numel() + 2 * branch.numel()) * x.element_size()
    return args, [x, branch], bytes_fwd


def run_once(fn, args, leaves, backward: bool):
    out = fn(*args)
    y = out[0] if isinstance(out, tuple) else out
    if backward:
        y.backward(torch.ones_like(y))
        for t in leaves:
            t.grad = None
    return y


def _timed(fn, args, leaves, backward, device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_once(fn, args, leaves, backward)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    run_once(fn, args, leaves, backward)
    return time.perf_counter() - t0


def time_alternately(fns, args, leaves, backward, device, repeats, warmup=1):
    """Times implementations in turn (a, b, c, a, b, c, ...), so that load from other processes
    on a shared machine falls on all alike. Returns one list of seconds per implementation."""
    for _ in range(warmup):
        for fn in fns:
            run_once(fn, args, leaves, backward)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t.append(_timed(fn, args, leaves, backward, device))
    return times


def output_stem(out: str, device_type: str, dtype: str, suffix: str = "") -> str:
    """pool_ops_<device>[_<dtype>]<suffix>: a 16-bit run keeps its own file (a bf16 run replaced
    the committed float32 table, the CPU default)."""
    precision = "" if dtype == "float32" else f"_{dtype}"
    return os.path.join(out, f"pool_ops_{device_type}{precision}{suffix}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--suffix", default="", help="appended to the output name (pool_ops_<device>[_<dtype>]<suffix>.md)")
    parser.add_argument("--ceilings", default=None, help="ceilings.json of bench/ceilings.py (default: H100 figures)")
    return parser


def main(argv=None) -> None:
    opts = build_parser().parse_args(argv)
    device = torch.device(opts.device)
    bandwidth = load_ceilings(opts.ceilings).bandwidth if device.type == "cuda" else None
    dtype = getattr(torch, opts.dtype)
    if device.type == "cpu":
        torch.set_num_threads(opts.threads)
    mvit_kernels.require_fused()
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"device: {machine}; torch {torch.__version__}; dtype {opts.dtype}; repeats {opts.repeats}")

    # On a shared machine other processes change the timings a lot (the reference, with several
    # parallel regions per call, suffers most): the load average is recorded with the results.
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    for batch in opts.batches:
        for case in mvit_b_cases(batch):
            fused_fn = mvit_kernels.pool3d if case.op == "pool3d" else mvit_kernels.pool_residual_add
            ref_fn = reference.pool3d if case.op == "pool3d" else reference.pool_residual_add
            ref_ncdhw_fn = functools.partial(ref_fn, contiguous_grid=True)
            for backward in (False, True):
                args, leaves, bytes_fwd = make_inputs(case, device, dtype, grad=backward)
                # Backward reads grad_y and x and writes grad_x (and the branch grad): ~2x fwd.
                bytes_moved = bytes_fwd * (3 if backward else 1)
                # "op" is the fused kernel itself: per-shape tuning, which could run the
                # reference in its place, is off.
                with torch.set_grad_enabled(backward), tuning.using("off"):
                    t_op, t_ref, t_ncdhw = time_alternately((fused_fn, ref_fn, ref_ncdhw_fn), args, leaves, backward,
                                                            device, opts.repeats)
                med_op, med_ref, med_ncdhw = (statistics.median(t) for t in (t_op, t_ref, t_ncdhw))
                row = dict(case=case.name, op=case.op, batch=batch, pass_="fwd+bwd" if backward else "fwd",
                           op_ms=med_op * 1e3, op_min_ms=min(t_op) * 1e3, op_max_ms=max(t_op) * 1e3,
                           ref_ms=med_ref * 1e3, ref_min_ms=min(t_ref) * 1e3, ref_max_ms=max(t_ref) * 1e3,
                           ref_ncdhw_ms=med_ncdhw * 1e3, ref_ncdhw_min_ms=min(t_ncdhw) * 1e3,
                           ref_ncdhw_max_ms=max(t_ncdhw) * 1e3,
                           speedup=min(med_ref, med_ncdhw) / med_op, min_bytes=bytes_moved,
                           op_GBps=bytes_moved / med_op / 1e9)
                if device.type == "cuda":
                    row["bw_fraction"] = bytes_moved / med_op / bandwidth
                rows.append(row)
                print(f"B={batch} {case.name:38s} {row['pass_']:8s} op {row['op_ms']:9.2f} ms "
                      f"[{row['op_min_ms']:.2f}-{row['op_max_ms']:.2f}]  ref {row['ref_ms']:9.2f} ms "
                      f"[{row['ref_min_ms']:.2f}-{row['ref_max_ms']:.2f}]  ref NCDHW {row['ref_ncdhw_ms']:9.2f} ms  "
                      f"x{row['speedup']:.2f}  "
                      f"{row['op_GBps']:.1f} GB/s", flush=True)
                del args, leaves

    os.makedirs(opts.out, exist_ok=True)
    stem = output_stem(opts.out, device.type, opts.dtype, opts.suffix)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    # glibc malloc settings change CPU timings a lot: every fresh large buffer page-faults on
    # first touch unless freed memory is kept (README, "On CPUs the memory allocator matters").
    malloc = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}
    meta = dict(device=machine, torch=torch.__version__, dtype=opts.dtype, repeats=opts.repeats,
                threads=torch.get_num_threads() if device.type == "cpu" else None, load_avg_start=load_start,
                load_avg_end=load, malloc_env=malloc, bandwidth=bandwidth)
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# Pooling ops vs reference ({device.type})", "",
             f"Machine: {machine}. torch {torch.__version__}, {opts.dtype}, median of {opts.repeats} "
             "(after 1 warm-up; op and references timed in turn), [min-max]. The reference in its two grid layouts: "
             "channels-last view and contiguous NCDHW copy (torchvision's). speedup = faster reference / op. "
             "Shapes: MViT-B 16x4 (`bench/bench_pool_ops.py`).",
             f"Load average (1 min) at start/end: {meta['load_avg_start'] and round(meta['load_avg_start'][0], 2)} / "
             f"{meta['load_avg_end'] and round(meta['load_avg_end'][0], 2)}. Allocator settings: "
             + (" ".join(f"`{k}={v}`" for k, v in malloc.items()) or "glibc defaults") + ".", "",
             "| B | case | pass | op ms [min-max] | reference ms [min-max] | reference NCDHW ms [min-max] | speedup "
             "| op GB/s (min bytes) |" + (f" of {bandwidth / 1e12:.2f} TB/s |" if device.type == "cuda" else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if device.type == "cuda" else "")]
    for r in rows:
        line = (f"| {r['batch']} | {r['case']} | {r['pass_']} | {r['op_ms']:.2f} [{r['op_min_ms']:.2f}-{r['op_max_ms']:.2f}] "
                f"| {r['ref_ms']:.2f} [{r['ref_min_ms']:.2f}-{r['ref_max_ms']:.2f}] "
                f"| {r['ref_ncdhw_ms']:.2f} [{r['ref_ncdhw_min_ms']:.2f}-{r['ref_ncdhw_max_ms']:.2f}] "
                f"| {r['speedup']:.2f}x | {r['op_GBps']:.1f} |")
        if device.type == "cuda":
            line += f" {100 * r['bw_fraction']:.0f}% |"
        lines.append(line)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
