"""One command for a lent GPU machine: build, check on CUDA, benchmark, summarize.

    python bench/gpu_suite.py                          # from the repository root, on the GPU machine
    python bench/gpu_suite.py --steps build tests      # a subset, in order

Steps (each logged with its wall time; the whole suite is sized for < 20 minutes on an H100):
1. build the extension for this GPU: pip install --no-build-isolation --no-deps -e .
   (the lent machines have torch and Triton but no package registry);
2. CUDA correctness tests at real shapes (TRITON_INTERPRET=0): the pool ops against their CPU
   results, the Triton attention, and fused vs reference MViT-B / MViTv2-S;
3. bench/flops.py, bench/bench_pool_ops.py, bench/bench_attention.py, bench/throughput.py,
   bench/profile_model.py (kernel time by category per variant of an MViT-B step);
4. a short summary table, printed last.
Everything goes under bench/results/gpu_<device>_<date>/ (logs and each script's Markdown/JSON).
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


def _device_name() -> str:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device here; run it on the GPU machine")
    return torch.cuda.get_device_name()


# name -> (command, timeout in seconds). PY is this interpreter, OUT the results folder, TPARGS
# --throughput-args. The timeouts keep a full run under 20 minutes; a lent machine allows 10 minutes
# a command, so there the steps are split over two calls (--steps).
STEPS = {
    "build": (["PY", "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], 300),
    # Two processes: a CUDA fault is sticky, and would fail every later test of the same process.
    "tests_model": (["PY", "-m", "pytest", "-q", "-rs", "-s", "tests/test_pool3d.py::test_cuda_matches_cpu",
                     "tests/test_pool3d.py::test_cuda_zero_channels_and_empty_batch",
                     "tests/test_pool_residual_add.py::test_cuda_matches_cpu", "tests/test_cuda_model.py",
                     "tests/test_tuning.py::test_cuda_model_default_tuning_matches_the_reference"], 240),
    "tests_triton": (["PY", "-m", "pytest", "-q", "-rs", "tests/test_triton_attention.py",
                      "tests/test_triton_pooled_projection.py"], 300),
    "flops": (["PY", "bench/flops.py", "--out", "OUT"], 120),
    "pool_ops": (["PY", "bench/bench_pool_ops.py", "--dtype", "bfloat16", "--batches", "1", "8", "--out", "OUT"], 180),
    "attention": (["PY", "bench/bench_attention.py", "--batch", "1", "--out", "OUT"], 240),
    "attention_b8": (["PY", "bench/bench_attention.py", "--batch", "8", "--out", "OUT"], 240),
    "profile": (["PY", "bench/profile_attention.py", "--block", "15", "--batch", "1"], 120),
    "throughput": (["PY", "bench/throughput.py", "TPARGS", "--out", "OUT"], 540),
    # Which kernels make the difference between the variants of one training/inference step.
    "profile_model": (["PY", "bench/profile_model.py", "--preset", "mvit_b_16x4", "--batch", "8", "--out", "OUT"], 240),
}


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
    import tarfile

    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"device": device, "date": stamp, "releases": versions, "steps": summary}, f, indent=2)
    if archive:
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(out, arcname=os.path.basename(out.rstrip("/")))


def main(argv=None) -> int:
    import argparse
    import shlex

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS),
                        help="run only these steps, in this order (default: all)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/gpu_<device>_<date>)")
    parser.add_argument("--throughput-args", default="--models mvit_b_16x4 mvitv2_s_16x4 --batch-sizes 1 16",
                        help="arguments passed to bench/throughput.py")
    parser.add_argument("--archive", default=None,
                        help="also pack the results folder into this .tar.gz (default $OUT/gpu_results.tgz when "
                             "$OUT is set, as on the lent machines, which return only a few files)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole run: each step's timeout is cut to what is left")
    args = parser.parse_args(argv)
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
    print("gpu_suite: " + versions_line, flush=True)
    for name in args.steps:
        cmd, timeout = STEPS[name]
        if args.deadline is not None:
            timeout = min(timeout, args.deadline - (time.time() - t_start) - 20)
            if timeout < 30:
                summary.append({"step": name, "rc": "no time", "seconds": 0, "last_line": ""})
                continue
        cmd = [sys.executable if c == "PY" else c for c in cmd]
        cmd = [a for c in cmd for a in ([out] if c == "OUT" else shlex.split(args.throughput_args) if c == "TPARGS" else [c])]
        start = time.time()
        log_path = os.path.join(out, f"{name}.log")
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        elapsed = time.time() - start
        tail = open(log_path).read().strip().splitlines()[-1:] or [""]
        summary.append({"step": name, "rc": rc, "seconds": round(elapsed, 1), "last_line": tail[0][:120]})
        print(f"gpu_suite: {name}: rc={rc} in {elapsed:.0f} s", flush=True)
        if rc != 0:
            print("\n".join(open(log_path).read().splitlines()[-40:]), flush=True)
        _save(out, device, stamp, summary, archive, versions)  # after every step: a killed run keeps what it did
        if name == "build" and rc != 0:
            break
    print(f"\n# GPU suite on {device}, {stamp} (results in {out})\n")
    print(versions_line + "\n")
    print("| step | exit | seconds | last line |\n|---|---|---:|---|")
    for s in summary:
        print(f"| {s['step']} | {s['rc']} | {s['seconds']} | {s['last_line']} |")
    shown = [f"attention_bench_b{b}{r}.md" for b in (1, 8) for r in ("", "_relpos")]
    shown += [f"pooled_projection_b{b}.md" for b in (1, 8)]
    shown += [f"attention_blocks_{p}_b{b}.md" for b in (1, 8) for p in ("mvit_b_16x4", "mvitv2_s_16x4")]
    for name in shown + ["throughput_gpu.md", "profile_model_gpu.md"]:
        path = os.path.join(out, name)
        if os.path.exists(path):
            print("\n" + open(path).read())
    return 0 if all(s["rc"] == 0 for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
