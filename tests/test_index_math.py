"""The pooling kernels' index arithmetic (csrc/pool3d_common.h) checked on the host:
tests/cpp/index_math_test.cpp compares FastDivmod and OutputRowDivs (CUDA only) with plain
division, over divisors up to 2^31 - 1 and values up to the launchers' limit, and over every row
of several pooling geometries; and the window and covering loops with brute force. It runs
twice: as the CPU kernels compile the header, and with MVIT_CUDA_EMULATION, which selects the
GPU kernels' flat, unrolled loop shape.
The header has no dependencies, so any C++17 compiler builds the check (the one that builds the
extension)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("loop_shape", ["cpu", "gpu"])
def test_index_math_matches_plain_division_and_brute_force(tmp_path, loop_shape):
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    assert compiler, "no C++ compiler found (the extension build needs one too)"
    binary = tmp_path / "index_math_test"
    source = os.path.join(ROOT, "tests", "cpp", "index_math_test.cpp")
    defines = ["-DMVIT_CUDA_EMULATION"] if loop_shape == "gpu" else []
    build = subprocess.run([compiler, "-std=c++17", "-O2", *defines, "-I", os.path.join(ROOT, "csrc"), source, "-o",
                            str(binary)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " 0 failures" in run.stdout and int(run.stdout.split()[-4]) > 1_000_000, run.stdout[-500:]
