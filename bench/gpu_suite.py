"""One command for a lent GPU machine: build, check on CUDA, benchmark, summarize.

    python bench/gpu_suite.py            # from the repository root, on the GPU machine

Steps (each logged with its wall time; the whole suite is sized for < 20 minutes on an H100):
1. build the extension for this GPU: pip install --no-build-isolation --no-deps -e .
   (the lent machines have torch and Triton but no package registry);
2. CUDA correctness tests at real shapes (TRITON_INTERPRET=0): the pool ops against their CPU
   results, the Triton attention, and fused vs reference MViT-B / MViTv2-S;
3. bench/flops.py, bench/bench_pool_ops.py, bench/bench_attention.py, bench/throughput.py;
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


def main() -> int:
    device = _device_name()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = os.path.join(ROOT, "bench", "results", f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', device)}_{stamp}")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    py = sys.executable
    steps = [
        ("build", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], 600),
        ("cuda tests", [py, "-m", "pytest", "-q", "-x", "tests/test_pool3d.py", "tests/test_pool_residual_add.py",
                        "tests/test_triton_attention.py", "tests/test_cuda_model.py", "-k", "cuda or triton"], 600),
        ("flops", [py, "bench/flops.py", "--out", out], 120),
        ("pool ops", [py, "bench/bench_pool_ops.py", "--dtype", "bfloat16", "--out", out], 300),
        ("attention", [py, "bench/bench_attention.py", "--out", out], 300),
        ("throughput", [py, "bench/throughput.py", "--models", "mvit_b_16x4", "mvitv2_s_16x4",
                        "--batch-sizes", "1", "16", "--out", out], 900),
    ]
    summary = []
    for name, cmd, timeout in steps:
        start = time.time()
        log_path = os.path.join(out, f"{name.replace(' ', '_')}.log")
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        elapsed = time.time() - start
        tail = open(log_path).read().strip().splitlines()[-1:] or [""]
        summary.append({"step": name, "rc": rc, "seconds": round(elapsed, 1), "last_line": tail[0][:120]})
        print(f"gpu_suite: {name}: rc={rc} in {elapsed:.0f} s", flush=True)
        if name == "build" and rc != 0:
            break
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"device": device, "date": stamp, "steps": summary}, f, indent=2)
    print(f"\n# GPU suite on {device}, {stamp} (results in {os.path.relpath(out, ROOT)})\n")
    print("| step | exit | seconds | last line |\n|---|---|---:|---|")
    for s in summary:
        print(f"| {s['step']} | {s['rc']} | {s['seconds']} | {s['last_line']} |")
    tp = os.path.join(out, "throughput_gpu.md")
    if os.path.exists(tp):
        print("\n" + open(tp).read())
    return 0 if all(s["rc"] == 0 for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
