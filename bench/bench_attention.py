"""Pooling attention at the MViT-B 16x4 block shapes: a byte/FLOP floor model of the fused Triton
kernels against the reference path's separate ops (always), and, when CUDA is available, measured
forward and forward+backward times of the Triton kernels, the reference, SDPA and FlexAttention in
bf16, with the Triton kernels' achieved TFLOP/s and GB/s beside their floor.

    python bench/bench_attention.py [--batch 1] [--preset mvit_b_16x4] [--out bench/results]
    python bench/bench_attention.py --cpu [--preset mvitv2_s_16x4] [--threads 2] [--repeats 7]

Writes attention_model.{md,json} (attention_model_b<batch> for a batch other than 1; and on CUDA attention_bench_b<batch>[_relpos], pooled_projection_b<batch>
and attention_blocks_<preset>_b<batch>, .md and .json) under --out, and prints the
AOT resource table (bench/results/triton_resources.md, made by tests/test_triton_aot.py or
``python -m mvit_kernels.triton.aot``). With ``--cpu`` it measures the CPU inference path instead
(float32, no gradients; :func:`bench_cpu`) and writes attention_cpu_<preset>_b<batch>.{md,json}.

The model (per clip, bf16 = 2 bytes, fp32 statistics = 4 bytes; H100: 3.0 TB/s, 790 TFLOP/s, the
figures the issues' targets use; the measured tables' floors use the GPU's own ceilings when
given ``--ceilings`` (bench/ceilings.py)):
- floor(op) = max(bytes / bandwidth, FLOPs / peak); separate ops run one after another, so the
  reference path's floor is the sum over its ops; a fused kernel is one op.
- Fused forward reads q, k, v once and writes out (+ lse, + the rel tile when training): the
  k/v tiles every query tile re-reads are 0.1-0.8 MB per head and stay in L2. Its tensor-core
  work includes the one-hot expansion of the rel tile (2*N_q*N_kv*R_PAD per head), reported as
  "executed" FLOPs next to the FLOPs the reference counts.
- Fused backward (flash recompute, two kernels): dk/dv kernel (S, dV, dP, dK) + dq kernel (S, dP,
  dQ, d rel): 7 matmuls of N_q x N_kv x d in all and 3 one-hot products, plus delta =
  rowsum(dO * O) and the tables' einsum in torch.
- Reference forward, op by op as reference.pooling_attention runs them: scale q, q k^T (writes
  S), the bias (zeros, three broadcast adds over N_q x N_kv, each a full read+write), the slice
  add and two concatenations of S, softmax, P v, the residual concat and the head merge copy.
  Reference backward: each op reads its output gradient and its saved inputs and writes its
  input gradients (bytes = out + 2 x inputs), matmuls cost 2x their forward FLOPs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ceilings import H100, Ceilings, load as load_ceilings  # noqa: E402

BF16 = 2
FP32 = 4


def pool_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def block_shapes(preset: str, batch: int) -> list[dict]:
    """Per-block attention shapes from the preset's explicit block specs (what
    ``build_model(preset).specs`` holds) and the pooling grid arithmetic."""
    from mvit.presets import get_preset

    cfg = get_preset(preset)
    cls = int(cfg.cls_embed)
    shapes = []
    for i, spec in enumerate(cfg.block_specs()):
        thw = spec.input_thw
        thw_q = tuple(pool_size(s, k, st, p) for s, k, st, p in zip(thw, spec.kernel_q, spec.stride_q, spec.padding_q)) if spec.pool_q else thw
        thw_kv = tuple(pool_size(s, k, st, p) for s, k, st, p in zip(thw, spec.kernel_kv, spec.stride_kv, spec.padding_kv)) if spec.pool_kv else thw
        shapes.append(dict(
            block=i, batch=batch, heads=spec.num_heads, d=spec.head_dim, thw_q=thw_q, thw_kv=thw_kv,
            n_q=math.prod(thw_q) + cls, n_kv=math.prod(thw_kv) + cls, has_cls=bool(cls),
            rel_pos=bool(cfg.rel_pos_spatial), rel_t=bool(cfg.rel_pos_temporal), residual=bool(cfg.residual_pooling),
        ))
    return shapes


def fused_model(s: dict, rel: bool, train: bool, ceil: Ceilings = H100) -> dict:
    B, H, d, nq, nkv = s["batch"], s["heads"], s["d"], s["n_q"], s["n_kv"]
    ngrid = nq - int(s["has_cls"])
    kt, kh, kw = s["thw_kv"]
    rcols = kt + kh + kw if rel else 0
    rpad = max(16, 1 << (rcols - 1).bit_length()) if rel else 0
    q = B * H * nq * d * BF16
    kv = B * H * nkv * d * BF16
    lse = B * H * nq * FP32
    reltile = B * H * nq * rpad * FP32 if (rel and train) else 0
    attn = 2 * B * H * nq * nkv * d
    relf = 2 * B * H * ngrid * d * rcols
    onehot = 2 * B * H * nq * nkv * rpad
    fwd = dict(bytes=q + 2 * kv + q + lse + reltile, flops=2 * attn + relf, executed=2 * attn + relf + onehot)
    # delta: read out, dout, q (residual), write delta; dkdv: read q, k, v, dout, lse, delta, rel,
    # write dk, dv; dq: read q, k, v, dout, lse, delta, rel, write dq, drel; tables: read drel, q.
    delta = 3 * q + lse
    dkdv = q + 2 * kv + q + 2 * lse + reltile + 2 * kv
    dq = q + 2 * kv + q + 2 * lse + reltile + q + reltile
    tables = reltile + q if rel else 0
    # dk/dv kernel: S, dV, dP, dK (4 matmuls) + the one-hot bias; dq kernel: S, dP, dQ (3) + the
    # one-hot bias and its transpose for d rel + the rel gather into dq; tables: one einsum.
    dkdv_exec = 4 * attn + onehot
    dq_exec = 3 * attn + 2 * onehot + relf
    bwd_flops = 4 * attn + 2 * relf
    bwd_exec = dkdv_exec + dq_exec + relf
    bwd = dict(bytes=delta + dkdv + dq + tables, flops=bwd_flops, executed=bwd_exec)
    return dict(
        fwd_bytes=fwd["bytes"], fwd_flops=fwd["flops"], fwd_exec_flops=fwd["executed"],
        fwd_floor_s=ceil.floor_s(fwd["bytes"], fwd["executed"]),
        bwd_bytes=bwd["bytes"], bwd_flops=bwd["flops"], bwd_exec_flops=bwd["executed"],
        bwd_floor_s=ceil.floor_s(delta, 0) + ceil.floor_s(dkdv, dkdv_exec) + ceil.floor_s(dq, dq_exec) + ceil.floor_s(tables, relf),
    )


def reference_ops(s: dict, rel: bool) -> list[tuple[str, float, float, float]]:
    """(op, input bytes, output bytes, FLOPs) for each separate op of the reference forward."""
    B, H, d, nq, nkv = s["batch"], s["heads"], s["d"], s["n_q"], s["n_kv"]
    ngrid, nkgrid = nq - int(s["has_cls"]), nkv - int(s["has_cls"])
    kt, kh, kw = s["thw_kv"]
    q = B * H * nq * d * BF16
    kv = B * H * nkv * d * BF16
    S = B * H * nq * nkv * BF16
    bias = B * H * ngrid * nkgrid * BF16
    ops = [
        ("q * scale", q, q, 0),
        ("q @ k^T", q + kv, S, 2 * B * H * nq * nkv * d),
    ]
    if rel:
        axes = [("t", kt)] if s["rel_t"] else []
        axes += [("h", kh), ("w", kw)]
        ops.append(("bias = zeros", 0, bias, 0))
        for name, k in axes:
            small = B * H * ngrid * k * BF16
            ops.append((f"einsum rel_{name}", q, small, 2 * B * H * ngrid * d * k))
            ops.append((f"bias += rel_{name}", bias + small, bias, 0))
        ops.append(("S[grid] + bias", 2 * bias, bias, 0))
        ops.append(("cat (columns)", bias + B * H * ngrid * BF16, bias, 0))
        ops.append(("cat (rows)", S, S, 0))
    ops += [
        ("softmax", S, S, 0),
        ("P @ v", S + kv, q, 2 * B * H * nq * nkv * d),
    ]
    if s["residual"]:
        ops.append(("out + q (cat)", 2 * q, q, 0))
    ops.append(("merge heads (copy)", q, q, 0))
    return ops


def reference_model(s: dict, rel: bool) -> dict:
    ops = reference_ops(s, rel)
    fwd_bytes = sum(i + o for _, i, o, _ in ops)
    fwd_flops = sum(f for *_, f in ops)
    bwd_bytes = sum(o + 2 * i for _, i, o, _ in ops)
    return dict(
        fwd_bytes=fwd_bytes, fwd_flops=fwd_flops,
        fwd_floor_s=sum(H100.floor_s(i + o, f) for _, i, o, f in ops),
        bwd_bytes=bwd_bytes, bwd_flops=2 * fwd_flops,
        bwd_floor_s=sum(H100.floor_s(o + 2 * i, 2 * f) for _, i, o, f in ops),
        ops=len(ops),
    )


def model_table(shapes: list[dict], rel: bool) -> tuple[str, list[dict]]:
    rows = []
    for s in shapes:
        f = fused_model(s, rel, train=True)
        r = reference_model(s, rel)
        rows.append(dict(shape=s, fused=f, reference=r))
    us = 1e6
    lines = [
        "| block | heads | L_q | L_kv | grid kv | fused fwd MB | fused fwd GFLOP (exec) | fused fwd floor us | ref fwd MB | ref fwd floor us | fused bwd floor us | ref bwd floor us | fwd+bwd speedup floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    tot = dict(ff=0.0, rf=0.0, fb=0.0, rb=0.0)
    for row in rows:
        s, f, r = row["shape"], row["fused"], row["reference"]
        tot["ff"] += f["fwd_floor_s"]
        tot["rf"] += r["fwd_floor_s"]
        tot["fb"] += f["bwd_floor_s"]
        tot["rb"] += r["bwd_floor_s"]
        lines.append(
            f"| {s['block']} | {s['heads']} | {s['n_q']} | {s['n_kv']} | {'x'.join(map(str, s['thw_kv']))} | "
            f"{f['fwd_bytes'] / 1e6:.1f} | {f['fwd_flops'] / 1e9:.2f} ({f['fwd_exec_flops'] / 1e9:.2f}) | {f['fwd_floor_s'] * us:.1f} | "
            f"{r['fwd_bytes'] / 1e6:.1f} | {r['fwd_floor_s'] * us:.1f} | {f['bwd_floor_s'] * us:.1f} | {r['bwd_floor_s'] * us:.1f} | "
            f"{(r['fwd_floor_s'] + r['bwd_floor_s']) / (f['fwd_floor_s'] + f['bwd_floor_s']):.1f}x |"
        )
    lines.append(
        f"| all {len(shapes)} | | | | | | | {tot['ff'] * us:.0f} | | {tot['rf'] * us:.0f} | {tot['fb'] * us:.0f} | {tot['rb'] * us:.0f} | "
        f"{(tot['rf'] + tot['rb']) / (tot['ff'] + tot['fb']):.1f}x |"
    )
    return "\n".join(lines) + "\n", rows


def read_fraction(size: int, kernel: int, stride: int, padding: int) -> float:
    """Fraction of positions along one axis that at least one pooling window reads."""
    out = pool_size(size, kernel, stride, padding)
    read = {i for o in range(out) for i in range(o * stride - padding, o * stride - padding + kernel) if 0 <= i < size}
    return len(read) / size


def projection_model(preset: str, batch: int) -> tuple[str, list[dict]]:
    """The k/v half of the qkv projection followed by K/V pooling (conv 3x3x3 + LN), three ways:
    (a) project every token, write k and v, pool in a second pass (what the model does now);
    (b) one fused pass: each pooled token projects its whole window (recomputes overlapping
        windows: 27 / prod(stride) times the projection FLOPs, nothing written but the output);
    (c) project only the tokens some window reads, once, to a compact buffer, then pool.
    bf16 bytes, H100 floors; the pooling and LN FLOPs are negligible and omitted."""
    from mvit.presets import get_preset

    cfg = get_preset(preset)
    rows = []
    for i, spec in enumerate(cfg.block_specs()):
        thw = spec.input_thw
        n = math.prod(thw)
        A, C = spec.attn_dim, spec.dim_in
        frac = math.prod(read_fraction(s, k, st, p) for s, k, st, p in zip(thw, spec.kernel_kv, spec.stride_kv, spec.padding_kv))
        thw_kv = tuple(pool_size(s, k, st, p) for s, k, st, p in zip(thw, spec.kernel_kv, spec.stride_kv, spec.padding_kv))
        n_kv = math.prod(thw_kv)
        x = batch * n * C * BF16
        w = 2 * A * C * BF16
        kv_full = batch * n * 2 * A * BF16
        kv_out = batch * n_kv * 2 * A * BF16
        proj = 2 * batch * n * C * 2 * A
        recompute = math.prod(spec.kernel_kv) * n_kv / n
        a = H100.floor_s(x + w + kv_full, proj) + H100.floor_s(kv_full + kv_out, 0)
        b = H100.floor_s(x + w + kv_out, proj * recompute)
        c = H100.floor_s(x + w + frac * kv_full, proj * frac) + H100.floor_s(frac * kv_full + kv_out, 0)
        best = min((a, "a"), (b, "b"), (c, "c"))[1]
        rows.append(dict(block=i, tokens=n, stride_kv=spec.stride_kv, read_fraction=frac, recompute=recompute,
                         two_pass_s=a, fused_recompute_s=b, skip_unread_s=c, best=best))
    lines = [
        "| block | tokens | kv stride | tokens read | recompute x | (a) project+pool us | (b) fused recompute us | (c) skip unread us | best |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['block']} | {r['tokens']} | {'x'.join(map(str, r['stride_kv']))} | {r['read_fraction']:.0%} | "
            f"{r['recompute']:.2f} | {r['two_pass_s'] * 1e6:.1f} | {r['fused_recompute_s'] * 1e6:.1f} | {r['skip_unread_s'] * 1e6:.1f} | {r['best']} |"
        )
    tot = {k: sum(r[k] for r in rows) * 1e6 for k in ("two_pass_s", "fused_recompute_s", "skip_unread_s")}
    best_total = sum(min(r["two_pass_s"], r["fused_recompute_s"], r["skip_unread_s"]) for r in rows) * 1e6
    lines.append(f"| all | | | | | {tot['two_pass_s']:.0f} | {tot['fused_recompute_s']:.0f} | {tot['skip_unread_s']:.0f} | best per block: {best_total:.0f} |")
    return "\n".join(lines) + "\n", rows


def _time_into(row: dict, name: str, step, graph: bool = False, rep: int = 50) -> None:
    """row[name + "_ms"] = the median time of step (triton.testing.do_bench, or replayed from a
    CUDA graph with graph=True); a path that fails at a shape is reported, not hidden:
    row[name + "_ms"] = None and row[name + "_error"] = what it raised."""
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        row[name + "_ms"] = do_bench_cudagraph(step, rep=rep) if graph else do_bench(step, warmup=5, rep=rep)
    except Exception as exc:
        row[name + "_ms"] = None
        row[name + "_error"] = repr(exc)[:200]


def _fmt_ms(ms) -> str:
    return f"{ms:.3f}" if ms else "fail"


PATHS = ("triton", "reference", "sdpa", "flex")


def bench_cuda(shapes: list[dict], rel: bool, ceil: Ceilings = H100) -> tuple[str, list[dict]]:
    """Triton, reference, SDPA and FlexAttention at each distinct block shape, the forward (as in
    training: autograd on, so the Triton forward also writes what its backward reads) and the
    forward + backward; the floors are the byte/FLOP model under ``ceil`` (the GPU's measured
    ceilings where given)."""
    import importlib

    import torch
    from mvit_kernels import reference

    pa = importlib.import_module("mvit_kernels.pooling_attention")

    def sdpa(q, k, v, thw_q, thw_kv, has_cls, t, h, w, residual_pooling):
        return pa._sdpa_pooling_attention(q, k, v, thw_q, thw_kv, has_cls, t, h, w, residual_pooling)
    results = []
    seen = set()
    for s in shapes:
        key = (s["heads"], s["d"], s["thw_q"], s["thw_kv"])
        if key in seen:
            continue
        seen.add(key)
        B, H, d = s["batch"], s["heads"], s["d"]
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        q, k, v = mk(B, H, s["n_q"], d), mk(B, H, s["n_kv"], d), mk(B, H, s["n_kv"], d)
        tabs = [None, None, None]
        if rel:
            L = [reference.rel_pos_table_length(a, b) for a, b in zip(s["thw_q"], s["thw_kv"])]
            tabs = [mk(L[0], d) * 0.1 if s["rel_t"] else None, mk(L[1], d) * 0.1, mk(L[2], d) * 0.1]
            tabs = [None if t is None else t.detach().requires_grad_() for t in tabs]
        args = (q, k, v, s["thw_q"], s["thw_kv"], s["has_cls"], *tabs)
        f = fused_model(s, rel, train=True, ceil=ceil)
        row = dict(block=s["block"], heads=H, n_q=s["n_q"], n_kv=s["n_kv"],
                   fwd_floor_ms=f["fwd_floor_s"] * 1e3, floor_ms=(f["fwd_floor_s"] + f["bwd_floor_s"]) * 1e3,
                   fwd_bytes=f["fwd_bytes"], fwd_flops=f["fwd_flops"],
                   bytes=f["fwd_bytes"] + f["bwd_bytes"], flops=f["fwd_flops"] + f["bwd_flops"])
        for name, fn in zip(PATHS, (pa.triton_pooling_attention, reference.pooling_attention, sdpa,
                                    flex_pooling_attention)):
            def forward():
                return fn(*args, residual_pooling=s["residual"])

            def step():
                out = forward()
                out.backward(torch.ones_like(out))
            _time_into(row, "fwd_" + name, forward)
            _time_into(row, name, step)
            if name == "triton":
                # The kernels' own time: replayed from a CUDA graph, without the ~1 ms of host
                # time an eager call spends (bench/profile_attention.py), which do_bench includes
                # whenever the host is slower than the device.
                _time_into(row, "fwd_triton_graph", forward, graph=True)
                _time_into(row, "triton_graph", step, graph=True)
        results.append(row)
    return measured_table(results), results


def measured_table(results: list[dict]) -> str:
    """Two lines per shape (the forward, keys ``fwd_*``, and the forward + backward): each path's
    time, the Triton kernels' graph-replay time over the floor, and what that time achieves:
    the FLOPs the reference counts and the model's minimum bytes, per second."""
    lines = ["| block | heads | L_q | L_kv | pass | floor ms | triton ms | triton graph ms | graph/floor | "
             "triton TFLOP/s | triton GB/s | reference ms | sdpa ms | flex ms | ref/triton | sdpa/triton | flex/triton |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for prefix, label in (("fwd_", "fwd"), ("", "fwd+bwd")):
            t, g = r.get(prefix + "triton_ms"), r.get(prefix + "triton_graph_ms")
            floor = r[prefix + "floor_ms"]
            kernel_ms = g or t  # achieved rates from the kernels' own time where replay worked
            ratio = lambda a: f"{a / t:.2f}x" if (a and t) else "n/a"
            rate = lambda amount, unit: f"{amount / (kernel_ms * 1e-3) / unit:.1f}" if kernel_ms else "n/a"
            lines.append(
                f"| {r['block']} | {r['heads']} | {r['n_q']} | {r['n_kv']} | {label} | {floor:.3f} | {_fmt_ms(t)} | "
                f"{_fmt_ms(g)} | {(g / floor) if g else float('nan'):.1f}x | {rate(r[prefix + 'flops'], 1e12)} | "
                f"{rate(r[prefix + 'bytes'], 1e9)} | "
                + " | ".join(_fmt_ms(r.get(prefix + n + "_ms")) for n in PATHS[1:]) + " | "
                + " | ".join(ratio(r.get(prefix + n + "_ms")) for n in PATHS[1:]) + " |")
    return "\n".join(lines) + "\n"


CPU_PATHS = ("fused", "sdpa_ref_mask", "reference", "sdpa_no_bias")


def bench_cpu(shapes: list[dict], repeats: int = 7, threads: int = 2) -> tuple[str, list[dict]]:
    """CPU float32 inference at each distinct block shape (no gradients), timed in turns (one call
    of each path, round and round, so a shared machine's drifts fall on all alike), medians:
    the fused path (``mvit_kernels.pooling_attention``: the C++ rel-pos mask, query chunks,
    SDPA), SDPA with the reference's bias as its mask, the reference (matmul + softmax), and
    SDPA without any bias, which bounds from below what the bias may cost. q is the strided
    view of a qkv-like tensor, as the model's unpooled q."""
    import importlib
    import time

    import torch

    import mvit_kernels
    from mvit_kernels import reference

    pa = importlib.import_module("mvit_kernels.pooling_attention")
    torch.set_num_threads(threads)
    counts: dict = {}
    for s in shapes:
        key = (s["heads"], s["d"], s["thw_q"], s["thw_kv"])
        counts.setdefault(key, []).append(s["block"])
    rows = []
    g = torch.Generator().manual_seed(0)
    for s in shapes:
        key = (s["heads"], s["d"], s["thw_q"], s["thw_kv"])
        if counts[key][0] != s["block"]:
            continue
        B, H, d = s["batch"], s["heads"], s["d"]
        q = torch.randn(B, s["n_q"], 3, H, d, generator=g).permute(2, 0, 3, 1, 4)[0]
        k, v = torch.randn(B, H, s["n_kv"], d, generator=g), torch.randn(B, H, s["n_kv"], d, generator=g)
        L = [reference.rel_pos_table_length(a, b) for a, b in zip(s["thw_q"], s["thw_kv"])]
        tabs = [torch.randn(L[0], d, generator=g) * 0.1 if s["rel_t"] else None] + [
            torch.randn(n, d, generator=g) * 0.1 if s["rel_pos"] else None for n in L[1:]]
        args = (q, k, v, s["thw_q"], s["thw_kv"], s["has_cls"], *tabs, s["residual"])
        paths = {
            "fused": lambda: mvit_kernels.pooling_attention(*args[:6], *tabs, residual_pooling=s["residual"]),
            "sdpa_ref_mask": lambda: pa._sdpa_with_reference_mask(*args),
            "reference": lambda: reference.pooling_attention(*args[:6], *tabs, residual_pooling=s["residual"]),
            "sdpa_no_bias": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        }
        times: dict = {name: [] for name in paths}
        with torch.inference_mode():
            want = paths["reference"]()
            err = (paths["fused"]() - want).abs().max().item() / want.abs().max().item()
            for _ in range(repeats):
                for name, call in paths.items():
                    start = time.perf_counter()
                    call()
                    times[name].append((time.perf_counter() - start) * 1e3)
        row = dict(blocks=counts[key], heads=H, d=d, n_q=s["n_q"], n_kv=s["n_kv"], fused_rel_err=err)
        for name in paths:
            row[name + "_ms"] = statistics.median(times[name])
            row[name + "_spread_ms"] = (min(times[name]), max(times[name]))
        rows.append(row)
    lines = ["| blocks | heads | L_q | L_kv | fused ms | SDPA + reference mask ms | reference ms | SDPA, no bias ms "
             "| ref-mask SDPA / fused | reference / fused | fused error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    total = {name: 0.0 for name in CPU_PATHS}
    for r in rows:
        for name in CPU_PATHS:
            total[name] += r[name + "_ms"] * len(r["blocks"])
        lines.append(
            f"| {','.join(map(str, r['blocks']))} | {r['heads']} | {r['n_q']} | {r['n_kv']} | "
            + " | ".join(f"{r[n + '_ms']:.1f}" for n in CPU_PATHS)
            + f" | {r['sdpa_ref_mask_ms'] / r['fused_ms']:.2f}x | {r['reference_ms'] / r['fused_ms']:.2f}x"
            f" | {r['fused_rel_err']:.1e} |")
    batch = shapes[0]["batch"]
    lines.append(f"| all ({'per clip' if batch == 1 else f'per batch of {batch} clips'}) | | | | "
                 + " | ".join(f"{total[n]:.0f}" for n in CPU_PATHS)
                 + f" | {total['sdpa_ref_mask'] / total['fused']:.2f}x | {total['reference'] / total['fused']:.2f}x | |")
    return "\n".join(lines) + "\n", rows


_FLEX_FNS: dict = {}


def _flex_functions():
    """Compiled FlexAttention calls, plain and with the rel-pos score_mod. The per-axis terms
    are arguments of the compiled function (graph inputs, so a new tensor each step does not
    recompile) and each is indexed once in the score_mod (FlexAttention cannot differentiate
    a captured tensor indexed twice)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    if not _FLEX_FNS:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

        def plain(q, k, v):
            return flex_attention(q, k, v)

        def with_rel(q, k, v, rel_t, rel_h, rel_w, s: int, kh: int, kw: int):
            def score_mod(score, b, h, qi, ki):
                g = torch.where(ki >= s, ki - s, 0)
                bias = rel_t[b, h, qi, g // (kh * kw)] + rel_h[b, h, qi, (g // kw) % kh] + rel_w[b, h, qi, g % kw]
                return torch.where((qi >= s) & (ki >= s), score + bias, score)

            return flex_attention(q, k, v, score_mod=score_mod)

        _FLEX_FNS["plain"] = torch.compile(plain, dynamic=False)
        _FLEX_FNS["rel"] = torch.compile(with_rel, dynamic=False)
    return _FLEX_FNS


def flex_pooling_attention(q, k, v, thw_q, thw_kv, has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling):
    """The peer: FlexAttention (compiled) with the decomposed rel-pos bias as a score_mod that
    gathers per-axis terms q . R (computed by einsum, as the reference does), residual added after."""
    import torch

    from mvit_kernels import reference

    fns = _flex_functions()
    B, H, n_q, d = q.shape
    s = 1 if has_cls else 0
    if rel_pos_t is not None or rel_pos_h is not None:
        grid_q = q[:, :, s:].reshape(B, H, *thw_q, d)
        terms = []
        for axis, (table, eq) in enumerate(zip((rel_pos_t, rel_pos_h, rel_pos_w),
                                               ("bnthwc,tkc->bnthwk", "bnthwc,hkc->bnthwk", "bnthwc,wkc->bnthwk"))):
            size = thw_kv[axis]
            if table is None:
                term = q.new_zeros(B, H, *thw_q, size)
            else:
                R = reference.interpolate_rel_pos(table, reference.rel_pos_table_length(thw_q[axis], size))
                R = R[reference.rel_pos_index(thw_q[axis], size, q.device)]
                term = torch.einsum(eq, grid_q, R)
            term = term.reshape(B, H, n_q - s, size)
            terms.append(torch.cat((term.new_zeros(B, H, s, size), term), 2))  # class row: no bias
        out = fns["rel"](q, k, v, *terms, s, thw_kv[1], thw_kv[2])
    else:
        out = fns["plain"](q, k, v)
    if residual_pooling:
        out = reference.add_residual_pooling(out, q, has_cls)
    return out.transpose(1, 2).reshape(B, n_q, H * d)


def bench_projection(preset: str, batch: int, device: str = "cuda", rep: int = 50) -> tuple[str, list[dict]]:
    """The K/V half of the qkv projection + K/V pooling (+ LN) of every block whose K/V stride
    makes the dispatcher fuse it (``pooled_projection.uses_triton``), fwd+bwd in bf16: the Triton
    pooled projection against its two tuning alternatives, the gathered path (F.linear of the
    tokens some window reads + this project's pool3d) and the composed one (F.linear of every
    token + pool3d), and against F.linear + the reference's pooling (conv3d + LayerNorm), with
    the FLOPs the Triton and the full projection execute."""
    import importlib

    import torch
    from mvit.presets import get_preset
    from mvit_kernels import reference

    pp = importlib.import_module("mvit_kernels.pooled_projection")
    cfg = get_preset(preset)
    rows = []
    for i, spec in enumerate(cfg.block_specs()):
        if not spec.pool_kv:
            continue
        thw = spec.input_thw
        n = math.prod(thw) + (1 if cfg.cls_embed else 0)
        d = spec.head_dim
        dt = torch.bfloat16
        x = torch.randn(batch, n, spec.dim_in, device=device, dtype=dt, requires_grad=True)
        w = (torch.randn(3 * spec.attn_dim, spec.dim_in, device=device, dtype=dt) * spec.dim_in**-0.5).requires_grad_()
        b = torch.randn(3 * spec.attn_dim, device=device, dtype=dt).requires_grad_()
        pw = (torch.randn(d, 1, *spec.kernel_kv, device=device, dtype=dt) * 0.2).requires_grad_()
        nw = torch.ones(d, device=device, dtype=dt).requires_grad_()
        nb = torch.zeros(d, device=device, dtype=dt).requires_grad_()
        args = ("k", spec.num_heads, thw, spec.kernel_kv, spec.stride_kv, spec.padding_kv, cfg.pool_mode, pw, cfg.cls_embed, nw, nb)
        if not pp.uses_triton(x, w, spec.num_heads, thw, spec.kernel_kv, spec.stride_kv, spec.padding_kv):
            continue
        row = dict(block=i, tokens=n, stride_kv=spec.stride_kv,
                   fused_gflop=pp._fwd_flops(x.shape, w.shape, b.shape, pw.shape, nw.shape, nb.shape, *args[:7], args[8]) / 1e9,
                   reference_gflop=pp.reference_projection_flops(x.shape, w.shape) / 1e9)
        eps = 1e-6  # the candidates take every argument positionally, eps last
        paths = (("triton", pp.triton_pooled_projection), ("gathered", lambda *a: pp._gathered(*a, eps)),
                 ("linear+pool3d", lambda *a: pp._composed(*a, eps)), ("reference", reference.pooled_projection))
        for name, fn in paths:
            def step():
                y, _ = fn(x, w, b, *args)
                y.backward(torch.ones_like(y))
            _time_into(row, name, step, rep=rep)
        rows.append(row)
    lines = ["| block | tokens | kv stride | GFLOP fused / unfused | triton ms | gathered ms | linear+pool3d ms | reference ms "
             "| vs gathered | vs linear+pool3d | vs reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, g, u, ref = r.get("triton_ms"), r.get("gathered_ms"), r.get("linear+pool3d_ms"), r.get("reference_ms")
        ratio = lambda a: f"{a / t:.2f}x" if (a and t) else "n/a"
        lines.append(f"| {r['block']} | {r['tokens']} | {'x'.join(map(str, r['stride_kv']))} | "
                     f"{r['fused_gflop']:.2f} / {r['reference_gflop']:.2f} | {_fmt_ms(t)} | {_fmt_ms(g)} | {_fmt_ms(u)} | "
                     f"{_fmt_ms(ref)} | {ratio(g)} | {ratio(u)} | {ratio(ref)} |")
    return "\n".join(lines) + "\n", rows


def bench_blocks(preset: str, batch: int, device: str = "cuda", rep: int = 50) -> tuple[str, list[dict]]:
    """One MultiScaleAttention module per distinct block of the preset (qkv projection, Q/K/V
    pooling + LN, attention with rel-pos/residual as the preset has them, output projection),
    forward + backward under bf16 autocast: fused=True against the reference's projection and
    pooling ops with SDPA (the issue's peer) and with its matmul attention."""
    import torch
    from mvit import model as model_module
    from mvit.presets import get_preset
    from throughput import sdpa_in_reference

    cfg = get_preset(preset)
    rows, seen = [], set()
    for i, spec in enumerate(cfg.block_specs()):
        key = (spec.dim_in, spec.attn_dim, spec.num_heads, spec.stride_q, spec.stride_kv, spec.input_thw)
        if key in seen:
            continue
        seen.add(key)
        torch.manual_seed(i)
        attn = model_module.MultiScaleAttention(spec, cfg).to(device)
        for t in (attn.rel_pos_t, attn.rel_pos_h, attn.rel_pos_w):
            if t is not None:
                torch.nn.init.normal_(t, std=0.02)
        n = math.prod(spec.input_thw) + (1 if cfg.cls_embed else 0)
        x = torch.randn(batch, n, spec.dim_in, device=device, requires_grad=True)

        def step(fused):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                out, _ = attn(x, spec.input_thw, fused)
            out.backward(torch.ones_like(out))

        row = dict(block=i, heads=spec.num_heads, dim=spec.attn_dim, tokens=n, stride_q=spec.stride_q, stride_kv=spec.stride_kv)
        for name, fused, ctx in (("fused", True, None), ("ref_sdpa", False, sdpa_in_reference), ("ref", False, None)):
            with ctx() if ctx is not None else contextlib.nullcontext():
                _time_into(row, name, lambda: step(fused), rep=rep)
        rows.append(row)
    lines = ["| block | heads | dim | tokens | q stride | kv stride | fused ms | ref+SDPA ms | ref ms | ref+SDPA / fused |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, sd, ref = r.get("fused_ms"), r.get("ref_sdpa_ms"), r.get("ref_ms")
        lines.append(
            f"| {r['block']} | {r['heads']} | {r['dim']} | {r['tokens']} | {'x'.join(map(str, r['stride_q']))} | "
            f"{'x'.join(map(str, r['stride_kv']))} | {_fmt_ms(f)} | {_fmt_ms(sd)} | {_fmt_ms(ref)} | "
            f"{(sd / f if (sd and f) else float('nan')):.2f}x |"
        )
    return "\n".join(lines) + "\n", rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="pooling attention: byte/FLOP model and benchmark")
    parser.add_argument("--preset", default="mvit_b_16x4")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--no-rel-pos", action="store_true", help="model without the MViTv2 rel-pos bias")
    parser.add_argument("--cpu", action="store_true",
                        help="measure the CPU inference path (float32, no gradients) at the preset's block shapes "
                             "instead of the model tables and the CUDA benchmarks")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (--cpu)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (--cpu)")
    parser.add_argument("--ceilings", default=None,
                        help="ceilings.json of bench/ceilings.py: the measured tables' floors use this GPU's "
                             "bandwidth and matrix rate (default: the H100 figures, as the model tables always do)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = block_shapes(args.preset, args.batch)
    if args.no_rel_pos:  # as for the model tables: the v1 attention, no rel-pos and no residual pooling
        shapes = [dict(s, rel_pos=False, rel_t=False, residual=False) for s in shapes]
    if args.cpu:
        import platform

        import torch

        table, rows = bench_cpu(shapes, args.repeats, args.threads)
        title = (f"# Pooling attention, CPU inference, float32, {args.threads} threads, {args.preset}, batch "
                 f"{args.batch} ({platform.machine()}, torch {torch.__version__})\n\n"
                 f"Median of {args.repeats} rounds, each path timed in turn; q a strided view as in the model. "
                 "fused: `mvit_kernels.pooling_attention` on CPU tensors. fused error: largest difference from "
                 "the reference over the reference's largest value.\n\n")
        name = f"attention_cpu_{args.preset}_b{args.batch}"
        (out / f"{name}.md").write_text(title + table)
        (out / f"{name}.json").write_text(json.dumps(dict(threads=args.threads, rows=rows), indent=1, default=list))
        print(title + table)
        print(f"wrote {out / name}.md and .json")
        return 0
    # MViT-B (v1) has no rel-pos; the kernels' main customer is MViTv2, so model both unless told.
    sections, payload = [], {"preset": args.preset, "batch": args.batch, "bandwidth": H100.bandwidth,
                                "peak_flops": H100.peak_flops}
    for rel in ([False] if args.no_rel_pos else [False, True]):
        shp = [dict(s, rel_pos=rel, rel_t=rel, residual=rel) for s in shapes]
        table, rows = model_table(shp, rel)
        title = "with MViTv2 rel-pos (t, h, w) + residual pooling" if rel else "plain (MViT-B v1: no rel-pos, no residual)"
        sections.append(f"## {args.preset} attention, batch {args.batch}, bf16, {title}\n\n{table}")
        payload["with_rel_pos" if rel else "plain"] = rows
    proj_table, proj_rows = projection_model(args.preset, args.batch)
    sections.append(
        f"## Pooled projection (k/v half of qkv + K/V pooling), {args.preset}, batch {args.batch}: which way\n\n"
        "(a) project all tokens, pool in a second pass; (b) one fused pass recomputing overlapping windows; "
        "(c) project only tokens a window reads, once, then pool. The model runs (b), the Triton pooled "
        "projection, where its recompute factor is <= 2 (strides 1x8x8 and 1x4x4: "
        "`mvit_kernels.triton.pooled_projection.use_fused_projection`), and (a) elsewhere.\n\n" + proj_table
    )
    payload["pooled_projection"] = proj_rows
    header = (
        "# Pooling attention: byte/FLOP floor model (H100: 3.0 TB/s, 790 TFLOP/s bf16)\n\n"
        "Made by `python bench/bench_attention.py`. Floors, not measurements; see the script's docstring "
        "for what each path reads and writes. 'exec' FLOPs include the fused kernel's one-hot rel-pos "
        "expansion, which the floor uses.\n\n"
    )
    text = header + "\n".join(sections)
    # One file per batch: the GPU suite models batch 8 and then batch 1 into one folder.
    model_name = "attention_model" + (f"_b{args.batch}" if args.batch != 1 else "")
    (out / f"{model_name}.md").write_text(text)
    (out / f"{model_name}.json").write_text(json.dumps(payload, indent=1, default=list))
    print(text)
    print(f"wrote {out / model_name}.md and .json")
    # Made by tests/test_triton_aot.py into bench/results, wherever --out points.
    resources = ROOT / "bench" / "results" / "triton_resources.md"
    if resources.exists():
        print(resources.read_text())
    else:
        print(f"(no {resources}: run pytest tests/test_triton_aot.py or python -m mvit_kernels.triton.aot)")
    try:
        import torch

        cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    except ImportError:
        cuda = False
    if cuda:
        ceil = load_ceilings(args.ceilings)
        for rel in (False, True):
            shp = [dict(s, rel_pos=rel, rel_t=rel, residual=rel) for s in shapes]
            table, rows = bench_cuda(shp, rel, ceil)
            name = f"attention_bench_b{args.batch}" + ("_relpos" if rel else "")
            (out / f"{name}.md").write_text(f"# Pooling attention fwd and fwd+bwd, bf16, batch {args.batch}, "
                                            f"{torch.cuda.get_device_name()}, {'with' if rel else 'no'} rel-pos\n\n"
                                            f"Floors from {ceil.describe()}.\n\n{table}")
            (out / f"{name}.json").write_text(json.dumps(dict(ceilings=ceil.describe(), rows=rows), indent=1))
            print(table)
        table, rows = bench_projection(args.preset, args.batch)
        title = f"# Pooled K/V projection fwd+bwd, bf16, {args.preset}, batch {args.batch}, {torch.cuda.get_device_name()}"
        (out / f"pooled_projection_b{args.batch}.md").write_text(f"{title}\n\n{table}")
        (out / f"pooled_projection_b{args.batch}.json").write_text(json.dumps(rows, indent=1, default=list))
        print(title + "\n\n" + table)
        for preset in (args.preset, "mvitv2_s_16x4"):
            table, rows = bench_blocks(preset, args.batch)
            title = f"# Attention module fwd+bwd (qkv + pooling + attention + proj), bf16 autocast, {preset}, batch {args.batch}, {torch.cuda.get_device_name()}"
            (out / f"attention_blocks_{preset}_b{args.batch}.md").write_text(f"{title}\n\n{table}")
            (out / f"attention_blocks_{preset}_b{args.batch}.json").write_text(json.dumps(rows, indent=1, default=list))
            print(title + "\n\n" + table)
    else:
        print("CUDA not available: model and AOT tables only.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
