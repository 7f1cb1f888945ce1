"""Process group setup from torchrun's environment, and failing fast instead of hanging.

``torchrun`` (single node or ``--nnodes``) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
without them the job runs as a single process. NCCL on GPUs, gloo on CPU. Collectives get a
timeout, and :func:`run_guarded` turns an exception on any rank into a logged error and a
non-zero exit of that process, which makes torchrun stop the other ranks.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def parse_device(device: str) -> torch.device:
    """--device as a torch.device: auto (CUDA where there is one), cpu, cuda or cuda:N, checked
    against the machine. ``cuda`` stays without an index (the caller picks it)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} requested but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: CUDA device {dev.index} requested, but there are only "
                             f"{torch.cuda.device_count()}")
    return torch.device("cpu") if dev.type == "cpu" else dev


def restart_hazard() -> str:
    """A warning for torchrun runs that may restart with the rendezvous store shared, else "".

    With ``--max-restarts`` above 0, torchrun (2.5 to at least 2.14) keeps one store for the whole
    job and hands it to every attempt, which sets up its process group under the same keys as
    the failed one. A restarted rank can then read a dead rank's address: gloo fails with
    "connectFullMesh failed ... Connection refused" and NCCL can hang (pytorch/pytorch#135712).
    Here 3 of 6 restarts of a 2-rank gloo run failed that way, and none of 10 with the store
    not shared (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which the launcher must see)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return ""
    try:
        restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        restarts = 0
    if restarts < 1:
        return ""
    return ("warning: torchrun may restart this job (--max-restarts), and its rendezvous store is shared with "
            "the ranks: a restarted rank can read the failed attempt's addresses and fail to connect "
            "(pytorch/pytorch#135712). Give torchrun TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment.")


def init(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    hazard = restart_hazard() if world > 1 and rank == 0 else ""
    if hazard:
        print(hazard, file=sys.stderr, flush=True)
    dev = parse_device(device)
    if dev.type == "cuda":
        if dev.index is not None and world > 1:
            raise ValueError(f"--device {device}: under torchrun every rank takes the GPU of its LOCAL_RANK; "
                             "give --device cuda")
        index = local_rank if dev.index is None else dev.index
        if index >= torch.cuda.device_count():  # LOCAL_RANK's (parse_device checked a given index)
            raise ValueError(f"--device {device}: CUDA device {index} requested, but there are only "
                             f"{torch.cuda.device_count()}")
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank, world, local_rank, dev)


def cleanup() -> None:
    """Leave the job together: a rank that tears its process group down while a peer is still
    writing results made one CI run abort at exit ("terminate called without an active
    exception" in the gloo rank that finished first)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (every rank must call this at the same point)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() > 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def run_guarded(fn: Callable[[], int]) -> int:
    """Run ``fn``; in a multi-process job an exception is printed with the rank and the process
    exits non-zero at once (``os._exit``) rather than waiting in a collective the failed rank will
    never join. Single-process errors propagate (the CLI prints ValueError as one line)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return fn()
    rank = os.environ.get("RANK", "?")
    try:
        return fn()
    except BaseException as exc:  # includes KeyboardInterrupt: never leave peers hanging
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        msg = f"[rank {rank}] failed: {type(exc).__name__}: {exc}"
        if not isinstance(exc, (ValueError, FileNotFoundError)):
            msg += "\n" + traceback.format_exc()
        print(msg, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2 if isinstance(exc, (ValueError, FileNotFoundError)) else 1)
