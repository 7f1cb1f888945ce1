"""Atomic checkpoints and ``--resume auto``.

A checkpoint is written to a temporary file in the destination folder, flushed and fsynced, then
moved over the final name with ``os.replace`` (atomic on POSIX), and the folder is fsynced so the
rename itself survives a crash. A process killed mid-save therefore leaves at worst a stray
``*.tmp`` file: every ``checkpoint_*.pt`` on disk is complete. ``latest_valid`` still loads
candidates newest first and skips (with a warning) any that fail to load, e.g. a file truncated by
a full disk or copied partially.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
import warnings
from typing import Any, Optional

import torch

_NAME = re.compile(r"checkpoint_e(\d+)_s(\d+)\.pt$")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"checkpoint_e{epoch:04d}_s{step:08d}.pt"


def atomic_save(obj: Any, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def list_checkpoints(folder: str) -> list[str]:
    """Checkpoints in ``folder``, newest (highest step) first."""
    found = []
    for path in glob.glob(os.path.join(folder, "checkpoint_e*_s*.pt")):
        m = _NAME.search(path)
        if m:
            found.append((int(m.group(2)), int(m.group(1)), path))
    return [p for _, _, p in sorted(found, reverse=True)]


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def latest_valid(folder: str) -> Optional[tuple[str, dict]]:
    """The newest checkpoint in ``folder`` that loads, skipping corrupt ones with a warning."""
    for path in list_checkpoints(folder):
        try:
            state = load(path)
            if not isinstance(state, dict) or "model" not in state:
                raise ValueError("not a training checkpoint")
            return path, state
        except Exception as exc:  # a torn or foreign file: fall back to the previous one
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(exc).__name__}: {exc}")
    return None


def prune(folder: str, keep: int) -> None:
    if keep <= 0:
        return
    for path in list_checkpoints(folder)[keep:]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
