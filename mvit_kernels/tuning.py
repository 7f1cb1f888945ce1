"""Per-shape choice between a fused kernel and its plain-PyTorch alternatives, by timing each on
first use (as ``torch.backends.cudnn.benchmark`` does for convolution algorithms).

Why: which implementation wins depends on the GPU, the shape and whether a backward follows. On
the H100 the CUDA pool ops beat cuDNN's depthwise convolution 2-4x at MViT-B's first blocks but
lost to it at some later shapes (``bench/results/gpu_*``), and the Triton K/V projection has only
a byte/FLOP model behind its dispatch rule. Timing each once per shape makes ``fused=True`` never
slower per op than its alternatives, whatever the card.

What is tuned (each op's candidates return the same values in the same dtype):

- ``pool3d``: the C++/CUDA op vs the reference (convolution / pooling + LayerNorm) with the token
  grid as a channels-last view and as a contiguous NCDHW copy, which reach different CUDA kernels
  (``reference.pool3d``'s ``contiguous_grid``);
- ``pool_residual_add``: the C++/CUDA op vs max pooling + add, in the same two layouts;
- ``pooling_attention``: the Triton kernels vs SDPA, where the kernels cover the call;
- ``pooled_projection``: the Triton kernel vs ``F.linear`` + ``pool3d`` (where the static rule
  would take Triton).

A key is the op, every tensor argument's shape, strides, dtype and device, the other arguments,
whether a backward follows (grad mode and ``requires_grad``) and the autocast state. Each
candidate runs once to warm up (Triton compiles then) and ``REPEATS`` times timed, forward and,
when a backward follows, backward (``torch.autograd.grad`` with a ones gradient, from detached
aliases of the inputs: the caller's tensors, ``.grad`` and RNG are untouched); the fastest
(minimum) wins. CUDA times are CUDA-event times of each synchronized run, so slow launches count.

Memory: when a backward follows, each candidate's forward also runs once under saved-tensor hooks
that add up the new storages it keeps for the backward (the inputs' own storages not counted).
By default (``MVIT_KERNELS_AUTOTUNE_MEMORY`` unset or ``keep``) a candidate that keeps more than
the fused one (beyond 1% or 64 KiB) is not chosen: the fused ops keep almost nothing beyond their
inputs, while the reference pooling keeps its convolution output and layout copies, the unfused
K/V projection its whole output and SDPA with rel-pos its bias mask. Chosen by time alone,
these cost peak training memory, which ``fused=True`` is also meant to save (the issue's target
is <= 0.6x torchvision's). ``any`` decides by time alone. Without a backward only time counts.

Cross-check: where an op names a trusted candidate (the plain-PyTorch or cuDNN/SDPA path), each
other candidate's forward output and input gradients (for a random output gradient) are compared
with the trusted one's on the caller's own inputs, once per key, before any timing. A candidate
that disagrees (:func:`disagreement` over :data:`TOLERANCES`) is not used, the fused one
included, with a warning: the kernels have run on few GPUs (an H100) and shapes, and a wrong
result must not pass for a fast one. The measure is the largest error relative to the largest
value for the forward and the relative L2 error for gradients (max pooling routes a gradient to
either of two tied inputs, which differ locally but not in L2); the tolerances are loose enough
for 16-bit rounding and TF32 (cuDNN's default for fp32 convolutions) and far below a bug's error.

Not tuned, the default (fused) candidate runs: while torch.compile traces, under dispatch modes
(FlopCounterMode, fake tensors), during CUDA-graph capture, and when tuning is off. If timing runs
out of GPU memory (it needs room for a second forward and its gradients), the default is kept for
that key, with a warning; so does a failure of the other candidate (e.g. a Triton kernel the GPU
cannot compile). The default candidate's own errors propagate, as they would untuned.

``MVIT_KERNELS_AUTOTUNE``: unset or ``cuda``: tune CUDA tensors only; ``0``: never tune (always the
fused kernel); ``1``: tune every device (CPU too: the tests use it). ``MVIT_KERNELS_AUTOTUNE_MEMORY``:
``keep`` or ``any``, above. :func:`using` overrides both in code. :func:`choices` lists the
decisions (:func:`summary` as plain data: the benchmarks print it, the trainer writes it to
result.json); :func:`clear` forgets them.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor

from ._dispatch import intercepted, needs_grad

ENV = "MVIT_KERNELS_AUTOTUNE"
MODES = {"cuda": "cuda", "0": "off", "off": "off", "1": "all", "all": "all"}
MEMORY_ENV = "MVIT_KERNELS_AUTOTUNE_MEMORY"
MEMORY_POLICIES = ("keep", "any")
REPEATS = 3
# Saved-for-backward bytes a candidate may keep beyond the default's under the "keep" policy:
# allocation granularity and small statistics (LayerNorm's mean/rstd), not activations.
MEMORY_SLACK_BYTES = 64 * 1024
MEMORY_SLACK_FRACTION = 0.01
#: Cross-check tolerances by dtype: (forward, gradients), as :func:`disagreement` measures them.
#: 16-bit: the reference rounds each intermediate (convolution output, LayerNorm) to 16 bits where
#: the fused ops keep fp32; on MViT-like pooling that is ~0.5% forward and ~1.5% in the gradients
#: (tests/test_tuning.py measures it), a missed window tap or row tens of percent.
TOLERANCES = {torch.float64: (1e-6, 1e-6), torch.float32: (1e-2, 1e-2), torch.bfloat16: (6e-2, 1e-1),
              torch.float16: (6e-2, 1e-1)}


@dataclass(frozen=True)
class Choice:
    """One decision: ``winner`` among the candidates, with each candidate's best time (ms)."""

    op: str
    key: tuple
    winner: str
    ms: Mapping[str, float]
    backward: bool
    note: str = ""
    #: Per candidate, MB of new storage its forward keeps for the backward (measured when a
    #: backward follows); under the "keep" policy a candidate above the default's is not chosen.
    saved_mb: Mapping[str, float] = None  # type: ignore[assignment]
    memory: str = "any"
    #: Candidates faster than the winner that the "keep" policy passed over (not a warning: the
    #: policy working as meant).
    held_back: tuple = ()
    #: Per candidate checked against the trusted one: its (forward, gradient) disagreement; a
    #: candidate over :data:`TOLERANCES` is not used.
    checked: Mapping[str, tuple] = None  # type: ignore[assignment]

    def label(self) -> str:
        """Short description for tables: op, the first tensor's shape and dtype, the other
        arguments, fwd or fwd+bwd."""
        args = self.key[3]
        first = next(a for a in args if isinstance(a, tuple) and a[:1] == ("tensor",))
        others = [a for a in args if not (isinstance(a, tuple) and a[:1] == ("tensor",)) and a is not None]
        dtype = str(first[3]).replace("torch.", "")
        return (f"{self.op} {tuple(first[1])} {dtype} " + " ".join(str(a) for a in others)
                + (" fwd+bwd" if self.backward else " fwd"))


