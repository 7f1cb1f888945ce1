"""Where a whole model step's time goes: torch.profiler over training and inference steps of each
variant, device (or, on CPU, operator) time summed into categories: our ops (Triton attention,
pooled projection, pool3d, skip pooling), SDPA, GEMMs, convolutions, LayerNorm, the optimizer,
copies and the rest, side by side per variant.

    python bench/profile_model.py --preset mvit_b_16x4 --batch 8                 # GPU, bf16 autocast
    python bench/profile_model.py --preset mvit_b_16x4 --input-size 4 64 64      # small, CPU or GPU

Why: the throughput table says how fast each variant is; this says which kernels make the
difference, so a missed target can be traced to the ops that miss it. Writes
bench/results/profile_model_<cpu|gpu>.md/.json (or --out).

Attribution: on CUDA each kernel is put in a category by its own name (our kernels, cuDNN/flash
attention, GEMMs) and otherwise by the name of the operator that launched it (e.g. an
elementwise kernel launched by aten::native_layer_norm_backward is LayerNorm); on CPU each
operator's self time by its name. Times are per step, averaged over --steps profiled steps after
--warmup steps. "host" is the wall time to enqueue a step, "wall" the time with the device
drained: where host is close to wall the step is bound by host overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import RESULTS, _variants, make_step, tuning_section  # noqa: E402

from mvit_kernels import tuning  # noqa: E402

#: (category, pattern), first match wins, case-insensitive. See ``attribute`` for what is matched.
CATEGORIES = [
    ("pooled projection (Triton)", r"pooled_projection"),
    ("attention (Triton)", r"pooling_attention_\w*kernel|_EagerTritonAttention|pooling_attention_triton"),
    ("attention (SDPA / flash / cuDNN)", r"flash|fmha|scaled_dot_product|efficient_attention|cudnn_attention|sdpa"),
    # Our CUDA pool kernels one by one (which of the backward's three launches costs what), then
    # the op as a whole (CPU: the op's name).
    ("pool3d forward (ours)", r"pool3d_forward_kernel"),
    ("pool3d backward: dp, LayerNorm (ours)", r"pool3d_backward_rows_kernel"),
    ("pool3d backward: dx gather (ours)", r"pool3d_backward_input_kernel"),
    ("pool3d backward: conv weight (ours)", r"pool3d_backward_weight_kernel"),
    ("pool3d (ours)", r"mvit_kernels::pool3d|mvit_kernels_pool3d|pool3d_\w*kernel"),
    ("skip pooling + add (ours)", r"pool_residual_add"),
    ("max pool (reference skip)", r"max_pool"),
    ("convolution (reference pooling, patch embed)", r"conv|depthwise|implicit_gemm|winograd"),
    ("optimizer (AdamW)", r"adam|_foreach|multi_tensor"),
    ("GEMM (linear, matmul)", r"gemm|cutlass|xmma|addmm|aten::mm\b|aten::bmm|matmul|linear|aten::baddbmm|nvjet"),
    ("LayerNorm", r"layer_norm|layernorm"),
    ("softmax", r"softmax"),
    ("GELU", r"gelu"),
    ("copies, layout, indexing", r"copy|contiguous|aten::cat|catarray|clone|index|gather|scatter|transpose|permute|pad"),
    ("reductions", r"reduce|aten::sum|aten::mean"),
]
OTHER = "elementwise and other"


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return OTHER


def attribute(names) -> str:
    """The category of the first of ``names`` that has one: the kernel's own name (CUDA), then the
    operator that ran or launched it and its enclosing operators, innermost first (so a plain
    ``aten::div`` inside ``Optimizer.step`` counts as the optimizer, a multiply inside
    ``native_layer_norm_backward`` as LayerNorm)."""
    for name in names:
        label = category(name)
        if label != OTHER:
            return label
    return OTHER


def _op_chain(evt):
    while evt is not None:
        yield evt.name
        evt = evt.cpu_parent


def breakdown(prof, cuda: bool) -> dict[str, float]:
    """Microseconds per category over the profiled steps: kernel time on CUDA (each kernel hangs
    off the innermost operator that launched it), operators' self CPU time on CPU."""
    totals: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CPU or evt.is_async:
            continue
        if cuda:
            for kernel in evt.kernels:
                key = attribute([kernel.name, *_op_chain(evt)])
                totals[key] = totals.get(key, 0.0) + kernel.duration
        else:
            key = attribute(_op_chain(evt))
            totals[key] = totals.get(key, 0.0) + evt.self_cpu_time_total
    return totals


