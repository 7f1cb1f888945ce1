"""Every Triton kernel config the dispatchers can pick (pooling attention, pooled projection)
compiles for each tile rule's target (sm_80, sm_86, sm_90) without a GPU, without spills and
within the rule's shared memory. Writes the resource table that
bench/bench_attention.py reads (bench/results/triton_resources.{md,json})."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    pytest.importorskip("triton")
    RESULTS.mkdir(parents=True, exist_ok=True)
    # The interpreter (set for the other tests by conftest.py) cannot compile: use a subprocess.
    # It writes to a fresh folder: a kernel that fails to compile ends it with an exception (exit
    # status 1, as for configs over their limits) and no table, and the tests read the committed
    # table in bench/results instead, where they passed whatever the kernels had become.
    out = tmp_path_factory.mktemp("aot")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "mvit_kernels.triton.aot",
         "--json", str(out / "triton_resources.json"), "--markdown", str(out / "triton_resources.md")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode in (0, 1) and (out / "triton_resources.json").exists(), proc.stderr[-4000:]
    for name in ("triton_resources.json", "triton_resources.md"):
        shutil.copyfile(out / name, RESULTS / name)
    return json.loads((out / "triton_resources.json").read_text())


def test_every_dispatchable_config_was_compiled(rows):
    from mvit_kernels.triton import aot

    compiled = {(r["kernel"], r["dtype"], r["precision"], r["partials"], r.get("mode"), r["d_pad"], r["target"],
                 r.get("head_dim")) for r in rows}
    wanted = {(e["kernel"], e["dtype"], e["precision"], e["partials"], e.get("mode"), e["d_pad"], f"sm_{e['cc']}",
               e.get("head_dim")) for e in aot.all_configs()}
    assert wanted == compiled
    # MViTv2-L's head 72 (no multiple of 16, compiled in as a constant): every kernel, dtype and target again
    unaligned = {(k, d, t) for k, d, *_, t, h in compiled if h == 72}
    assert {k for k, _, _ in unaligned} == {"fwd", "bwd_delta", "bwd_dkdv", "bwd_dq", "proj", "proj_bwd"}
    assert {t for *_, t in unaligned} == {"sm_80", "sm_86", "sm_90"} and len({d for _, d, _ in unaligned}) == 3
    assert {r["target"] for r in rows} == {"sm_80", "sm_86", "sm_90"}
    # The pooled projection: every dtype, padded head dim and pooling mode (a constexpr).
    proj = {(r["dtype"], r["precision"], r["d_pad"], r["mode"]) for r in rows if r["kernel"] == "proj"}
    assert {m for *_, m in proj} == {"conv", "avg", "max"}
    assert {d for _, _, d, _ in proj} == {16, 32, 64, 128}
    assert ("float32", "ieee", 128, "conv") in proj and ("bfloat16", "tf32", 128, "max") in proj
    # Its backward kernel: every mode, same coverage.
    bwd = {(r["dtype"], r["precision"], r["d_pad"], r["mode"]) for r in rows if r["kernel"] == "proj_bwd"}
    assert bwd == proj


def test_no_spills_and_shared_memory_within_limits(rows):
    from mvit_kernels.triton import aot

    problems = [f"{r['kernel']} {r['dtype']} d_pad={r['d_pad']} {r['target']}: {p}" for r in rows for p in aot.check(r)]
    assert not problems, "\n".join(problems)


def test_config_rule_matches_compiled_tiles(rows):
    import torch

    from mvit_kernels.triton import pooled_projection as projection
    from mvit_kernels.triton import pooling_attention as kernels

    for r in rows:
        dtype, cc = getattr(torch, r["dtype"]), int(r["target"][3:])
        if r["kernel"] in ("proj", "proj_bwd"):
            if r["kernel"] == "proj":
                cfg = projection.select_config(dtype, r["d_pad"], cc, r["precision"])
            else:
                cfg = projection.select_bwd_config(dtype, r["d_pad"], cc, r["precision"], r["mode"],
                                                   aligned=not r.get("head_dim"))
            assert (cfg.block_m, cfg.block_k, cfg.num_warps, cfg.num_stages) == (
                r["block_m"], r["block_k"], r["num_warps"], r["num_stages"]
            )
            continue
        cfg = kernels.select_config(r["kernel"], dtype, r["d_pad"], cc, r["precision"], aligned=not r.get("head_dim"))
        assert (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages) == (
            r["block_m"], r["block_n"], r["num_warps"], r["num_stages"]
        )


def test_bench_attention_model_runs_on_cpu(tmp_path):
    # The byte/FLOP model and the CPU branch of the benchmark (CUDA timing is skipped here).
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_attention.py"), "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    payload = json.loads((tmp_path / "attention_model.json").read_text())
    plain = payload["plain"]
    assert [r["shape"]["n_q"] for r in plain][:4] == [25089, 6273, 6273, 1569]
    assert plain[0]["shape"]["n_kv"] == 393 and plain[1]["shape"]["n_kv"] == 1569
    for row in plain + payload["with_rel_pos"]:
        assert row["fused"]["fwd_bytes"] < row["reference"]["fwd_bytes"]
        assert row["fused"]["fwd_flops"] == row["reference"]["fwd_flops"]
    # The AOT table is read from bench/results whatever --out says (it was looked for under --out).
    assert "no " + str(tmp_path) not in proc.stdout
    assert ("REG" in proc.stdout) == (ROOT / "bench" / "results" / "triton_resources.md").exists()


def test_bench_attention_model_of_another_batch_and_a_model_without_class_token(tmp_path):
    # The GPU suite models batch 8, then batch 1, into one folder: the second overwrote the first.
    # Block shapes assumed a class token: mvitv2_t_image's block 0 had 3137 queries, not 3136;
    # the totals row said "all 16" for its 10 blocks.
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_attention

    assert bench_attention.main(["--batch", "8", "--preset", "mvitv2_t_image", "--out", str(tmp_path)]) == 0
    assert bench_attention.main(["--batch", "1", "--preset", "mvitv2_t_image", "--out", str(tmp_path)]) == 0
    for name, batch in (("attention_model_b8", 8), ("attention_model", 1)):
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["batch"] == batch
        first = payload["plain"][0]["shape"]
        assert (first["n_q"], first["has_cls"]) == (56 * 56, False)
        assert "| all 10 |" in (tmp_path / f"{name}.md").read_text()



def test_bench_attention_cpu_measures_every_path_once_per_distinct_shape():
    # --cpu: the fused path, SDPA with the reference's mask, the reference and bias-free SDPA at
    # each distinct block shape (blocks sharing one are listed together), on tiny shapes here.
    import math

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_attention

    base = dict(batch=1, d=8, has_cls=True, rel_pos=True, rel_t=True, residual=True)
    shapes = [dict(base, block=0, heads=1, thw_q=(2, 4, 4), thw_kv=(2, 2, 2)),
              dict(base, block=1, heads=2, thw_q=(2, 2, 2), thw_kv=(2, 2, 2)),
              dict(base, block=2, heads=2, thw_q=(2, 2, 2), thw_kv=(2, 2, 2))]
    for shape in shapes:
        shape.update(n_q=1 + math.prod(shape["thw_q"]), n_kv=1 + math.prod(shape["thw_kv"]))
    threads = torch.get_num_threads()
    try:
        table, rows = bench_attention.bench_cpu(shapes, repeats=2, threads=1)
        no_cls = [dict(s, has_cls=False, n_q=s["n_q"] - 1, n_kv=s["n_kv"] - 1) for s in shapes[:1]]
        assert bench_attention.bench_cpu(no_cls, repeats=1, threads=1)[1][0]["fused_rel_err"] < 1e-5
    finally:
        torch.set_num_threads(threads)
    assert [r["blocks"] for r in rows] == [[0], [1, 2]]
    for r in rows:
        assert r["fused_rel_err"] < 1e-5
        for name in bench_attention.CPU_PATHS:
            low, high = r[name + "_spread_ms"]
            assert r[name + "_ms"] > 0 and r[name + "_ms"] == pytest.approx((low + high) / 2)  # median of 2
    last = table.splitlines()[-1]
    total = rows[0]["fused_ms"] + 2 * rows[1]["fused_ms"]
    assert last.startswith(f"| all (per clip) | | | | {total:.0f} |"), last