_choices: dict[tuple, Choice] = {}
_override: Optional[str] = None
_memory_override: Optional[str] = None


def _setting(override: Optional[str], env: str, default: str, allowed: Mapping[str, str]) -> str:
    """override if set, else the environment variable env (unset: default), mapped by allowed."""
    if override is not None:
        return override
    value = os.environ.get(env, default).strip().lower()
    if value not in allowed:
        raise ValueError(f"{env} must be one of {sorted(allowed)} (unset means {default!r}), got {value!r}")
    return allowed[value]


def mode() -> str:
    """"cuda", "off" or "all": :func:`using`'s override, else ``MVIT_KERNELS_AUTOTUNE``."""
    return _setting(_override, ENV, "cuda", MODES)


def memory_policy() -> str:
    """"keep" or "any": :func:`using`'s override, else ``MVIT_KERNELS_AUTOTUNE_MEMORY``."""
    return _setting(_memory_override, MEMORY_ENV, "keep", {p: p for p in MEMORY_POLICIES})


@contextlib.contextmanager
def using(new_mode: str, memory: Optional[str] = None) -> Iterator[None]:
    """Run a block with tuning mode "cuda", "off" or "all" (e.g. "off" to time the fused kernels
    themselves, as ``bench/bench_pool_ops.py`` does) and, if given, memory policy "keep" or "any"."""
    global _override, _memory_override
    if new_mode not in ("cuda", "off", "all"):
        raise ValueError(f"tuning mode must be 'cuda', 'off' or 'all', got {new_mode!r}")
    if memory is not None and memory not in MEMORY_POLICIES:
        raise ValueError(f"tuning memory policy must be 'keep' or 'any', got {memory!r}")
    previous = _override, _memory_override
    _override = new_mode
    _memory_override = memory if memory is not None else _memory_override
    try:
        yield
    finally:
        _override, _memory_override = previous


