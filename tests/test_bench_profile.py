"""bench/profile_model.py: the category rules, and a small CPU run of the whole script that must
put our ops' time under our categories for the fused model and the reference's convolutions under
convolution for the reference model."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import profile_model as pm  # noqa: E402


def test_attribution_takes_the_innermost_name_with_a_category():
    # A plain elementwise op inside the optimizer's step is optimizer time...
    assert pm.attribute(["aten::div", "Optimizer.step#AdamW.step"]) == "optimizer (AdamW)"
    # ...a kernel's own name wins over the op that launched it...
    assert (pm.attribute(["mvit::pool3d_backward_rows_kernel<float, float>", "mvit_kernels::pool3d_backward"])
            == "pool3d backward: dp, LayerNorm (ours)")
    # Each of our CUDA pool kernels has its own row; on CPU the op's name is the whole op.
    assert pm.category("void mvit::(anonymous namespace)::pool3d_forward_kernel<c10::BFloat16, float>") == (
        "pool3d forward (ours)")
    assert pm.category("pool3d_backward_input_kernel<float, float>") == "pool3d backward: dx gather (ours)"
    assert pm.category("pool3d_backward_weight_kernel<float, float>") == "pool3d backward: conv weight (ours)"
    assert pm.category("mvit_kernels::pool3d_backward") == "pool3d (ours)"
    assert pm.attribute(["pooled_projection_bwd_kernel", "autograd::engine::evaluate_function"]) == "pooled projection (Triton)"
    # ...and an unnamed elementwise kernel takes its operator's category.
    assert pm.attribute(["void at::native::vectorized_elementwise_kernel<4>", "aten::mul",
                         "aten::native_layer_norm_backward"]) == "LayerNorm"
    assert pm.attribute(["aten::mul", "aten::add"]) == pm.OTHER
    # torch's own max_pool3d is not our pool3d.
    assert pm.category("aten::max_pool3d_with_indices") == "max pool (reference skip)"
    assert pm.category("mvit_kernels::pool3d") == "pool3d (ours)"


def test_small_cpu_run_attributes_fused_and_reference_ops(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "bench/profile_model.py", "--preset", "mvit_b_16x4", "--input-size", "2", "32", "32",
         "--variants", "ours-fused", "ours-ref", "--warmup", "1", "--steps", "1", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "profile_model_cpu.json").read_text())["rows"]
    assert {(r["variant"], r["mode"]) for r in rows} == {(v, m) for v in ("ours-fused", "ours-ref") for m in ("train", "infer")}
    for r in rows:
        assert sum(r["ms"].values()) > 0 and r["wall_ms"] > 0
        fused = r["variant"] == "ours-fused"
        assert (r["ms"].get("pool3d (ours)", 0) > 0) == fused, r
        assert (r["ms"].get("skip pooling + add (ours)", 0) > 0) == fused, r
        if not fused:  # the reference pools with conv3d and max_pool3d
            assert r["ms"]["convolution (reference pooling, patch embed)"] > 0
            assert r["ms"]["max pool (reference skip)"] > 0
        if r["mode"] == "train":
            assert r["ms"]["optimizer (AdamW)"] > 0
    text = (tmp_path / "profile_model_cpu.md").read_text()
    assert "| category | ours-fused | ours-ref |" in text and "## mvit_b_16x4 train, batch 1" in text


def test_throughput_variants_cuda_graphs_only_on_request_and_on_cuda():
    import torch
    import throughput

    every = throughput._variants("mvit_tiny", torch.device("cpu"), set())
    assert {"ours-fused", "ours-fused+compile", "ours-ref", "ours-ref-sdpa+compile"} <= set(every)
    assert not any(label.endswith("+compile-cudagraphs") for label in every)  # opt-in: slowest compile
    asked = throughput._variants("mvit_tiny", torch.device("cpu"), {"ours-fused", "ours-fused+compile-cudagraphs"})
    assert set(asked) == {"ours-fused"}  # CUDA graphs need CUDA
    assert every["ours-fused+compile"][2] == "default" and every["ours-fused"][2] is None
    # --variants is checked against ALL_VARIANTS, a list beside _variants': every label built is in it.
    timeonly = throughput._variants("mvit_tiny", torch.device("cpu"), {"ours-fused-timeonly"})
    assert set(every) | set(timeonly) <= throughput.ALL_VARIANTS and "ours-fused-timeonly" in timeonly


def test_throughput_pytorchvideo_peer_runs_the_presets_step():
    """The image MViT-B had no peer (torchvision has no build of it): pytorchvideo's is one, and its
    step runs on the input the preset's rows get (its image model takes (B, 3, H, W) too)."""
    import contextlib

    import throughput
    import torch

    image = throughput._variants("mvit_b16_image", torch.device("cpu"), {"pytorchvideo", "pytorchvideo+compile"})
    assert set(image) == {"pytorchvideo", "pytorchvideo+compile"} <= throughput.ALL_VARIANTS
    model, step = throughput.make_step("mvit_b16_image", image["pytorchvideo"], torch.device("cpu"), 1, "infer",
                                       contextlib.nullcontext)
    step()
    assert sum(p.numel() for p in model.parameters()) == 36_982_696  # ours 36,982,600 + its separate class row
    assert "pytorchvideo" in throughput._variants("mvit_b_16x4", torch.device("cpu"), {"pytorchvideo"})
    assert "pytorchvideo" not in throughput._variants("mvitv2_s_16x4", torch.device("cpu"), {"pytorchvideo"})


