"""One command for a lent GPU machine: build, check on CUDA, benchmark, summarize.

    python bench/gpu_suite.py --plan lease --dry-run   # anywhere: the steps, their commands and caps
    python bench/gpu_suite.py                          # on the GPU machine, from the repository root
    python bench/gpu_suite.py --steps build tests_model   # a subset, in order

Plans (``--plan``; ``--steps`` and ``--deadline`` override a plan's steps and deadline):
- ``lease`` (the default): one call of the device tool, <= 560 s, for a lent machine's 15 minutes
  of device time all told (its start takes a minute or more, and a call may last 10 minutes).
  Steps in the order their results matter: the GPU's ceilings, the build, the CUDA correctness
  tests of the pool ops and whole models, eager throughput at batch 8 (the issues' targets
  against torchvision), the Triton op tests, the pool ops' benchmark, the kernel benchmark at
  batch 8, compiled throughput, the model profile. The deadline cuts the
  tail: a step that cannot start with 30 s left is recorded as "no time".
- ``all``: every step, no deadline (a machine of your own: about 20 minutes on an H100).

Steps (each logged with its wall time under its cap; the results so far are saved after each):
1. ceilings: the GPU's copy bandwidth and bf16 matrix rate (bench/ceilings.py), which the kernel
   benchmarks' floors then use instead of the H100 figures;
2. build the extension for this GPU: pip install --no-build-isolation --no-deps -e .
   (the lent machines have torch and Triton but no package registry);
3. CUDA correctness tests at real shapes (TRITON_INTERPRET=0): the pool ops against their CPU
   results, the Triton kernels, and fused vs reference MViT-B / MViTv2-S;
4. bench/flops.py, bench/bench_pool_ops.py, bench/bench_attention.py, bench/throughput.py
   (eager, compiled, and a batch sweep for the PNG), bench/profile_model.py (kernel time by
   category per variant of an MViT-B step);
5. a short summary table, printed last.
Everything goes under bench/results/gpu_<device>_<date>/ (logs and each script's Markdown/JSON),
and, where $OUT is set (the lent machines return only a few files), into $OUT/gpu_results.tgz.
A second call into the same folder adds its steps to summary.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: --throughput-args' default: the eager variants at batch 8, the batch of the H100 run of 2026-11-24,
#: with ours-fused-timeonly beside ours-fused: whether tuning's default memory policy, which keeps
#: every pool op fused in training, costs the training target, and what it saves.
THROUGHPUT_ARGS = ("--models mvit_b_16x4 mvitv2_s_16x4 --batch-sizes 8 "
                   "--variants ours-fused ours-fused-timeonly ours-ref-sdpa torchvision")


def _device_name() -> str:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device here; run it on the GPU machine")
    return torch.cuda.get_device_name()


# name -> (command, cap in seconds). PY is this interpreter, OUT the results folder (OUT/name a
# file in it), TPARGS --throughput-args. Two test processes: a CUDA fault is sticky, and would
# fail every later test of the same process.
STEPS = {
    "ceilings": (["PY", "bench/ceilings.py", "--out", "OUT"], 45),
    "build": (["PY", "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], 180),
    "tests_model": (["PY", "-m", "pytest", "-q", "-rs", "-s", "tests/test_pool3d.py::test_cuda_matches_cpu",
                     "tests/test_pool3d.py::test_cuda_zero_channels_and_empty_batch",
                     "tests/test_pool_residual_add.py::test_cuda_matches_cpu",
                     "tests/test_pooled_projection.py::test_float32", "tests/test_cuda_model.py",
                     "tests/test_tuning.py::test_cuda_model_default_tuning_matches_the_reference"], 240),
    "tests_triton": (["PY", "-m", "pytest", "-q", "-rs", "tests/test_triton_attention.py",
                      "tests/test_triton_pooled_projection.py"], 300),
    "throughput": (["PY", "bench/throughput.py", "TPARGS", "--out", "OUT"], 240),
    "pool_ops": (["PY", "bench/bench_pool_ops.py", "--dtype", "bfloat16", "--batches", "1", "8",
                  "--ceilings", "OUT/ceilings.json", "--out", "OUT"], 120),
    "attention_b8": (["PY", "bench/bench_attention.py", "--batch", "8", "--ceilings", "OUT/ceilings.json",
                      "--out", "OUT"], 240),
    # The issue 6 targets' compiled peers; training first, the headline target.
    "throughput_compiled": (["PY", "bench/throughput.py", "--models", "mvit_b_16x4", "--batch-sizes", "8",
                             "--modes", "train", "infer", "--variants", "ours-fused+compile", "torchvision+compile",
                             "--suffix", "_compiled", "--out", "OUT"], 300),
    # Which kernels make the difference between the variants of one training/inference step.
    "profile_model": (["PY", "bench/profile_model.py", "--preset", "mvit_b_16x4", "--batch", "8", "--out", "OUT"], 240),
    "flops": (["PY", "bench/flops.py", "--out", "OUT"], 120),
    "attention": (["PY", "bench/bench_attention.py", "--batch", "1", "--ceilings", "OUT/ceilings.json",
                   "--out", "OUT"], 240),
    "profile": (["PY", "bench/profile_attention.py", "--block", "15", "--batch", "1"], 120),
    # Throughput against batch size (the PNG), and the CUDA-graph variants.
    "throughput_sweep": (["PY", "bench/throughput.py", "--models", "mvit_b_16x4", "--batch-sizes", "1", "4", "8", "16",
                          "32", "--variants", "ours-fused", "ours-ref-sdpa", "torchvision", "--suffix", "_sweep",
                          "--out", "OUT"], 540),
    "throughput_cudagraphs": (["PY", "bench/throughput.py", "--models", "mvit_b_16x4", "--batch-sizes", "8",
                               "--variants", "ours-fused+compile-cudagraphs", "torchvision+compile-cudagraphs",
                               "--suffix", "_cudagraphs", "--out", "OUT"], 400),
}

#: name -> (steps in order, deadline in seconds or None).
PLANS = {
    # The Triton op tests after the eager throughput: ~160 now (36 in the 76 s of 2026-11-24), each
    # shape compiling its kernels; under their 300 s cap the headline numbers could get no time.
    # The model tests and tuning's cross-check of every fused candidate at the benchmarks' shapes
    # vouch for those numbers first.
    "lease": (["ceilings", "build", "tests_model", "throughput", "tests_triton", "pool_ops", "attention_b8",
               "throughput_compiled", "profile_model"], 560),
    "all": (list(STEPS), None),
}


def command(name: str, out: str, throughput_args: str = THROUGHPUT_ARGS) -> list[str]:
    """The step's argv with its placeholders filled in."""
    import shlex

    argv = []
    for token in STEPS[name][0]:
        if token == "PY":
            argv.append(sys.executable)
        elif token == "OUT":
            argv.append(out)
        elif token.startswith("OUT/"):
            argv.append(os.path.join(out, token[4:]))
        elif token == "TPARGS":
            argv += shlex.split(throughput_args)
        else:
            argv.append(token)
    return argv


