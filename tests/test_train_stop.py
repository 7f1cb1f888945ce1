"""Stop signals (SIGTERM, SIGUSR1): training ends after the step in progress with a checkpoint,
exits 128 + the signal, and ``--resume auto`` continues it as if it had not stopped."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import mvit.train
from mvit.cli import main
from mvit.training import checkpoint as ckpt
from mvit.training import signals

from test_train_ddp import REPO, _torchrun, _train_losses
from test_train_resume import COMMON, _losses


def _signal_at(monkeypatch, step: int, sig=signal.SIGTERM, rank: int = 0):
    """Send ``sig`` to this process as step ``step`` + 1 starts (its seed is drawn)."""
    draw = mvit.train._step_seed

    def step_seed(seed, r, s):
        if r == rank and s == step:
            os.kill(os.getpid(), sig)
        return draw(seed, r, s)

    monkeypatch.setattr(mvit.train, "_step_seed", step_seed)


def _records(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_the_step_and_resume_continues_the_run(tmp_path, monkeypatch, capsys, sig):
    full = str(tmp_path / "full")
    assert main(COMMON + ["--output-dir", full]) == 0
    reference = _losses(full)

    handlers = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    stopped = str(tmp_path / "stopped")
    _signal_at(monkeypatch, 3, sig)  # during step 4 of 8 in epoch 0
    assert main(COMMON + ["--output-dir", stopped]) == 128 + sig
    monkeypatch.undo()
    assert {s: signal.getsignal(s) for s in signals.STOP_SIGNALS} == handlers  # put back
    err = capsys.readouterr().err
    assert f"stopped by a signal ({signal.Signals(sig).name}) after step 4" in err and "--resume auto" in err
    [saved] = ckpt.list_checkpoints(stopped)
    assert saved.endswith(ckpt.checkpoint_name(0, 4))
    state = ckpt.load(saved)
    assert (state["step"], state["epoch"], state["sampler"]["position"]) == (4, 0, 32)
    assert not os.path.exists(os.path.join(stopped, "result.json"))  # the run is not over
    records = _records(stopped)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert records[-1]["kind"] == "stop" and records[-1]["signal"] == signal.Signals(sig).name

    assert main(COMMON + ["--output-dir", stopped, "--resume", "auto"]) == 0
    again = _losses(stopped)
    assert sorted(again) == list(range(1, 13))
    for step, loss in again.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step
    with open(os.path.join(full, "result.json")) as f, open(os.path.join(stopped, "result.json")) as g:
        assert json.load(f)["val"] == json.load(g)["val"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The log records of COMMON's run, not stopped."""
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    assert main(COMMON + ["--output-dir", out]) == 0
    return _records(out)


def _scores(records):
    """(step, scores) of every epoch-end evaluation in a log."""
    return [(r["step"], {k: v for k, v in r.items() if k != "time"}) for r in records if r["kind"] == "val"]


def _resume_has_every_evaluation(out, uninterrupted, capsys):
    # the evaluation the stop cut short is made on resume, before training goes on, and gives
    # the uninterrupted run's scores: each epoch keeps its scores, once
    capsys.readouterr()
    assert main(COMMON + ["--output-dir", out, "--resume", "auto"]) == 0
    records = _records(out)
    assert _scores(records) == _scores(uninterrupted) and [s for s, _ in _scores(records)] == [8, 12]
    first_val = next(i for i, r in enumerate(records) if r["kind"] == "val")
    assert all(r["step"] <= 8 for r in records[:first_val] if r["kind"] == "train")
    assert "epoch 1: " in capsys.readouterr().err


