"""Trainer switches that must work on CPU: bf16 autocast, activation checkpointing, gradient
accumulation, EMA, and `--fused` failing clearly when the extension is missing."""

import json

import pytest

import mvit_kernels
from mvit.cli import main


def test_bf16_checkpointing_accumulation_ema(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--synthetic-size", "32", "8", "--batch-size", "8", "--accum-steps", "2", "--epochs", "1",
                 "--max-steps", "2", "--precision", "bf16", "--checkpoint-activations", "--ema-decay", "0.99",
                 "--threads", "1", "--no-progress", "--output-dir", str(out)]) == 0
    records = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert next(r for r in records if r["kind"] == "config")["precision"] == "bf16"
    assert len([r for r in records if r["kind"] == "train"]) == 2
    assert (out / "curves.png").exists()


def test_fused_without_extension_is_a_clear_error(tmp_path):
    try:
        mvit_kernels.require_fused()
    except RuntimeError as exc:
        with pytest.raises(RuntimeError, match=str(exc)[:30]):
            main(["train", "--fused", "--synthetic-size", "8", "8", "--batch-size", "8", "--max-steps", "1",
                  "--no-progress", "--output-dir", str(tmp_path)])
    else:
        pytest.skip("the fused extension is built here")


def test_fused_run_reports_its_kernel_choices(tmp_path):
    # Tuning is on for CUDA tensors by default; "all" makes this CPU run tune, as a GPU run would.
    if not mvit_kernels.load_extension():
        pytest.skip("needs the fused extension")
    out = tmp_path / "run"
    mvit_kernels.tuning.clear()
    with mvit_kernels.tuning.using("all"):
        assert main(["train", "--fused", "--synthetic-size", "16", "8", "--batch-size", "8", "--epochs", "1",
                     "--max-steps", "1", "--threads", "1", "--no-progress", "--output-dir", str(out)]) == 0
    mvit_kernels.tuning.clear()
    choices = json.loads((out / "result.json").read_text())["kernel_choices"]
    assert {c["op"].split()[0] for c in choices} >= {"pool3d", "pool_residual_add"}
    for c in choices:
        assert set(c["ms"]) == {"fused", "reference", "reference-ncdhw"}, c
        # The fastest wins, except candidates passed over under the default memory policy
        # ("keep": a training step's candidate may not keep more for the backward than the fused op).
        assert c["winner"] == min((n for n in c["ms"] if n not in c["held_back"]), key=c["ms"].get), c
        assert set(c["held_back"]) == {n for n in c["ms"] if c["ms"][n] < c["ms"][c["winner"]]}, c
        for name in c["held_back"]:
            assert c["memory"] == "keep" and c["saved_mb"][name] > c["saved_mb"]["fused"], c