def step_timeout(name: str, deadline, elapsed: float):
    """The step's cap, cut to what the deadline leaves (20 s kept for the summary); None where
    under 30 s would be left, too little to start a step."""
    cap = STEPS[name][1]
    if deadline is None:
        return cap
    left = deadline - elapsed - 20
    return min(cap, left) if left >= 30 else None


def releases() -> dict:
    """The software a run's numbers depend on (tile rules and kernels differ between Triton
    releases; README, "Tested releases")."""
    import platform

    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version()}
    for module in ("triton", "numpy", "torchvision"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            found[module] = None
    return found


def _save(out: str, device: str, stamp: str, summary: list, archive, versions: dict) -> None:
    """summary.json (this call's steps after those of earlier calls into the same folder that
    it did not rerun) and, if asked, the whole folder as a .tar.gz."""
    import tarfile

    path = os.path.join(out, "summary.json")
    earlier = []
    if os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f).get("steps", [])
    names = {s["step"] for s in summary}
    steps = [s for s in earlier if s["step"] not in names] + summary
    with open(path, "w") as f:
        json.dump({"device": device, "date": stamp, "releases": versions, "steps": steps}, f, indent=2)
    if archive:
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(out, arcname=os.path.basename(out.rstrip("/")))


def _rows(out: str, name: str) -> list[dict]:
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    return data["rows"] if isinstance(data, dict) else data


