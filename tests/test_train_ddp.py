"""Two-process torchrun (gloo) runs: a few training steps on the synthetic task, and a rank that
fails makes the job exit non-zero with that rank's error instead of hanging."""

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchrun(args, tmp_path, timeout=240, **env_vars):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **env_vars)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path), env=env)


def _train_losses(folder):
    records = [json.loads(l) for l in (folder / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_two_process_training_and_eval(tmp_path):
    from mvit.cli import main

    out = tmp_path / "run"
    # without stochastic depth (drawn per rank) the two runs compute the same steps
    args = ["train", "--synthetic-size", "96", "30", "--batch-size", "16", "--accum-steps", "2", "--epochs", "1",
            "--max-steps", "3", "--drop-path", "0", "--threads", "1", "--no-progress"]
    proc = _torchrun(["-m", "mvit"] + args + ["--output-dir", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    config = next(r for r in records if r["kind"] == "config")
    assert config["world_size"] == 2 and config["micro_batch"] == 4
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    result = json.loads((out / "result.json").read_text())
    # 30 validation clips over 2 ranks: each counted exactly once, no padding duplicates
    assert result["val"]["videos"] == 30 and result["val_shuffled_frames"]["videos"] == 30

    # a step of 2 ranks takes the clips one process takes, and the logged loss is the whole
    # batch's (it was rank 0's, half of it)
    single = tmp_path / "single"
    assert main(args + ["--output-dir", str(single)]) == 0
    two, one = _train_losses(out), _train_losses(single)
    for step in (1, 2, 3):
        assert abs(two[step] - one[step]) < 1e-4, (step, two, one)
    assert json.loads((single / "result.json").read_text())["val"] == result["val"]

    # multi-view evaluation of that checkpoint under DDP
    report = tmp_path / "eval.json"
    proc = _torchrun(["-m", "mvit", "eval", str(out), "--report", str(report)], tmp_path)  # a run folder
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads(report.read_text())
    assert ev["videos"] == 30 and ev["top1"] == result["val"]["top1"]


def test_failing_rank_fails_the_job(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import os, torch.distributed as dist
        from mvit.training import distributed as d
        def work():
            info = d.init("cpu", timeout_s=60)
            if info.rank == 1:
                raise RuntimeError("injected failure")
            dist.barrier()  # rank 0 would wait here forever without the guard
            return 0
        d.run_guarded(work)
    """))
    proc = _torchrun([str(script)], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "[rank 1] failed: RuntimeError: injected failure" in proc.stderr


def test_ddp_trains_a_fused_model_whose_last_block_skips_the_rel_pos_tables(tmp_path):
    # The fused model's last block computes the class token alone, whose row reads no rel-pos
    # table; DistributedDataParallel (find_unused_parameters=False, the trainer's) failed on the
    # second step while those tables got no gradient.
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from mvit import build_model
        dist.init_process_group("gloo")
        torch.manual_seed(0)
        model = build_model("mvit_tiny", fused=True, abs_pos="none", rel_pos_spatial=True,
                            rel_pos_temporal=True, residual_pooling=True, dim_mul_in_att=True)
        net = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        for step in range(3):
            net(torch.randn(2, 3, 8, 32, 32)).square().sum().backward()
            opt.step()
            if step < 2:
                opt.zero_grad()
        last = model.blocks[-1].attn
        assert all(t.grad is not None and not t.grad.any() for t in (last.rel_pos_t, last.rel_pos_h, last.rel_pos_w))
        assert all(p.grad is not None for p in model.parameters())
        print("rank", dist.get_rank(), "trained")
        dist.destroy_process_group()
    """))
    proc = _torchrun([str(script)], tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained") == 2
