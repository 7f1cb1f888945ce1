"""The two ceilings every floor in bench/ divides by: memory bandwidth (a large device-to-device
copy, bytes read plus bytes written) and the bf16 matrix-product rate (8192^3 on random data),
measured on the GPU at hand, next to the H100 figures the issues state their targets with.

    python bench/ceilings.py [--out DIR]      # on a GPU: measures, writes DIR/ceilings.json

bench_attention.py and bench_pool_ops.py compute their floors from the H100 figures the issues'
targets are stated with (3.0 TB/s, 790 TFLOP/s bf16) unless given ``--ceilings FILE``, the JSON
written here. Why measure: the lent machines may be H200s, which copy at ~4.3 TB/s against the
H100's 3.0, with the same matrix rate;
against H100 figures a memory-bound kernel's floor would be ~1.4x too high there, and its
"within 2x of the floor" would flatter it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class Ceilings:
    device: str
    bandwidth: float  # bytes/s, read + written
    peak_flops: float  # FLOP/s, bf16 matrix product

    def floor_s(self, nbytes: float, flops: float) -> float:
        """The least time an op can take: its bytes at the bandwidth or its FLOPs at the peak."""
        return max(nbytes / self.bandwidth, flops / self.peak_flops)

    def describe(self) -> str:
        return f"{self.device}: {self.bandwidth / 1e12:.2f} TB/s, {self.peak_flops / 1e12:.0f} TFLOP/s bf16"


#: The figures the issues' targets are stated with (the project's design notes, measured on an H100).
H100 = Ceilings("H100 (the issues' figures)", 3.0e12, 790e12)


def load(path: Optional[str]) -> Ceilings:
    """The ceilings in ``path`` (written by :func:`main`); H100's when no path is given or the
    file is missing (a suite whose ceilings step failed still benchmarks, and says so)."""
    if path is None:
        return H100
    if not os.path.exists(path):
        print(f"ceilings: {path} not found; floors use {H100.describe()}", file=sys.stderr)
        return H100
    with open(path) as f:
        data = json.load(f)
    return Ceilings(data["device"], float(data["bandwidth"]), float(data["peak_flops"]))


def _median_ms(fn, repeats: int) -> float:
    import torch

    fn()  # warm-up: allocation, cuBLAS handle and heuristics
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(copy_bytes: int = 2**31, n: int = 8192, repeats: int = 10) -> Ceilings:
    """Median of ``repeats`` event-timed runs each: a copy of ``copy_bytes`` (far past any L2)
    and an n x n x n bf16 product, both on random data (zeros run faster than real data)."""
    import torch

    src = torch.randn(copy_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), repeats)
    del src, dst
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = _median_ms(lambda: torch.mm(a, b), repeats)
    return Ceilings(torch.cuda.get_device_name(), 2 * copy_bytes / (copy_ms * 1e-3), 2 * n**3 / (mm_ms * 1e-3))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return parser


def main(argv=None) -> int:
    import torch

    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("ceilings: no CUDA device; nothing measured", file=sys.stderr)
        return 1
    found = measure()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ceilings.json"), "w") as f:
        json.dump(dict(asdict(found), reference=asdict(H100)), f, indent=1)
    print(f"ceilings: {found.describe()} (floors of the issues' model: {H100.describe()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