def targets_table(out: str, model: str = "mvit_b_16x4", batch: int = 8) -> list[str]:
    """Markdown rows: each issue target that this folder's results can judge, measured against
    its goal (issue 6: MViT-B 16x4, bf16, training and inference against torchvision eager and the
    best compiled peer, training memory; issue 4: the Triton attention's time over its floor)."""
    rows = [r for name in ("throughput_gpu.json", "throughput_gpu_compiled.json") for r in _rows(out, name)
            if r.get("model") == model and r.get("batch") == batch and "error" not in r]

    def step(mode, variants):
        found = [r for r in rows if r["mode"] == mode and r["variant"] in variants]
        return min(found, key=lambda r: r["step_s"]) if found else None

    lines = ["| target | measured | goal | met |", "|---|---:|---:|---|"]

    def add(what, value, goal, higher_is_better=True):
        wanted = f"{'>=' if higher_is_better else '<='} {goal}x"
        if value is None:
            lines.append(f"| {what} | not measured | {wanted} | — |")
        else:
            met = value >= goal if higher_is_better else value <= goal
            lines.append(f"| {what} | {value:.2f}x | {wanted} | {'yes' if met else 'no'} |")

    for mode, eager_goal, compiled_goal in (("train", 1.5, 1.15), ("infer", 2.0, 1.2)):
        ours = step(mode, {"ours-fused"})
        ours_best = step(mode, {"ours-fused", "ours-fused+compile", "ours-fused+compile-cudagraphs"})
        tv = step(mode, {"torchvision"})
        peers = {r["variant"] for r in rows if not r["variant"].startswith("ours") and "+compile" in r["variant"]}
        best_compiled = step(mode, peers)
        add(f"{model} {mode} b{batch}: ours-fused vs torchvision eager",
            tv["step_s"] / ours["step_s"] if ours and tv else None, eager_goal)
        add(f"{model} {mode} b{batch}: our best vs best compiled peer"
            + (f" ({best_compiled['variant']})" if best_compiled else ""),
            best_compiled["step_s"] / ours_best["step_s"] if ours_best and best_compiled else None, compiled_goal)
    ours, tv = step("train", {"ours-fused"}), step("train", {"torchvision"})
    peak = ours and tv and ours.get("peak_gib") and tv.get("peak_gib")
    add(f"{model} train b{batch}: peak memory, ours-fused / torchvision eager",
        ours["peak_gib"] / tv["peak_gib"] if peak else None, 0.6, higher_is_better=False)
    for rel in ("", "_relpos"):
        bench = [r for r in _rows(out, f"attention_bench_b{batch}{rel}.json") if r.get("triton_graph_ms")]
        worst = max((r["triton_graph_ms"] / r["floor_ms"] for r in bench), default=None)
        add(f"Triton attention{' + rel-pos' if rel else ''} b{batch}, worst block: graph-replay time / floor",
            worst, 2.0, higher_is_better=False)
    return lines