def test_throughput_peak_memory_counts_the_timed_steps_only(monkeypatch):
    # The first step of a fused model tunes each shape (every candidate's outputs and gradients
    # held at once) and a compiled one compiles: the peak-memory counter is reset after the
    # warm-up, so the column is the steady state a training run has.
    import torch
    import throughput

    events = []
    throughput._time(lambda: events.append("step"), torch.device("cpu"), 2, 3, after_warmup=lambda: events.append("reset"))
    assert events == ["step", "step", "reset", "step", "step", "step"]
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: resets.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 2**30)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(throughput, "_sync", lambda device: None)
    monkeypatch.setattr(throughput, "make_step", lambda *a: (None, lambda: resets.append("step")))
    fake_cuda = type("FakeDevice", (), {"type": "cuda"})()
    row = throughput.measure("mvit_tiny", "ours-fused", (None, None, None, None), fake_cuda, 1, "train", 2, 2,
                             None)
    assert resets == ["step", "step", "reset", "step", "step"] and row["peak_gib"] == 1.0


def test_throughput_cpu_floor(monkeypatch, tmp_path):
    """Each CPU row's arithmetic floor: the variant's executed multiply-adds (the fused model's
    own count, lower where it skips unread tokens), x2 FLOPs, x3 for a training step, at the
    measured matrix-product rate; and the line that bounds the speedup over torchvision."""
    import torch
    import throughput


    assert throughput.floor_seconds(10.0, 2, "infer", 1e11) == pytest.approx(0.4)  # 2 * 10e9 * 2 / 1e11
    assert throughput.floor_seconds(10.0, 2, "train", 1e11) == pytest.approx(1.2)
    fused = throughput.executed_gflops("mvit_b_16x4", "ours-fused+compile")
    ref = throughput.executed_gflops("mvit_b_16x4", "torchvision")
    assert round(ref, 3) == 70.599 and fused < ref - 1.0

    rate = throughput.cpu_matmul_rate(repeats=1)
    assert rate["flop_per_s"] == max(rate["rates"].values()) > 1e8 and rate["best"] in rate["rates"]

    row = dict(mode="infer", batch=1, min_s=0.9, max_s=1.1, clips_per_s=1.0, peak_gib=None)
    rows = [dict(row, model="mvit_b_16x4", variant="ours-fused", step_s=1.0, gflops=69.0, floor_s=0.5),
            dict(row, model="mvit_b_16x4", variant="torchvision", step_s=1.5, gflops=70.0, floor_s=0.6),
            dict(row, model="mvit_b_16x4", variant="ours-ref", error="OOM")]
    ceiling = {"flop_per_s": 2.76e11, "best": "torch.mm 2048^3", "rates": {"torch.mm 2048^3": 2.76e11}}
    monkeypatch.setattr(throughput, "_plot", lambda rows, path: None)
    text = throughput._write(rows, torch.device("cpu"), "CPU test", str(tmp_path), ceiling=ceiling)
    assert "at 276 GFLOP/s" in text
    assert "| mvit_b_16x4 | infer | 1 | ours-fused | 1000.0 | 900.0–1100.0 | 1.00 | — | 1.50 | 1.50 | 500.0 | 2.00 |" in text
    assert "torchvision's step is 3.00x the fused model's floor (500 ms, 69.00 GFLOPs a clip)" in text
    assert "ours-fused measured 1.50x" in text


def test_throughput_interleaves_variants_on_cpu(monkeypatch):
    """The timed runs go round the variants, each step inside its own variant's context, after
    every variant's warm-up; a variant that fails becomes an error row and the others go on."""
    import contextlib

    import torch
    import throughput

    events = []

    def ctx_for(label):
        @contextlib.contextmanager
        def ctx():
            events.append(f"enter {label}")
            yield
        return ctx

    def make_step(name, spec, device, batch, mode, dtype_ctx):
        label = spec[0]
        if label == "broken":
            raise RuntimeError("no kernel | here")

        def step():
            events.append(f"step {label}")
            if label == "flaky" and events.count("step flaky") == 3:
                raise RuntimeError("lost the device")
        return None, step

    monkeypatch.setattr(throughput, "make_step", make_step)
    specs = {label: (label, ctx_for(label), None, None) for label in ("a", "broken", "flaky", "b")}
    rows = throughput.measure_interleaved("mvit_tiny", specs, torch.device("cpu"), 2, "infer", 1, 3, None)
    assert [r["variant"] for r in rows] == ["a", "broken", "flaky", "b"]
    assert rows[1]["error"] == "RuntimeError: no kernel / here" and "error" in rows[2]
    assert rows[0]["interleaved"] and rows[0]["clips_per_s"] == 2 / rows[0]["step_s"]
    assert len(rows[0]["times_s"]) == len(rows[3]["times_s"]) == 3  # round order, for the paired ratios
    timed = [e for e in events[6:] if e.startswith("step")]  # after the three warm-ups (enter + step each)
    assert events[:6] == ["enter a", "step a", "enter flaky", "step flaky", "enter b", "step b"]
    assert timed == ["step a", "step flaky", "step b", "step a", "step flaky", "step b", "step a", "step b"]
    assert all(events[i - 1] == "enter " + e.split()[1] for i, e in enumerate(events) if e.startswith("step"))