def test_a_signal_during_the_epochs_checkpoint_skips_its_evaluation(tmp_path, monkeypatch, capsys, uninterrupted):
    # The epoch's checkpoint is written before its evaluation (minutes on Kinetics), so a signal
    # that comes while it is written stops the run there, and one during the evaluation loses
    # only the evaluation (made again on resume).
    out = str(tmp_path / "run")
    save = ckpt.atomic_save

    def save_then_signal(obj, path):
        save(obj, path)
        if obj["step"] == 8:  # the end of epoch 0
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ckpt, "atomic_save", save_then_signal)
    assert main(COMMON + ["--output-dir", out]) == 128 + signal.SIGTERM
    records = _records(out)
    assert not [r for r in records if r["kind"] == "val"]
    assert records[-1]["kind"] == "stop" and records[-1]["step"] == 8
    [saved] = ckpt.list_checkpoints(out)
    state = ckpt.load(saved)
    assert (state["step"], state["epoch"], state["sampler"]["position"]) == (8, 1, 0)
    assert "after step 8" in capsys.readouterr().err
    monkeypatch.undo()
    _resume_has_every_evaluation(out, uninterrupted, capsys)


def test_an_epoch_evaluated_before_the_stop_is_not_evaluated_again(tmp_path, uninterrupted):
    out = str(tmp_path / "run")
    assert main(COMMON + ["--output-dir", out, "--keep-ckpts", "0"]) == 0
    os.unlink(os.path.join(out, ckpt.checkpoint_name(1, 12)))  # as if killed before it was written
    assert main(COMMON + ["--output-dir", out, "--resume", "auto"]) == 0
    assert _scores(_records(out)) == _scores(uninterrupted)


def test_a_signal_during_an_evaluation_ends_it_without_scores_and_stops_the_run(tmp_path, monkeypatch, capsys,
                                                                                 uninterrupted):
    # An evaluation takes minutes on Kinetics: let run to its end, its workers' grace ran out and
    # the run died with a traceback. The epoch's checkpoint is already written.
    import mvit.evaluate

    out = str(tmp_path / "run")
    batches = []
    score_videos = mvit.evaluate.score_videos

    def score_with_a_signal(*args, stop=None, **kwargs):
        def signalled_then_asked():
            if not batches:
                os.kill(os.getpid(), signal.SIGTERM)
            batches.append(stop())
            return batches[-1]
        return score_videos(*args, stop=signalled_then_asked, **kwargs)

    monkeypatch.setattr(mvit.evaluate, "score_videos", score_with_a_signal)
    assert main(COMMON + ["--output-dir", out, "--keep-ckpts", "0"]) == 128 + signal.SIGTERM
    assert batches == [True]  # stopped before its first batch
    records = _records(out)
    assert [(r["kind"], r["step"]) for r in records if r["kind"] in ("val", "stop")] == [("stop", 8)]
    assert [ckpt.load(p)["step"] for p in ckpt.list_checkpoints(out)] == [8]
    assert "after step 8" in capsys.readouterr().err
    monkeypatch.undo()
    _resume_has_every_evaluation(out, uninterrupted, capsys)


def test_a_signal_in_the_last_evaluations_stops_the_run_and_resume_evaluates(tmp_path, monkeypatch):
    # After the training loop: the synthetic task's shuffled-frames evaluation (and a finished
    # run's "nothing left to train" one). The handlers were put back before them, so a signal
    # killed the run there, with no stop record.
    import mvit.evaluate

    out = str(tmp_path / "run")
    evaluate = mvit.evaluate.evaluate

    def signal_in_the_shuffled_one(*args, **kwargs):
        if kwargs.get("shuffle_frames"):
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(mvit.evaluate, "evaluate", signal_in_the_shuffled_one)
    argv = COMMON + ["--output-dir", out, "--max-steps", "8"]
    assert main(argv) == 128 + signal.SIGTERM
    assert not os.path.exists(os.path.join(out, "result.json"))
    assert _records(out)[-1]["kind"] == "stop"
    monkeypatch.undo()
    assert main(argv + ["--resume", "auto"]) == 0  # nothing left to train: it evaluates
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    assert result["steps"] == 8 and result["val"]["videos"] == 16 and result["val_shuffled_frames"]["videos"] == 16


