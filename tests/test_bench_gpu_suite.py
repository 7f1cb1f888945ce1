"""bench/gpu_suite.py without a GPU: every step's command is one its script accepts and every test
it names exists (a wrong option or a renamed test would cost a lent machine's scarce minutes),
the lease plan fits one device call, the deadline rule, summaries merged across calls, the
targets table, and the ceilings the kernel benchmarks' floors use."""

import importlib
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ceilings  # noqa: E402
import gpu_suite  # noqa: E402


def test_plans_name_known_steps_and_the_lease_fits_one_device_call():
    for steps, _ in gpu_suite.PLANS.values():
        assert steps and set(steps) <= set(gpu_suite.STEPS)
    steps, deadline = gpu_suite.PLANS["lease"]
    # The device tool allows 600 s a command; the deadline leaves room for start-up of Python
    # and the archive. The model-level correctness tests come before any benchmark, the eager
    # throughput (the issues' headline targets) before the long Triton op tests.
    assert deadline <= 570
    assert steps[:5] == ["ceilings", "build", "tests_model", "throughput", "tests_triton"]
    assert set(gpu_suite.PLANS["all"][0]) == set(gpu_suite.STEPS)


@pytest.mark.parametrize("name", [n for n, (cmd, _) in gpu_suite.STEPS.items() if cmd[1].startswith("bench/")])
def test_every_benchmark_step_passes_arguments_its_script_accepts(name, tmp_path):
    argv = gpu_suite.command(name, str(tmp_path))
    assert argv[0] == sys.executable
    script = importlib.import_module(pathlib.Path(argv[1]).stem)
    args = script.build_parser().parse_args(argv[2:])  # argparse exits (SystemExit) on a bad option
    if hasattr(args, "out"):
        assert args.out == str(tmp_path)
    if getattr(args, "ceilings", None) is not None:
        assert args.ceilings == str(tmp_path / "ceilings.json")


def test_throughput_args_default_parses_and_is_eager_only():
    import throughput

    args = throughput.build_parser().parse_args(gpu_suite.command("throughput", "OUT")[2:])
    assert args.variants and not any("+compile" in v for v in args.variants)
    assert {"torchvision", "ours-fused", "ours-fused-timeonly"} <= set(args.variants)
    # The compiled step writes its own files instead of overwriting the eager step's.
    compiled = throughput.build_parser().parse_args(gpu_suite.command("throughput_compiled", "OUT")[2:])
    assert compiled.suffix and all("+compile" in v for v in compiled.variants)


def test_every_test_the_suite_runs_exists():
    ids = [a for name, (cmd, _) in gpu_suite.STEPS.items() if "pytest" in cmd for a in cmd if a.startswith("tests/")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *ids], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = proc.stdout
    for node in ids:
        assert node in collected, f"{node} collected no test"


def test_dry_run_prints_each_step_and_runs_nothing(capsys):
    assert gpu_suite.main(["--dry-run"]) == 0
    text = capsys.readouterr().out
    for name in gpu_suite.PLANS["lease"][0]:
        assert f"  {name} (cap {gpu_suite.STEPS[name][1]} s): " in text
    assert gpu_suite.main(["--dry-run", "--steps", "build", "flops", "--deadline", "100"]) == 0
    text = capsys.readouterr().out
    assert "deadline 100.0 s (steps given)" in text and "  flops" in text and "  ceilings" not in text


def test_step_timeout_is_cut_to_the_deadline():
    cap = gpu_suite.STEPS["build"][1]
    assert gpu_suite.step_timeout("build", None, 10_000) == cap
    assert gpu_suite.step_timeout("build", 1000, 0) == cap
    assert gpu_suite.step_timeout("build", 560, 460) == 80  # 20 s kept for the summary
    assert gpu_suite.step_timeout("build", 560, 511) is None  # under 30 s left: not started


def test_summary_of_a_second_call_keeps_the_first_calls_steps(tmp_path):
    first = [{"step": "build", "rc": 0}, {"step": "tests_model", "rc": 1}]
    gpu_suite._save(str(tmp_path), "GPU", "2026-12-04", first, None, {})
    gpu_suite._save(str(tmp_path), "GPU", "2026-12-04", [{"step": "tests_model", "rc": 0}, {"step": "flops", "rc": 0}],
                    None, {})
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert steps == [{"step": "build", "rc": 0}, {"step": "tests_model", "rc": 0}, {"step": "flops", "rc": 0}]


def _row(variant, mode, ms, peak=None, model="mvit_b_16x4", batch=8):
    return dict(model=model, variant=variant, mode=mode, batch=batch, step_s=ms / 1e3, min_s=ms / 1e3,
                max_s=ms / 1e3, clips_per_s=batch / ms * 1e3, peak_gib=peak)