def choices() -> list[Choice]:
    """The decisions made so far, in order."""
    return list(_choices.values())


def summary() -> list[dict]:
    """The decisions as plain data for logs and reports: op/shape label, winner, ms per
    candidate, whether a backward follows, MB each keeps for it, memory policy, the faster
    candidates that policy passed over, note."""
    return [{"op": c.label(), "winner": c.winner, "ms": dict(c.ms), "backward": c.backward,
             "saved_mb": dict(c.saved_mb or {}),
             "memory": c.memory, "held_back": list(c.held_back), "checked": {n: list(e) for n, e in (c.checked or {}).items()},
             "note": c.note} for c in _choices.values()]


def clear() -> None:
    """Forget every decision (the next call of each shape is timed again)."""
    _choices.clear()


def _describe(a: Any) -> Any:
    # Runs on every tuned call (tens per model step): kept to hashable values torch already has
    # (torch.Size, torch.device), no string formatting.
    if isinstance(a, Tensor):
        return ("tensor", a.shape, a.stride(), a.dtype, a.device, a.requires_grad)
    if isinstance(a, (list, tuple)):
        return tuple([_describe(v) if isinstance(v, (Tensor, list, tuple)) else v for v in a])
    return a


def _can_tune(x: Tensor) -> bool:
    # Under torch.use_deterministic_algorithms a timed choice could differ from run to run (as
    # cudnn.benchmark's can): the fixed rules decide.
    if torch.compiler.is_compiling() or intercepted(x) or torch.are_deterministic_algorithms_enabled():
        return False
    m = mode()
    if m == "off" or (m == "cuda" and not x.is_cuda):
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def select(op: str, candidates: Mapping[str, Callable[..., Any]], args: tuple, default: str,
           trusted: Optional[str] = None, deterministic: Optional[str] = None) -> Callable[..., Any]:
    """The candidate to call with ``args`` (positional, the same for every candidate): the cached
    choice for this key, else the timed winner among those that agree with ``trusted`` (when
    given), else (no tuning here) ``default``.

    ``deterministic``: the candidate to run instead on CUDA under
    ``torch.use_deterministic_algorithms(True)`` when a backward follows, for ops whose CUDA
    backward sums with float atomics (its low bits depend on the order).

    Every candidate must return a tensor or a tuple whose first element is the tensor a
    backward would start from, with the same shape and dtype."""
    x = next(a for a in args if isinstance(a, Tensor))
    if deterministic is not None and x.is_cuda and torch.are_deterministic_algorithms_enabled() and needs_grad(args):
        return candidates[deterministic]
    if not _can_tune(x):
        return candidates[default]
    backward = needs_grad(args)
    autocast_on = torch.is_autocast_enabled(x.device.type)
    memory = memory_policy()
    key = (op, backward, autocast_on, _describe(args), memory)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _tune(op, key, candidates, args, default, backward, x.device, memory, trusted)
        if choice.note:
            warnings.warn(f"mvit_kernels.tuning: {choice.label()}: {choice.note}", RuntimeWarning, stacklevel=2)
    return candidates[choice.winner]