def test_a_stop_at_a_periodic_checkpoint_writes_it_once(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    written = []
    save = ckpt.atomic_save
    monkeypatch.setattr(ckpt, "atomic_save", lambda obj, path: (written.append(obj["step"]), save(obj, path)))
    _signal_at(monkeypatch, 5)
    assert main(COMMON + ["--output-dir", out, "--ckpt-every", "3"]) == 128 + signal.SIGTERM
    assert written == [3, 6]


def _signal_after_a_step(cmd, out, tmp_path, send):
    """Start ``cmd`` in a session of its own, wait until it logs a training step into ``out``,
    ``send(proc)`` the signal and wait for it to end; (proc, its stderr)."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not (out / "log.jsonl").exists() or '"kind": "train"' not in (out / "log.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        send(proc)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, err


def test_the_signal_to_the_whole_process_group_leaves_the_workers_serving(tmp_path):
    # SLURM signals every process of the job, DataLoader workers included: killed at once, they
    # made the main process fail at its next batch, before it could save.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mvit", "train", "--synthetic-size", "256", "16", "--batch-size", "8",
           "--epochs", "50", "--workers", "2", "--threads", "1", "--no-progress", "--output-dir", str(out)]
    proc, err = _signal_after_a_step(cmd, out, tmp_path, lambda p: os.killpg(p.pid, signal.SIGTERM))
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "stopped by a signal (SIGTERM)" in err, err[-3000:]
    logged = max(r["step"] for r in _records(out) if r["kind"] == "train")
    [saved] = ckpt.list_checkpoints(str(out))
    assert ckpt.load(saved)["step"] == logged
    deadline = time.time() + 30  # and no worker is left behind
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.time() < deadline, "processes of the run are still alive"
        time.sleep(0.1)


def test_the_dataloader_worker_grace_ends_with_sigalrm(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import os, signal, time
        from mvit.training import signals
        signals.WORKER_GRACE_S = 1
        signals.dataloader_worker_init(0)
        os.kill(os.getpid(), signal.SIGTERM)
        print("still serving", flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal does not restart the countdown
        time.sleep(0.6)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("not reached", flush=True)
    """))
    start = time.time()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == -signal.SIGALRM
    assert proc.stdout == "still serving\n"
    assert time.time() - start < 4.5


def _job(when: str, then: str) -> str:
    """A torchrun job script: ``mvit`` with its argv, which runs ``then`` as a step starts where
    ``when`` holds (``rank``; ``step``: the steps done)."""
    return textwrap.dedent(f"""
        import os, signal, sys
        import mvit.train
        from mvit.cli import main
        draw = mvit.train._step_seed
        def step_seed(seed, rank, step):
            if {when}:
                {then}
            return draw(seed, rank, step)
        mvit.train._step_seed = step_seed
        code = main(sys.argv[1:])
        # before the interpreter's teardown, in which torchrun's SIGTERM may already end it
        print(f"rank {{os.environ['RANK']}} exits with {{code}}", file=sys.stderr, flush=True)
        sys.exit(code)
    """)


# rank 1 alone, during step 6 of 6 in epoch 0
JOB = _job("rank == 1 and step == 5", "os.kill(os.getpid(), signal.SIGUSR1)")

DDP_ARGS = ["train", "--synthetic-size", "96", "16", "--batch-size", "16", "--epochs", "2", "--drop-path", "0",
            "--threads", "1", "--no-progress"]