def test_targets_table_judges_each_target_from_the_results(tmp_path):
    eager = [_row("ours-fused", "train", 60.0, 5.0), _row("torchvision", "train", 100.0, 10.0),
             _row("ours-fused", "infer", 15.0), _row("torchvision", "infer", 26.0),
             _row("torchvision", "train", 1.0, model="mvitv2_s_16x4"),  # another model: ignored
             dict(model="mvit_b_16x4", variant="ours-ref-sdpa", mode="train", batch=8, error="OOM")]
    compiled = [_row("ours-fused+compile", "train", 50.0), _row("torchvision+compile", "train", 80.0),
                _row("torchvision+compile", "infer", 20.0)]
    (tmp_path / "throughput_gpu.json").write_text(json.dumps({"rows": eager}))
    (tmp_path / "throughput_gpu_compiled.json").write_text(json.dumps({"rows": compiled}))
    (tmp_path / "attention_bench_b8.json").write_text(json.dumps({"rows": [
        dict(floor_ms=1.0, triton_graph_ms=1.5), dict(floor_ms=2.0, triton_graph_ms=5.0), dict(floor_ms=1.0)]}))
    lines = gpu_suite.targets_table(str(tmp_path))
    table = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert "| 1.67x | >= 1.5x | yes |" in table["mvit_b_16x4 train b8: ours-fused vs torchvision eager"]
    # Our best (compiled, 50 ms) against the best compiled peer (80 ms).
    assert "| 1.60x | >= 1.15x | yes |" in table["mvit_b_16x4 train b8: our best vs best compiled peer (torchvision+compile)"]
    assert "| 1.73x | >= 2.0x | no |" in table["mvit_b_16x4 infer b8: ours-fused vs torchvision eager"]
    assert "| 1.33x | >= 1.2x | yes |" in table["mvit_b_16x4 infer b8: our best vs best compiled peer (torchvision+compile)"]
    assert "| 0.50x | <= 0.6x | yes |" in table["mvit_b_16x4 train b8: peak memory, ours-fused / torchvision eager"]
    assert "| 2.50x | <= 2.0x | no |" in table["Triton attention b8, worst block: graph-replay time / floor"]
    assert "| not measured |" in table["Triton attention + rel-pos b8, worst block: graph-replay time / floor"]


def test_targets_table_without_results_says_not_measured(tmp_path):
    lines = gpu_suite.targets_table(str(tmp_path))
    assert len(lines) == 2 + 4 + 1 + 2 and all("not measured" in line for line in lines[2:])


def test_cross_check_lines_summarize_the_tunings_checks(tmp_path):
    assert gpu_suite.cross_check_lines(str(tmp_path)) == ["Tuning cross-check: nothing checked (no tuning in these results)."]
    tuning_rows = [
        dict(op="pool3d (8, 2, 25089, 96) bfloat16 fwd+bwd", checked={"fused": [4e-3, 1.2e-2], "reference-ncdhw": [0, 0]},
             note=""),
        dict(op="pooling_attention (8, 1, 25089, 96) bfloat16 fwd+bwd", checked={"triton": [3e-1, 2e-2]},
             note="triton disagrees with sdpa (error 0.3 forward, 0.02 gradients; tolerance 0.06, 0.1): not used"),
        dict(op="pool3d (8, 2, 25089, 96) bfloat16 fwd", ms={"fused": 1.0}),  # not checked: nothing to report
    ]
    (tmp_path / "throughput_gpu.json").write_text(json.dumps({"rows": [], "tuning": tuning_rows}))
    (line,) = gpu_suite.cross_check_lines(str(tmp_path))
    assert "3 candidate/shape pairs checked" in line
    assert "worst forward error 3.0e-01 (triton at pooling_attention" in line
    assert "worst gradient error 2.0e-02 (triton at pooling_attention" in line
    assert line.endswith("disagreements: triton at pooling_attention (8, 1, 25089, 96) bfloat16 fwd+bwd.")


def test_ceilings_floor_and_loading(tmp_path, capsys):
    h100 = ceilings.H100
    assert h100.floor_s(3.0e12, 0) == pytest.approx(1.0) and h100.floor_s(0, 790e12) == pytest.approx(1.0)
    assert h100.floor_s(3.0e9, 790e12) == pytest.approx(1.0)  # the larger term decides
    assert ceilings.load(None) is h100
    assert ceilings.load(str(tmp_path / "missing.json")) is h100
    assert "not found" in capsys.readouterr().err
    found = ceilings.Ceilings("NVIDIA H200", 4.3e12, 790e12)
    path = tmp_path / "ceilings.json"
    path.write_text(json.dumps(dict(device=found.device, bandwidth=found.bandwidth, peak_flops=found.peak_flops)))
    assert ceilings.load(str(path)) == found