def _tune(op, key, candidates, args, default, backward, device, memory="any", trusted=None) -> Choice:
    """Checks every candidate against ``trusted`` (when given), times it (and, when a backward
    follows, measures what it keeps for it). A run that would work without tuning must not fail
    because of it: out of GPU memory while timing (it needs room for a second forward and its
    gradients beside the caller's activations) keeps the default; so does an error of another
    candidate (e.g. a Triton kernel this GPU cannot compile). The default's own errors propagate."""
    ms: dict[str, float] = {}
    saved: dict[str, int] = {}
    checked: dict[str, tuple[float, float]] = {}
    wrong: set[str] = set()
    notes = []
    try:
        expected = _outputs(candidates[trusted], args, backward) if trusted is not None else None
    except torch.cuda.OutOfMemoryError:
        return Choice(op, key, default, {}, backward, "out of memory while timing: default kept", {}, memory)
    except Exception as exc:
        if trusted == default:
            raise
        expected = None
        ms[trusted] = math.inf
        notes.append(f"{trusted} failed ({type(exc).__name__}: {str(exc)[:200]}): not used, results not cross-checked")
    for name, fn in candidates.items():
        if name in ms:  # the trusted candidate, failed above
            continue
        try:
            if expected is not None and name != trusted:
                checked[name] = disagreement(_outputs(fn, args, backward), expected)
                limits = TOLERANCES.get(expected[0].dtype, TOLERANCES[torch.float32])
                if not all(err <= limit for err, limit in zip(checked[name], limits)):
                    wrong.add(name)
                    notes.append(
                        f"{name} disagrees with {trusted} (error {checked[name][0]:.3g} forward, {checked[name][1]:.3g} "
                        f"gradients; tolerance {limits[0]:g}, {limits[1]:g}): not used; please report this with the "
                        f"GPU, dtype and shape"
                    )
            ms[name] = _best_ms(fn, args, backward, device)
            if backward:
                saved[name] = _saved_bytes(fn, args)
        except torch.cuda.OutOfMemoryError:
            if default in wrong:  # a wrong default is not kept for lack of memory
                return Choice(op, key, trusted, {}, backward, "; ".join(notes), {}, memory, (), checked)
            return Choice(op, key, default, {}, backward, "out of memory while timing: default kept", {}, memory)
        except Exception as exc:
            if name == default:
                raise
            ms[name] = math.inf
            saved.pop(name, None)
            wrong.discard(name)
            notes.append(f"{name} failed ({type(exc).__name__}: {str(exc)[:200]}): not used")
    # The default, or in its place the trusted candidate where the default is wrong, is always
    # allowed; the others within the memory policy.
    anchor = trusted if default in wrong else default
    allowed = [name for name in ms if name not in wrong and (
        name == anchor or memory == "any" or name not in saved or saved[name] <= _memory_budget(saved[default]))]
    winner = min(allowed, key=lambda name: (ms[name], name != anchor))  # ties go to the anchor
    held_back = tuple(n for n in ms if ms[n] < ms[winner] and n not in wrong)  # faster, but keep more memory
    return Choice(op, key, winner, ms, backward, "; ".join(notes), {n: b / 2**20 for n, b in saved.items()}, memory,
                  held_back, checked)


