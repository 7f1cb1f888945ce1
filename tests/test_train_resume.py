"""Runs replay: the same seed gives the same run, and resuming from a mid-epoch checkpoint
replays the uninterrupted run's losses exactly."""

import json
import os
import shutil

import pytest
import torch

from mvit.cli import main
from mvit.training import checkpoint as ckpt

COMMON = ["train", "--synthetic-size", "64", "16", "--batch-size", "8", "--epochs", "3", "--max-steps", "12",
          "--mixup", "0.8", "--cutmix", "1.0", "--drop-path", "0.2", "--ema-decay", "0.9", "--no-progress",
          "--seed", "3", "--threads", "1"]


def _losses(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}


def test_resume_mid_epoch_matches_uninterrupted(tmp_path):
    full = str(tmp_path / "full")
    assert main(COMMON + ["--output-dir", full, "--ckpt-every", "4", "--keep-ckpts", "10"]) == 0
    reference = _losses(full)
    assert sorted(reference) == list(range(1, 13))
    mid = [p for p in ckpt.list_checkpoints(full) if p.endswith(ckpt.checkpoint_name(0, 4))]
    assert mid, os.listdir(full)  # step 4 of 8 in epoch 0
    state = ckpt.load(mid[0])
    assert state["sampler"]["position"] == 32 and state["epoch"] == 0
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "ema", "rng", "step"}

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copy(mid[0], resumed)
    assert main(COMMON + ["--output-dir", resumed, "--resume", "auto"]) == 0
    again = _losses(resumed)
    assert sorted(again) == list(range(5, 13))  # crosses the epoch boundary at step 8
    for step, loss in again.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step
    with open(os.path.join(full, "result.json")) as f:
        a = json.load(f)
    with open(os.path.join(resumed, "result.json")) as f:
        b = json.load(f)
    assert a["val"] == b["val"]
    assert os.path.exists(os.path.join(full, "curves.png"))


def _with(argv, flag, value):
    """argv with flag's value replaced."""
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def test_same_seed_same_run_whatever_the_rng_state_before(tmp_path):
    """--seed fixes the initial weights too, not only the data: the global RNG is left in a
    different state before each run (as separate processes leave it) and the runs still agree."""
    runs = {}
    for name, rng_before, seed in (("a", 1, "3"), ("b", 2, "3"), ("c", 1, "4")):
        torch.manual_seed(rng_before)
        argv = _with(_with(COMMON, "--max-steps", "2"), "--seed", seed)
        assert main(argv + ["--output-dir", str(tmp_path / name)]) == 0
        runs[name] = _losses(str(tmp_path / name))
    assert sorted(runs["a"]) == [1, 2]
    assert runs["a"] == runs["b"]
    assert runs["c"][1] != runs["a"][1]  # another seed, another start (step 1's loss precedes any update)
