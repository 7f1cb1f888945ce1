"""Resources of the compiled CUDA pool kernels, read from the extension's cubins with cuobjdump
(no GPU needed). Launch shapes (csrc/cuda/pool_ops_cuda.cu) set the limits:

- no spills: STACK and LOCAL 0. The float64 kernels may keep a small call frame (<= 32 B of
  STACK: sm_80's pool3d forward calls an fp64 math routine); float64 is the tests' dtype, not a
  fast path;
- kernels launched by make_launch have up to 1024 threads a block (d up to 1024), so at most 64
  registers (65536 per SM), which their __launch_bounds__ asks of the compiler;
- the dx gathers (``*_backward_input_kernel``) have at most kGatherThreads = 512: at most 128.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess

import pytest

import mvit_kernels

pytestmark = pytest.mark.skipif(not mvit_kernels.has_cuda_kernels(), reason="extension built without CUDA sources")

KERNELS = ["pool3d_forward_kernel", "pool3d_backward_rows_kernel", "pool3d_backward_input_kernel",
           "pool3d_backward_weight_kernel", "pool_residual_add_forward_kernel",
           "pool_residual_add_backward_rows_kernel", "pool_residual_add_backward_input_kernel"]


def _resource_usage() -> list[tuple[str, dict]]:
    from mvit_kernels.triton.aot import cuobjdump_path

    (library,) = glob.glob(os.path.join(os.path.dirname(mvit_kernels.__file__), "_C*.so"))
    text = subprocess.run([cuobjdump_path(), "--dump-resource-usage", library], check=True, capture_output=True,
                          text=True, timeout=300).stdout
    rows = []
    for name, usage in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text):
        kernel = next((k for k in KERNELS if k in name), None)
        if kernel is not None:
            usage = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", usage)}
            usage["float64"] = f"{kernel}IddE" in name  # template arguments <double, double>
            rows.append((kernel, usage))
    return rows


def test_pool_kernels_fit_their_launches_without_spills():
    rows = _resource_usage()
    # Every kernel in the four dtypes, for each architecture built.
    assert {k for k, _ in rows} == set(KERNELS) and len(rows) % (4 * len(KERNELS)) == 0, rows
    for kernel, usage in rows:
        assert usage["LOCAL"] == 0 and usage["STACK"] <= (32 if usage["float64"] else 0), (kernel, usage)
        limit = 128 if kernel.endswith("_backward_input_kernel") else 64
        assert usage["REG"] <= limit, (kernel, usage)