def disagreement(got: tuple, expected: tuple) -> tuple[float, float]:
    """(forward, gradients) error of ``got`` against ``expected``, both as :func:`_outputs` returns
    them: the forward's largest absolute error over its largest absolute value, and the largest
    relative L2 error over the gradients. NaN where the other has none, or a shape or presence
    that differs, is an infinite error."""
    (y, grads), (y_ref, grads_ref) = got, expected
    if len(grads) != len(grads_ref):
        return (math.inf, math.inf)
    forward = _error(y, y_ref, math.inf)
    return forward, max((_error(g, e, 2) for g, e in zip(grads, grads_ref)), default=0.0)


def _error(a: Optional[Tensor], b: Optional[Tensor], order: float) -> float:
    """||a - b|| / ||b|| in the vector norm of ``order``; equal infinities and NaNs agree."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().float(), b.detach().float()
    if not torch.equal(a.isnan(), b.isnan()):
        return math.inf
    diff = torch.where(a == b, 0.0, a - b).nan_to_num(nan=0.0, posinf=math.inf, neginf=math.inf)
    err = torch.linalg.vector_norm(diff, order).item()
    norm = torch.linalg.vector_norm(b.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0), order).item()
    return err / norm if norm > 0 else (0.0 if err == 0 else math.inf)


def _aliases(args: tuple, grad: bool) -> tuple[tuple, list[Tensor]]:
    """Detached aliases of the tensor arguments (no copies), each requiring grad as its original
    does when ``grad``, and the aliases that do: the leaves of a graph of the tuner's own, so the
    caller's graph and .grad are untouched."""
    inputs = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, Tensor) and grad else a for a in args)
    return inputs, [a for a in inputs if isinstance(a, Tensor) and a.requires_grad]


def _outputs(fn: Callable[..., Any], args: tuple, backward: bool) -> tuple[Tensor, tuple]:
    """fn's forward output (the first element of a tuple) and, when a backward follows, the
    gradients of every input that requires them, for a fixed random output gradient (a ones
    gradient can cancel: through LayerNorm with unit weight it gives ~0, noise against noise)."""
    inputs, leaves = _aliases(args, backward)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.set_grad_enabled(backward):
        out = fn(*inputs)
        y = out[0] if isinstance(out, tuple) else out
        if not backward:
            return y.detach(), ()
        generator = torch.Generator(device=y.device).manual_seed(0)
        grad_y = torch.randn(y.shape, generator=generator, device=y.device, dtype=torch.float32).to(y.dtype)
        grads = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
    return y.detach(), grads


def _memory_budget(default_bytes: int) -> float:
    return default_bytes + max(MEMORY_SLACK_BYTES, MEMORY_SLACK_FRACTION * default_bytes)


def _saved_bytes(fn: Callable[..., Any], args: tuple) -> int:
    """Bytes of new storage that one forward of fn keeps for its backward: the storages of the
    tensors saved for backward (saved-tensor hooks), each counted once, without the inputs' own."""
    inputs, _ = _aliases(args, grad=True)
    own = {a.untyped_storage().data_ptr() for a in inputs if isinstance(a, Tensor)}
    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
        out = fn(*inputs)
    del out
    return sum(kept.values())


def _best_ms(fn: Callable[..., Any], args: tuple, backward: bool, device: torch.device) -> float:
    """Fastest of REPEATS timed runs of fn (forward, + backward when asked), after one warm-up."""
    # Identity saved-tensor hooks shield the timing graph from the caller's (e.g. the recompute
    # hooks of torch.utils.checkpoint).
    inputs, leaves = _aliases(args, backward)
    grad_out: list[Optional[Tensor]] = [None]

    def run() -> None:
        out = fn(*inputs)
        y = out[0] if isinstance(out, tuple) else out
        if backward:
            if grad_out[0] is None:
                grad_out[0] = torch.ones_like(y)
            torch.autograd.grad(y, leaves, grad_out[0])

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.set_grad_enabled(backward):
        run()
        best = math.inf
        for _ in range(REPEATS):
            best = min(best, _elapsed_ms(run, device))
    return best


def _elapsed_ms(run: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3