def test_measured_floors_follow_the_given_ceilings():
    import bench_attention

    shape = bench_attention.block_shapes("mvit_b_16x4", 8)[15]
    h100 = bench_attention.fused_model(shape, rel=True, train=True)
    h200 = ceilings.Ceilings("H200", 4.3e12, 790e12)
    found = bench_attention.fused_model(shape, rel=True, train=True, ceil=h200)
    assert found["fwd_bytes"] == h100["fwd_bytes"] and found["fwd_exec_flops"] == h100["fwd_exec_flops"]
    for ceil, floors in ((ceilings.H100, h100), (h200, found)):
        assert floors["fwd_floor_s"] == max(floors["fwd_bytes"] / ceil.bandwidth, floors["fwd_exec_flops"] / ceil.peak_flops)
    assert found["fwd_floor_s"] < h100["fwd_floor_s"] and found["bwd_floor_s"] < h100["bwd_floor_s"]



def test_attention_table_shows_both_passes_with_achieved_rates():
    import bench_attention

    row = dict(block=0, heads=1, n_q=25089, n_kv=393, fwd_floor_ms=0.1, floor_ms=0.3, fwd_bytes=2e8, fwd_flops=1e11,
               bytes=6e8, flops=3e11, fwd_triton_ms=0.5, fwd_triton_graph_ms=0.4, triton_ms=1.2, triton_graph_ms=1.0,
               fwd_reference_ms=1.0, reference_ms=3.0, fwd_sdpa_ms=0.2, sdpa_ms=None, fwd_flex_ms=0.8, flex_ms=2.4)
    fwd, both = bench_attention.measured_table([row]).splitlines()[2:]
    # forward: graph 0.4 ms over a 0.1 ms floor; 1e11 FLOP and 2e8 B in 0.4 ms
    assert fwd.startswith("| 0 | 1 | 25089 | 393 | fwd | 0.100 | 0.500 | 0.400 | 4.0x | 250.0 | 500.0 | 1.000 | 0.200 | 0.800 |")
    assert fwd.endswith("| 2.00x | 0.40x | 1.60x |")
    assert both.startswith("| 0 | 1 | 25089 | 393 | fwd+bwd | 0.300 | 1.200 | 1.000 | 3.3x | 300.0 | 600.0 | 3.000 | fail | 2.400 |")
    assert both.endswith("| 2.50x | n/a | 2.00x |")
    # Without a graph replay the eager time gives the rates.
    del row["fwd_triton_graph_ms"]
    assert "| fwd | 0.100 | 0.500 | fail | nanx | 200.0 | 400.0 |" in bench_attention.measured_table([row])


def test_a_run_logs_each_step_saves_after_each_and_ends_with_the_targets(tmp_path, monkeypatch, capsys):
    import tarfile

    import torch

    py = [sys.executable, "-c"]
    monkeypatch.setattr(gpu_suite, "STEPS", {
        "ok": ([*py, "print('first line'); print('last line of ok')"], 60),
        "fails": ([*py, "import sys; print('it broke'); sys.exit(3)"], 60),
        "hangs": ([*py, "import time; time.sleep(30)"], 1),
        "late": ([*py, "print('never')"], 60),
    })
    monkeypatch.setattr(gpu_suite, "PLANS", {"lease": (["ok", "fails", "hangs", "late"], None)})
    monkeypatch.setattr(gpu_suite, "_device_name", lambda: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    real_timeout = gpu_suite.step_timeout  # tested above; here the deadline is spent before "late"
    monkeypatch.setattr(gpu_suite, "step_timeout", lambda name, *a: None if name == "late" else real_timeout(name, *a))
    out, archive = tmp_path / "results", tmp_path / "results.tgz"
    assert gpu_suite.main(["--out", str(out), "--archive", str(archive), "--deadline", "500"]) == 1
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert [(s["step"], s["rc"]) for s in steps] == [("ok", 0), ("fails", 3), ("hangs", "timeout"), ("late", "no time")]
    assert steps[0]["last_line"] == "last line of ok" and (out / "fails.log").read_text() == "it broke\n"
    with tarfile.open(archive) as tar:
        assert "results/summary.json" in tar.getnames() and "results/ok.log" in tar.getnames()
    text = capsys.readouterr().out
    assert "gpu_suite: fails: rc=3" in text and "it broke" in text  # a failing step's log tail is shown
    summary = text.rindex("| step | exit | seconds | last line |")
    assert text.index("| ok | 0 |", summary) < text.index("| target | measured | goal | met |", summary)
    last = text.rstrip().splitlines()
    assert last[-3] == (  # the targets come last, then the tuning's cross-check
        "| Triton attention + rel-pos b8, worst block: graph-replay time / floor | not measured | <= 2.0x | — |")
    assert last[-2:] == ["", "Tuning cross-check: nothing checked (no tuning in these results)."]
