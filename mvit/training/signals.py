"""Stopping a run when its machines are taken away: SIGTERM or SIGUSR1 ends training after the
optimizer step in progress, with a checkpoint that ``--resume auto`` continues from.

Schedulers give notice with these signals before they kill a job. SLURM sends SIGTERM at
preemption and at the time limit (``--signal=TERM@120`` or ``--signal=USR1@120`` sends it
earlier), Kubernetes at eviction. ``torchrun`` forwards the signals named in its
``--signals-to-handle`` (SIGTERM by default; add SIGUSR1 for SLURM's) to every rank, then
sends SIGKILL after ``--shutdown-timeout`` seconds (30 by default). The step in progress and the
checkpoint must fit in that time.

Ranks can get the signal at different steps, so they agree before they stop: the flag travels
with the loss all-reduce every step already makes, and the ranks stop after the same step.

DataLoader workers get the signal too when a whole process group is signalled, as SLURM does.
If it killed them, the main process would fail at its next batch ("DataLoader worker exited
unexpectedly") before it could save. :func:`dataloader_worker_init` keeps them serving for
``WORKER_GRACE_S`` seconds. The limit matters because DataLoader and multiprocessing stop a
worker that is still busy at shutdown with SIGTERM, then wait for it to exit."""

from __future__ import annotations

import signal
import threading
from typing import Optional

#: The signals that stop a run with a checkpoint instead of killing it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

#: Seconds a DataLoader worker goes on serving after a stop signal; then SIGALRM ends it.
WORKER_GRACE_S = 60


class StopSignals:
    """While entered, a stop signal is recorded (``signum``) instead of killing the process; the
    previous handlers come back on exit. Signal handlers can only be set from the main thread:
    entered elsewhere, nothing is caught and the signals keep their usual effect.

    The handler only sets a field. Printing from a signal handler can fail with a reentrant-call
    error when the signal interrupts a write to the same stream."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
                # Restart the system calls the signal interrupts (SA_RESTART) instead of failing
                # them with EINTR: the C++ of collectives and file writes may not retry them.
                signal.siginterrupt(sig, False)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # None: a handler set outside Python, which cannot be put back; the default is the closest
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        # The first signal handled names the stop (CPython handles signals that arrive together in
        # number order, so SIGTERM and SIGUSR1 at once name SIGUSR1).
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


def _worker_stop_signal(signum: int, frame) -> None:
    # The first signal starts the countdown; later ones leave it running.
    left = signal.alarm(0)
    signal.alarm(left or WORKER_GRACE_S)


def dataloader_worker_init(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the stop signals give the worker ``WORKER_GRACE_S``
    seconds instead of killing it at once, so the main process can finish its step and save."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _worker_stop_signal)
        signal.siginterrupt(sig, False)  # a video decoder's read is restarted, not failed


def close_batches(batches) -> None:
    """Shut a DataLoader iterator's workers down now, as its ``__del__`` would. An error that
    leaves a loop keeps the iterator alive in its traceback, often until the interpreter exits;
    there multiprocessing stops the workers with SIGTERM and waits for them, and their grace
    (:func:`dataloader_worker_init`) held an error's exit for ``WORKER_GRACE_S`` seconds."""
    shut_down = getattr(batches, "_shutdown_workers", None)  # none without workers
    if shut_down is not None:
        shut_down()
