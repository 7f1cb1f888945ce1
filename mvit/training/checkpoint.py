"""Atomic checkpoints and ``--resume auto``.

A checkpoint is written to a temporary file in the destination folder, flushed and fsynced, then
moved over the final name with ``os.replace`` (atomic on POSIX), and the folder is fsynced so the
rename itself survives a crash. A process killed mid-save therefore leaves at worst a stray
``*.tmp`` file: every ``checkpoint_*.pt`` on disk is complete. ``latest_valid`` still loads
candidates newest first and skips (with a warning) any that fail to load, e.g. a file truncated by
a full disk or copied partially.

One folder holds one run: :func:`hold_output_dir` keeps a second process from training into a
folder a run is using.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import socket
import tempfile
import warnings
from typing import Any, Iterator, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

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


#: The lock file of :func:`hold_output_dir`, which names the process holding it.
LOCK_NAME = ".mvit-train.lock"

# Descriptors of the held locks. A forked child (a DataLoader worker) shares an flock while it
# keeps the descriptor: a rank that died left its workers holding the folder for a few seconds,
# and torchrun's restart of the run was refused. Forked children close them at once.
_HELD_LOCKS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)  # not LOCK_UN, which would unlock the parent's lock too
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


def check_output_dir(folder: str) -> None:
    """A file where the run's folder should be: one line naming the option (makedirs said
    "[Errno 17] File exists")."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--output-dir {folder} is a file, not a folder")


@contextlib.contextmanager
def hold_output_dir(folder: str) -> Iterator[None]:
    """An exclusive lock on ``folder`` for the ``with`` block (``flock`` on its lock file; the
    system drops it when the process ends, however it ends). Two runs in one folder would write
    the same checkpoint names, prune each other's checkpoints and interleave one log. That
    happens with two jobs given the same ``--output-dir``, or with ``srun`` starting several
    copies of a command that was meant for ``torchrun``. A file system without locks (some NFS
    mounts) gets a warning and no lock."""
    check_output_dir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:  # read-only, no permission, a file on the way
        raise ValueError(f"--output-dir {folder}: cannot create it ({exc.strerror or exc})") from None
    path = os.path.join(folder, LOCK_NAME)
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # CLOEXEC: spawned children
    _HELD_LOCKS.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process"
            hint = ""
            if os.environ.get("SLURM_NTASKS", "1") not in ("", "1") and "WORLD_SIZE" not in os.environ:
                hint = (f". SLURM_NTASKS is {os.environ['SLURM_NTASKS']} and torchrun did not start this process: "
                        "srun starts that many copies of the command, each training alone. Run torchrun under "
                        "srun, one task per node (see the README)")
            raise ValueError(f"--output-dir {folder}: another run is training in it ({holder}, holding "
                             f"{path}){hint}") from None
        except OSError as exc:
            warnings.warn(f"--output-dir {folder}: cannot lock {path} ({exc}); nothing keeps a second run "
                          "from training into this folder")
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield  # outside the except blocks: an error of the run is not shown as raised while handling them
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)  # and with it the lock


def list_checkpoints(folder: str) -> list[str]:
    """Checkpoints in ``folder``, newest (highest step) first."""
    found = []
    for path in glob.glob(os.path.join(folder, "checkpoint_e*_s*.pt")):
        m = _NAME.search(path)
        if m:
            found.append((int(m.group(2)), int(m.group(1)), path))
    return [p for _, _, p in sorted(found, reverse=True)]


# what `mvit train` writes, and what resuming needs
TRAINING_KEYS = ("model", "optimizer", "scaler", "epoch", "step", "sampler")
# what evaluating needs
MODEL_KEYS = ("model", "model_config")


class UnsafeCheckpointError(ValueError):
    """The file pickles an object that loading would have to construct or call: refused before it runs."""


def _safe_globals() -> list:
    """What `mvit train`'s checkpoints hold besides tensors and plain containers: the model's
    config and NumPy's RNG state (an array). Published weights (pySlowFast, pytorchvideo,
    torchvision state_dicts) hold none of these."""
    import numpy as np

    from ..config import MViTConfig

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtypes = {type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.bool_)}
    # Arrays pickled under NumPy 1 name their constructor numpy.core.multiarray._reconstruct.
    names = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
    return [MViTConfig, np.ndarray, np.dtype, *dtypes, *((multiarray._reconstruct, n) for n in names)]