def cross_check_lines(out: str) -> list[str]:
    """What the benchmarks' per-shape tuning found when it checked each fused candidate against
    its trusted alternative (``mvit_kernels.tuning``) at the real shapes and dtype: how many were
    checked, the worst errors and which disagreed. A correctness result at MViT's own shapes that
    the throughput steps produce anyway."""
    checks = []
    for name in ("throughput_gpu.json", "throughput_gpu_compiled.json", "profile_model_gpu.json"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            for row in data.get("tuning", []) if isinstance(data, dict) else []:
                checks += [(row["op"], cand, err, row.get("note", "")) for cand, err in row.get("checked", {}).items()]
    if not checks:
        return ["Tuning cross-check: nothing checked (no tuning in these results)."]
    wrong = sorted({f"{cand} at {op}" for op, cand, _, note in checks if f"{cand} disagrees" in note})
    fwd = max(checks, key=lambda c: c[2][0])
    grad = max(checks, key=lambda c: c[2][1])
    return [f"Tuning cross-check: {len(checks)} candidate/shape pairs checked against the trusted path; worst "
            f"forward error {fwd[2][0]:.1e} ({fwd[1]} at {fwd[0]}), worst gradient error {grad[2][1]:.1e} ({grad[1]} "
            f"at {grad[0]}); disagreements: {'; '.join(wrong) if wrong else 'none'}."]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    parser.add_argument("--plan", default="lease", choices=list(PLANS),
                        help="lease (default): one call sized for a lent machine; all: every step, no deadline")
    parser.add_argument("--steps", nargs="+", default=None, choices=list(STEPS),
                        help="run these steps, in this order, instead of the plan's")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/gpu_<device>_<date>)")
    parser.add_argument("--throughput-args", default=THROUGHPUT_ARGS,
                        help=f"arguments of the throughput step's bench/throughput.py (default: {THROUGHPUT_ARGS})")
    parser.add_argument("--archive", default=None,
                        help="also pack the results folder into this .tar.gz (default $OUT/gpu_results.tgz when "
                             "$OUT is set, as on the lent machines, which return only a few files)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole run (default: the plan's): each step's cap is cut to what is left")
    parser.add_argument("--dry-run", action="store_true", help="print the steps, their commands and caps; run nothing")
    args = parser.parse_args(argv)
    plan_steps, plan_deadline = PLANS[args.plan]
    steps = args.steps or plan_steps
    deadline = args.deadline if args.deadline is not None else plan_deadline
    if args.dry_run:
        print(f"gpu_suite: plan {args.plan}, deadline {deadline} s" + (" (steps given)" if args.steps else ""))
        for name in steps:
            print(f"  {name} (cap {STEPS[name][1]} s): {' '.join(command(name, 'OUT', args.throughput_args))}")
        return 0
    t_start = time.time()
    device = _device_name()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = args.out or os.path.join(ROOT, "bench", "results", f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', device)}_{stamp}")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    import torch

    # Code for this GPU only: the build default adds sm_80 and PTX, build time the device limit counts.
    env.setdefault("TORCH_CUDA_ARCH_LIST", "{}.{}".format(*torch.cuda.get_device_capability()))
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    archive = args.archive or (os.path.join(os.environ["OUT"], "gpu_results.tgz") if os.environ.get("OUT") else None)
    summary = []
    versions = releases()
    versions_line = ", ".join(f"{k} {v}" for k, v in versions.items())
    print(f"gpu_suite: plan {args.plan}, deadline {deadline} s; " + versions_line, flush=True)
    for name in steps:
        timeout = step_timeout(name, deadline, time.time() - t_start)
        if timeout is None:
            summary.append({"step": name, "rc": "no time", "seconds": 0, "last_line": ""})
            continue
        start = time.time()
        log_path = os.path.join(out, f"{name}.log")
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run(command(name, out, args.throughput_args), cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        elapsed = time.time() - start
        with open(log_path) as f:
            lines = f.read().strip().splitlines()
        last_line = lines[-1][:120] if lines else ""
        summary.append({"step": name, "rc": rc, "seconds": round(elapsed, 1), "last_line": last_line})
        print(f"gpu_suite: {name}: rc={rc} in {elapsed:.0f} s", flush=True)
        if rc != 0:
            print("\n".join(lines[-40:]), flush=True)
        _save(out, device, stamp, summary, archive, versions)  # after every step: a killed run keeps what it did
        if name == "build" and rc != 0:
            break
    _save(out, device, stamp, summary, archive, versions)  # with the steps the deadline left out
    # The tables first and the short summary last: the device tool's reply keeps the output's end.
    shown = [f"attention_bench_b{b}{r}.md" for b in (1, 8) for r in ("", "_relpos")]
    shown += [f"pooled_projection_b{b}.md" for b in (1, 8)]
    shown += [f"attention_blocks_{p}_b{b}.md" for b in (1, 8) for p in ("mvit_b_16x4", "mvitv2_s_16x4")]
    shown += [f"throughput_gpu{suffix}.md" for suffix in ("", "_compiled", "_cudagraphs", "_sweep")]
    for name in shown + ["profile_model_gpu.md", "pool_ops_cuda_bfloat16.md"]:
        path = os.path.join(out, name)
        if os.path.exists(path):
            with open(path) as f:
                print("\n" + f.read())
    print(f"\n# GPU suite on {device}, {stamp}, plan {args.plan} (results in {out})\n")
    print(versions_line + "\n")
    ceilings = os.path.join(out, "ceilings.json")
    if os.path.exists(ceilings):
        with open(ceilings) as f:
            c = json.load(f)
        print(f"Ceilings measured: {c['bandwidth'] / 1e12:.2f} TB/s copy, {c['peak_flops'] / 1e12:.0f} TFLOP/s bf16\n")
    print("| step | exit | seconds | last line |\n|---|---|---:|---|")
    for s in summary:
        print(f"| {s['step']} | {s['rc']} | {s['seconds']} | {s['last_line']} |")
    print("\n" + "\n".join(targets_table(out)))
    print("\n" + "\n".join(cross_check_lines(out)))
    return 0 if all(s["rc"] == 0 for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
