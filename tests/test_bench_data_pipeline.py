"""bench/data_pipeline.py runs and writes its table (its numbers are the benchmark's, not checked)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torchvision")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_data_pipeline_benchmark_writes_every_row(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "data_pipeline.py"), "--repeats", "2",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "data_pipeline_cpu.json").read_text())["rows"]
    assert [(r["case"].split(",")[0], r["mode"]) for r in rows] == [
        (case, mode) for case in ("Kinetics", "Kinetics", "Something-Something v2", "ImageNet")
        for mode in ("train", "test view")]
    assert all(r["median_ms"] > 0 and r["q1_ms"] <= r["q3_ms"] for r in rows)
    table = (tmp_path / "data_pipeline_cpu.md").read_text()
    assert table.count("\n| ") == len(rows) + 1  # header + one line per row