def test_throughput_paired_ratios(monkeypatch, tmp_path):
    """Interleaved rows get per-round speedups: round i's peer step over ours, median and
    quartiles, over torchvision eager and over the best peer by median; rows timed apart (no
    times_s) get none."""
    import torch
    import throughput

    row = dict(model="mvit_b_16x4", mode="infer", batch=1, min_s=1.0, max_s=3.2, clips_per_s=1.0, peak_gib=None,
               interleaved=True)
    ours = dict(row, variant="ours-fused", step_s=1.5, times_s=[1.0, 2.0, 1.0, 2.0])
    tv = dict(row, variant="torchvision", step_s=2.3, times_s=[1.6, 3.0, 1.4, 3.2])
    compiled = dict(row, variant="torchvision+compile", step_s=2.0, times_s=[1.2, 2.4, 1.5, 2.6, 9.9])
    p = throughput.paired_ratios(ours, tv)
    # ratios 1.6, 1.5, 1.4, 1.6: median 1.55; quartiles at positions 0.75 and 2.25 of the sorted four
    assert p["rounds"] == 4 and p["median"] == pytest.approx(1.55)
    assert p["q1"] == pytest.approx(1.475) and p["q3"] == pytest.approx(1.6)
    assert throughput.paired_ratios(ours, compiled)["rounds"] == 4  # a fifth round without ours is not paired
    assert throughput.paired_ratios(ours, dict(tv, times_s=None)) is None

    monkeypatch.setattr(throughput, "_plot", lambda rows, path: None)
    text = throughput._write([ours, tv, compiled], torch.device("cpu"), "CPU test", str(tmp_path))
    assert "| mvit_b_16x4 | infer | 1 | ours-fused | torchvision | 1.55 | 1.48–1.60 | 4 |" in text
    assert "| mvit_b_16x4 | infer | 1 | ours-fused | torchvision+compile | 1.25 |" in text  # ratios 1.2 1.2 1.5 1.3
    apart = [{k: v for k, v in r.items() if k not in ("times_s", "interleaved")} for r in (ours, tv)]
    assert "Per-round speedups" not in throughput._write(apart, torch.device("cpu"), "CPU test", str(tmp_path))


def test_sdpa_in_reference_swaps_in_one_function():
    # A graph compiled inside the context guards on the function: entering it again (once per
    # interleaved step) must not swap in a new object, or every step would recompile.
    import throughput
    from mvit_kernels import reference

    original = reference.pooling_attention
    seen = []
    for _ in range(2):
        with throughput.sdpa_in_reference():
            seen.append(reference.pooling_attention)
    assert seen[0] is seen[1] is throughput._sdpa_reference_attention
    assert reference.pooling_attention is original


@pytest.mark.parametrize("argv, message", [
    (["--variants", "ours_fused"], "unknown --variants ours_fused"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--batch-sizes", "0"], "--batch-sizes must be >= 1"),
    # mvit_tiny has no torchvision build: an empty table and exit 0 before.
    (["--variants", "torchvision"], "none of the asked variants can run here"),
])
def test_throughput_refuses_what_it_would_not_measure(argv, message, capsys, monkeypatch):
    import throughput

    monkeypatch.setattr(throughput, "cpu_matmul_rate", lambda: {"rates": {}, "flop_per_s": 1e11, "best": ""})
    with pytest.raises(SystemExit) as info:
        throughput.main(["--models", "mvit_tiny", "--modes", "infer", "--out", "unused", *argv])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    if "torchvision" in argv:
        assert "mvit_tiny: not available here: torchvision" in captured.err


def test_profile_attention_without_cuda_says_so(capsys):
    # It died in torch.randn(device="cuda") with "Found no NVIDIA driver".
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the script profiles it")
    import profile_attention

    assert profile_attention.main(["--block", "0"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_pool_ops_files_of_16_bit_runs_keep_their_own_name():
    # The GPU suite's bf16 run and a CPU bf16 run wrote pool_ops_<device>.md, the float32 table's name.
    import bench_pool_ops

    assert bench_pool_ops.output_stem("out", "cpu", "float32") == os.path.join("out", "pool_ops_cpu")
    assert bench_pool_ops.output_stem("out", "cuda", "bfloat16", "_x") == os.path.join("out", "pool_ops_cuda_bfloat16_x")
