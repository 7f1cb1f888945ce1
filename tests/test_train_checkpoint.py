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