def load(path: str) -> dict:
    """A checkpoint (this project's or published weights) without running code from the file:
    ``weights_only`` unpickling, which builds tensors and plain containers only, plus the few
    types our own checkpoints hold. A file that pickles anything else (a downloaded ``.pyth`` can)
    is an :class:`UnsafeCheckpointError` naming the object. A ``.safetensors`` file (how timm
    publishes weights) is read with safetensors."""
    import pickle

    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from None
        return load_file(path, device="cpu")
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            if found is None:
                # torch's message opens with advice to load with weights_only=False, which runs the
                # file's code and is no answer for a file that is no checkpoint (a log, a text file)
                detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
                raise pickle.UnpicklingError(
                    f"weights-only unpickling refused it: {detail.group(1) if detail else str(exc).strip()}") from None
            raise UnsafeCheckpointError(
                f"{path} pickles {found.group(1)}, which loading would have to run: refused. If you trust "
                "the file, torch.load(path, weights_only=False) it yourself and pass the dict "
                "(mvit.convert.from_pretrained takes one)") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def load_checked(path: str, what: str, required=TRAINING_KEYS) -> dict:
    """The checkpoint at ``path``, or one ValueError line, starting with ``what`` (the option the
    path came from, or ""), when the file is no checkpoint (a log, a torn file) or lacks one of
    ``required``. A missing file is a FileNotFoundError."""
    what = f"{what} " if what else ""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}checkpoint not found: {path}")
    try:
        state = load(path)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{what}{exc}") from None
    except Exception as exc:  # pickle, zip and I/O errors alike: the file is not a checkpoint
        raise ValueError(f"{what}{path} cannot be read as a checkpoint ({_first_line(exc)})") from None
    if not isinstance(state, dict):
        expected = "a checkpoint written by `mvit train`" if required else "a state_dict or a checkpoint dict"
        raise ValueError(f"{what}{path} holds a {type(state).__name__}, not {expected}")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{what}{path} is not a checkpoint written by `mvit train` (it has no "
                         f"{', '.join(repr(k) for k in missing)})")
    return upgrade(state)


def upgrade(state: dict) -> dict:
    """A checkpoint of an earlier `mvit train` in today's terms, so that eval, predict, resume and
    ``from_pretrained`` read it as the run meant it (published weights pass unchanged):

    - configs from before ``MViTConfig.sampling_rate`` read the class default (4): the run's
      ``--sampling-rate`` where it recorded one;
    - synthetic runs recorded the preset's stride (until 2026-12-07) though their clips are
      consecutive frames: 1;
    - ``steps_per_epoch`` (recorded since 2026-12-07): the schedule's length over its epochs;
    - recipes from before the warmup's start LR and the cosine's end LR were per 512 clips
      (2026-12-07) held an absolute ``min_lr`` and no ``warmup_start_lr`` (the schedule's start
      LR): both per 512, for resume's list of changed settings.
    """
    import dataclasses

    from ..config import MViTConfig

    cfg, args, recipe = state.get("model_config"), state.get("args"), state.get("recipe")
    if isinstance(cfg, MViTConfig) and isinstance(args, dict) and isinstance(recipe, dict):
        stride = 1 if recipe.get("synthetic") else (None if "sampling_rate" in vars(cfg) else args.get("sampling_rate"))
        if stride is not None and stride != cfg.sampling_rate:
            state["model_config"] = dataclasses.replace(cfg, sampling_rate=stride)
        if recipe.get("synthetic") and args.get("sampling_rate") not in (None, 1):
            state["args"] = dict(args, sampling_rate=1)
    schedule = state.get("scheduler")
    if isinstance(recipe, dict) and isinstance(schedule, dict):
        if "steps_per_epoch" not in state and schedule.get("total_steps") and recipe.get("epochs"):
            state["steps_per_epoch"] = schedule["total_steps"] // recipe["epochs"]
        if "warmup_start_lr" not in recipe and recipe.get("batch_size") and "start_lr" in schedule:
            per_512 = 512 / recipe["batch_size"]
            state["recipe"] = dict(recipe, warmup_start_lr=schedule["start_lr"] * per_512,
                                   **({"min_lr": recipe["min_lr"] * per_512} if "min_lr" in recipe else {}))
    return state


def latest_valid(folder: str, required=("model",)) -> Optional[tuple[str, dict]]:
    """The newest checkpoint in ``folder`` that loads, skipping corrupt ones with a warning."""
    for path in list_checkpoints(folder):
        try:
            return path, load_checked(path, "", required)
        except (ValueError, FileNotFoundError) as exc:  # torn, foreign, or pruned meanwhile: the previous one
            warnings.warn(f"skipping unreadable checkpoint {path}: {exc}")
    return None


def load_file_or_run(path: str, what: str, required=MODEL_KEYS) -> tuple[str, dict]:
    """A checkpoint file, or a run folder's newest readable checkpoint, as eval, predict and
    --finetune take them: (the file's path, its contents); errors as :func:`load_checked`'s."""
    if not os.path.isdir(path):
        return path, load_checked(path, what, required)
    found = latest_valid(path, required)
    if found is None:
        raise FileNotFoundError(f"{what + ' ' if what else ''}no readable checkpoint in {path}")
    return found


def step_of(path: str) -> int:
    """The optimizer step in a checkpoint's file name."""
    return int(_NAME.search(path).group(2))


def prune(folder: str, keep: int) -> None:
    if keep <= 0:
        return
    for path in list_checkpoints(folder)[keep:]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