def test_ranks_signalled_apart_stop_after_the_same_step(tmp_path):
    # Rank 0 never gets the signal; without agreeing, it went on into the next collective, which
    # rank 1 never joined.
    script = tmp_path / "job.py"
    script.write_text(JOB)
    out = tmp_path / "run"
    proc = _torchrun([str(script)] + DDP_ARGS + ["--output-dir", str(out)], tmp_path)
    assert proc.returncode != 0  # torchrun reports the ranks' exit codes as failures
    # both ranks exit with rank 1's signal's code (rank 0's was SIGTERM's, a signal it never got)
    codes = sorted(re.findall(r"rank (\d) exits with (\d+)", proc.stderr))
    assert codes == [("0", str(128 + signal.SIGUSR1)), ("1", str(128 + signal.SIGUSR1))], proc.stderr[-3000:]
    assert "stopped by a signal on another rank after step 6" in proc.stderr, proc.stderr[-3000:]
    assert sorted(_train_losses(out)) == [1, 2, 3, 4, 5, 6]
    [saved] = ckpt.list_checkpoints(str(out))
    state = ckpt.load(saved)
    assert (state["step"], state["epoch"], state["world_size"], len(state["rng"])) == (6, 1, 2, 2)
    assert not [r for r in _records(out) if r["kind"] == "val"]  # stopped before the epoch's evaluation

    # the stopped run continues under torchrun from that checkpoint, with the evaluation it missed
    proc = _torchrun(["-m", "mvit"] + DDP_ARGS + ["--output-dir", str(out), "--resume", "auto"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(_train_losses(out)) == list(range(1, 13))
    evaluations = [(r["epoch"], r["step"], r["videos"]) for r in _records(out) if r["kind"] == "val"]
    assert evaluations == [(1, 6, 16), (2, 12, 16)]


def test_torchrun_forwards_sigterm_and_every_rank_saves_before_it_exits(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", "-m", "mvit"] + DDP_ARGS + [
           "--epochs", "50", "--output-dir", str(out)]
    # to torchrun alone, as Kubernetes does
    _, err = _signal_after_a_step(cmd, out, tmp_path, lambda p: p.send_signal(signal.SIGTERM))
    assert "stopped by a signal (SIGTERM)" in err, err[-3000:]
    records = _records(out)
    assert records[-1]["kind"] == "stop"
    [saved] = ckpt.list_checkpoints(str(out))
    assert ckpt.load(saved)["step"] == records[-1]["step"] == max(r["step"] for r in records if r["kind"] == "train")


ELASTIC_JOB = _job('os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and rank == 1 and step == 5',
                   'raise RuntimeError("injected failure in step 6")')


def test_torchrun_restarts_a_failed_run_and_resume_auto_continues_it(tmp_path):
    # The README's recipe for failures and requeued jobs: --resume auto from the first launch,
    # so the same command starts the run and continues it.
    reference = tmp_path / "reference"
    proc = _torchrun(["-m", "mvit"] + DDP_ARGS + ["--max-steps", "8", "--output-dir", str(reference)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    script = tmp_path / "job.py"
    script.write_text(ELASTIC_JOB)
    out = tmp_path / "run"
    # The store not shared, as the README says: shared, 3 of 6 restarts read the failed attempt's
    # addresses (pytorch/pytorch#135712)
    # DataLoader workers too: forked, they kept the dead rank's lock on the folder, and the restart
    # was refused
    proc = _torchrun(["--max-restarts=1", str(script)] + DDP_ARGS + [
        "--max-steps", "8", "--ckpt-every", "4", "--workers", "2", "--output-dir", str(out), "--resume", "auto"],
        tmp_path, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected failure in step 6" in proc.stderr  # the first attempt failed
    assert "pytorch/pytorch#135712" not in proc.stderr  # no warning: the store is not shared
    assert f"--resume auto: no checkpoint in {out}, starting fresh" in proc.stderr
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # 5 was logged by the failed attempt, then dropped
    want = _train_losses(reference)
    for step, loss in _train_losses(out).items():  # the restart replays the uninterrupted run
        assert loss == pytest.approx(want[step], abs=1e-6), step


def test_a_restartable_run_with_the_shared_store_is_warned(monkeypatch):
    from mvit.training import distributed

    for name in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_MAX_RESTARTS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.restart_hazard() == ""  # not under torchrun
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert distributed.restart_hazard() == ""  # never restarted
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in distributed.restart_hazard()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what torchrun sets with the variable
    assert distributed.restart_hazard() == ""


def test_every_rank_says_why_when_the_folder_is_held(tmp_path):
    # Rank 0 alone checked the lock: its error left rank 1 to fail in its next collective with a
    # gloo traceback.
    out = tmp_path / "run"
    with ckpt.hold_output_dir(str(out)):
        proc = _torchrun(["-m", "mvit"] + DDP_ARGS + ["--output-dir", str(out)], tmp_path)
    assert proc.returncode != 0
    assert f"[rank 0] failed: ValueError: --output-dir {out}: another run is training in it" in proc.stderr
    assert f"[rank 1] failed: ValueError: --output-dir {out}: rank 0 could not hold it" in proc.stderr
    assert "gloo" not in proc.stderr and "pair.cc" not in proc.stderr, proc.stderr[-3000:]  # torchrun's own remains
