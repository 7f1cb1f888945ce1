"""Checkpoints are written atomically; --resume auto skips a corrupt one."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from mvit.training import checkpoint as ckpt


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((4,), v)}, "step": int(v)}


def test_failed_write_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / ckpt.checkpoint_name(0, 1))
    ckpt.atomic_save(_state(1.0), path)

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.atomic_save(_state(2.0), path)
    monkeypatch.undo()
    assert ckpt.load(path)["step"] == 1
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # the temp file was removed


def test_kill_during_save_leaves_previous_loadable(tmp_path):
    """A process killed (SIGKILL) in the middle of writing leaves the old checkpoint intact."""
    ckpt.atomic_save(_state(1.0), str(tmp_path / ckpt.checkpoint_name(0, 1)))
    script = textwrap.dedent(f"""
        import sys, time, torch
        from mvit.training import checkpoint as ckpt
        real = torch.save
        def slow_save(obj, f):
            f.write(b"x" * 1000); f.flush()
            print("writing", flush=True)
            time.sleep(60)
        torch.save = slow_save
        ckpt.atomic_save({{"model": {{}}, "step": 2}}, {str(tmp_path / ckpt.checkpoint_name(0, 2))!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == [ckpt.checkpoint_name(0, 1)]
    path, state = ckpt.latest_valid(str(tmp_path))
    assert state["step"] == 1


def test_latest_valid_skips_corrupt(tmp_path):
    ckpt.atomic_save(_state(1.0), str(tmp_path / ckpt.checkpoint_name(0, 10)))
    (tmp_path / ckpt.checkpoint_name(1, 20)).write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        path, state = ckpt.latest_valid(str(tmp_path))
    assert state["step"] == 1 and path.endswith(ckpt.checkpoint_name(0, 10))


def test_prune_keeps_newest(tmp_path):
    for s in (1, 2, 3, 4):
        ckpt.atomic_save(_state(float(s)), str(tmp_path / ckpt.checkpoint_name(0, s)))
    ckpt.prune(str(tmp_path), 2)
    assert [ckpt.load(p)["step"] for p in ckpt.list_checkpoints(str(tmp_path))] == [4, 3]


class _Touch:
    """Pickles as a call that creates a file: what loading a hostile checkpoint could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_a_file_that_pickles_a_call_is_refused_unrun(tmp_path, capsys):
    # torch.load(weights_only=False) ran whatever a downloaded .pyth pickled, for --finetune,
    # mvit eval and from_pretrained alike.
    from mvit.cli import main
    from mvit.convert import from_pretrained

    marker = tmp_path / "ran"
    hostile = str(tmp_path / "MVIT_B_16x4.pyth")
    torch.save({"model_state": {"blocks.0.norm1.weight": torch.ones(3)}, "cfg": _Touch(marker)}, hostile)
    refused = r"MVIT_B_16x4.pyth pickles \S+, which loading would have to run: refused"
    with pytest.raises(ckpt.UnsafeCheckpointError, match=refused):
        ckpt.load(hostile)
    with pytest.raises(ckpt.UnsafeCheckpointError):
        from_pretrained(hostile, source="pyslowfast", preset="mvit_tiny")
    assert main(["eval", hostile, "--source", "pyslowfast", "--preset", "mvit_tiny", "--data-root", str(tmp_path)]) == 2
    assert main(["train", "--finetune", hostile, "--synthetic-size", "8", "0", "--batch-size", "8", "--max-steps", "1",
                 "--no-progress", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("which loading would have to run: refused") == 2 and "--finetune " + hostile in err, err
    assert not marker.exists()
    # What this project writes still loads: the config and NumPy's RNG state are allowed.
    run = tmp_path / "ok"
    assert main(["train", "--synthetic-size", "8", "0", "--batch-size", "8", "--max-steps", "1", "--threads", "1",
                 "--no-progress", "--output-dir", str(run)]) == 0
    state = ckpt.load(ckpt.list_checkpoints(str(run))[0])
    assert state["model_config"].name == "mvit_tiny" and state["rng"]


def test_a_folder_that_cannot_be_locked_warns_and_goes_on(tmp_path, monkeypatch):
    # some NFS mounts answer flock with ENOLCK: a run there must still train
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock .*No locks available.*nothing keeps a second run"):
        with ckpt.hold_output_dir(str(tmp_path / "run")):
            pass
    assert os.path.isdir(tmp_path / "run")


def test_the_lock_names_its_holder_and_ends_with_the_block(tmp_path):
    out = str(tmp_path / "run")
    with ckpt.hold_output_dir(out):
        with open(os.path.join(out, ckpt.LOCK_NAME)) as f:
            assert f.read() == f"pid {os.getpid()} on {__import__('socket').gethostname()}\n"
        with pytest.raises(ValueError, match="another run is training in it"):
            with ckpt.hold_output_dir(out):
                pass
    with ckpt.hold_output_dir(out):  # released
        pass


def _set_and_sleep(event):
    event.set()
    __import__("time").sleep(60)


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    # DataLoader workers are forked, and a forked child shares an flock while it keeps the
    # descriptor: a rank that died left its workers holding the folder for a few seconds, and
    # torchrun's restart of the run was refused.
    import multiprocessing

    out = str(tmp_path / "run")
    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    with ckpt.hold_output_dir(out):
        child = fork.Process(target=_set_and_sleep, args=(started,))
        child.start()
        assert started.wait(60)  # running its own code: whatever it does at fork is done
    try:
        with ckpt.hold_output_dir(out):  # free, though the child still runs
            assert child.is_alive()
    finally:
        child.kill()
        child.join()
