"""The `mvit` command: `mvit flops` output and its argument errors."""

import json
import subprocess
import sys

from mvit.cli import main


def test_flops_prints_params_gflops_and_stages(capsys):
    assert main(["flops", "--preset", "mvit_b_16x4"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 36,610,672" in out
    assert "GFLOPs (multiply-adds): 70.599" in out
    # four stages: blocks 0, 1-2, 3-13, 14-15
    for blocks in (" 0 ", " 1-2 ", " 3-13 ", " 14-15 "):
        assert blocks in out
    assert "torchvision: 70.599 GFLOPs" in out


def test_flops_other_input_size_and_json(capsys):
    assert main(["flops", "--preset", "mvit_b_16x4", "--input-size", "32", "256", "256", "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["input_size"] == [32, 256, 256]
    assert result["params"] == 36_610_672  # parameters do not depend on the input size
    assert result["gflops"] > 2 * 70.599
    # the published figures stand beside it, saying which input they are for
    assert main(["flops", "--preset", "mvit_b_16x4", "--input-size", "32", "256", "256"]) == 0
    out = capsys.readouterr().out
    assert "paper (for 16x224x224, not this input): 70.5 GFLOPs" in out
    assert "torchvision (for 16x224x224, not this input): 70.599 GFLOPs" in out


def test_flops_of_an_input_too_large_to_index_is_one_line(capsys):
    # a traceback: "RuntimeError: Storage size calculation overflowed"
    assert main(["flops", "--preset", "mvit_tiny", "--input-size", "8", "100000", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mvit flops: error: input_size (8, 100000, 100000) gives 2,500,000,000 tokens, more than 2^31 - 1"


def test_unknown_preset_exits_2_with_one_line(capsys):
    assert main(["flops", "--preset", "mvit_xl"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'mvit_xl'" in err and "Traceback" not in err


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "mvit", "flops", "--preset", "mvitv2_s_16x4"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "GFLOPs (multiply-adds): 64.224" in proc.stdout


def test_default_workers_fit_the_cpus_of_each_rank(monkeypatch):
    import os

    from mvit.data import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun, 8 GPUs on 16 CPUs
    assert default_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # this CI's VM
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 1  # never 0: decoding in the training process would stall it