def profile_variant(name, label, spec, device, batch, mode, dtype_ctx, warmup, steps, overrides) -> dict:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, step = make_step(name, spec, device, batch, mode, dtype_ctx, **overrides)
    ctx = spec[1]
    with (ctx() if ctx else contextlib.nullcontext()):
        for _ in range(warmup):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        host = (time.perf_counter() - start) / steps
        sync()
        wall = (time.perf_counter() - start) / steps
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync()
    per_step = {k: v / steps / 1000.0 for k, v in breakdown(prof, cuda).items()}  # ms
    del model, step, prof
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"model": name, "variant": label, "mode": mode, "batch": batch, "host_ms": host * 1000,
            "wall_ms": wall * 1000, "ms": per_step}


def to_markdown(rows, device_name, what) -> str:
    lines = [f"# Where the time goes — {device_name}; torch {torch.__version__}; "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}", "",
             f"{what} per step in ms, by category (`bench/profile_model.py`). wall: step time with the device "
             "drained; host: time to enqueue it.", ""]
    for key in sorted({(r["model"], r["mode"], r["batch"]) for r in rows}):
        group = [r for r in rows if (r["model"], r["mode"], r["batch"]) == key]
        cats = [c for c, _ in CATEGORIES] + [OTHER]
        cats = [c for c in cats if any(r["ms"].get(c, 0) >= 0.005 for r in group)]
        lines += [f"## {key[0]} {key[1]}, batch {key[2]}", "",
                  "| category | " + " | ".join(r["variant"] for r in group) + " |",
                  "|---|" + "---:|" * len(group)]
        for c in cats:
            lines.append(f"| {c} | " + " | ".join(f"{r['ms'].get(c, 0):.2f}" for r in group) + " |")
        lines.append("| **sum** | " + " | ".join(f"**{sum(r['ms'].values()):.2f}**" for r in group) + " |")
        lines.append("| wall | " + " | ".join(f"{r['wall_ms']:.2f}" for r in group) + " |")
        lines.append("| host | " + " | ".join(f"{r['host_ms']:.2f}" for r in group) + " |")
        lines.append("")
    return "\n".join(lines + tuning_section()) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    parser.add_argument("--preset", default="mvit_b_16x4")
    parser.add_argument("--batch", type=int, default=None, help="default 8 on GPU, 1 on CPU")
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["infer", "train"])
    parser.add_argument("--variants", nargs="+", default=["ours-fused", "ours-ref-sdpa", "torchvision"])
    parser.add_argument("--input-size", nargs=3, type=int, default=None, metavar=("T", "H", "W"),
                        help="override the preset's input size (torchvision is then left out)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--out", default=RESULTS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        dtype_ctx = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
        device_name, what, batch = f"{torch.cuda.get_device_name()}, bf16 autocast", "Kernel time", args.batch or 8
    else:
        torch.set_num_threads(args.threads)
        dtype_ctx = contextlib.nullcontext
        device_name, what, batch = f"CPU, {args.threads} threads, float32", "Operator self time", args.batch or 1
    overrides = {"input_size": tuple(args.input_size)} if args.input_size else {}
    variants = _variants(args.preset, device, set(args.variants), **overrides)
    missing = [v for v in args.variants if v not in variants]
    if missing:
        print(f"profile_model: not available here: {', '.join(missing)}", file=sys.stderr)
    rows = []
    for mode in args.modes:
        for label, spec in variants.items():
            try:
                row = profile_variant(args.preset, label, spec, device, batch, mode, dtype_ctx, args.warmup,
                                      args.steps, overrides)
            except torch.cuda.OutOfMemoryError:
                print(f"profile_model: {label} {mode} batch {batch}: out of memory", file=sys.stderr)
                continue
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = to_markdown(rows, device_name, what)
    tag = "gpu" if device.type == "cuda" else "cpu"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"profile_model_{tag}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"profile_model_{tag}.json"), "w") as f:
        json.dump({"device": device_name, "torch": torch.__version__, "rows": rows, "tuning": tuning.summary()}, f,
                  indent=2)
    print(text)
    print(f"wrote {os.path.join(args.out, f'profile_model_{tag}')}.md and .json")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
