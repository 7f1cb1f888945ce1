"""Per-shape tuning (mvit_kernels.tuning): each key is timed once, the faster candidate is what
runs, results equal the reference's whichever wins, and the caller's tensors, gradients and RNG
are untouched. On CPU tensors with mode "all" (the default mode tunes CUDA tensors only).

Which candidate ran is read from the output's autograd node: the C++ op's (its eager Function's,
or the registered op's) is named after pool3d; the reference's is a plain torch node (LayerNorm's,
for conv + norm).
Float64 inputs, so results agree to 1e-10 whichever candidate ran.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import sys
import warnings

import pytest
import torch

import mvit_kernels
from mvit import build_model
from mvit_kernels import reference, tuning

# The modules (the package's attributes of these names are the functions).
POOL3D_CANDIDATES = importlib.import_module("mvit_kernels.pool3d")._CANDIDATES
POOL_RESIDUAL_ADD_CANDIDATES = importlib.import_module("mvit_kernels.pool_residual_add")._CANDIDATES
pp_module = importlib.import_module("mvit_kernels.pooled_projection")
pa_module = importlib.import_module("mvit_kernels.pooling_attention")

pytestmark = pytest.mark.skipif(not mvit_kernels.load_extension(), reason="needs the C++ extension")
# The Triton candidates are forced onto CPU tensors, which needs the interpreter.
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

THW, KERNEL, STRIDE, PADDING = (3, 5, 4), (3, 3, 3), (1, 2, 2), (1, 1, 1)


@pytest.fixture(autouse=True)
def fresh_choices():
    tuning.clear()
    yield
    tuning.clear()


def _pool3d_inputs(batch=2, grad=True):
    g = torch.Generator().manual_seed(0)
    d = 8

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x = rand(batch, 3, 1 + THW[0] * THW[1] * THW[2], d)
    return x, rand(d, 1, *KERNEL), rand(d), rand(d)


def _pool3d(x, w, nw, nb, stride=STRIDE):
    return mvit_kernels.pool3d(x, THW, KERNEL, stride, PADDING, "conv", w, True, nw, nb)


def _bench_throughput():
    """bench/throughput.py, whose tables and variants some tests check."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    return importlib.import_module("throughput")


def _ran_fused_op(y) -> bool:
    name = type(y.grad_fn).__name__
    return "EagerPool3d" in name or "mvit_kernels_pool3d" in name


def test_each_key_is_timed_once(monkeypatch):
    timed = []
    real = tuning._best_ms
    monkeypatch.setattr(tuning, "_best_ms", lambda fn, *a: timed.append(fn) or real(fn, *a))
    x, w, nw, nb = _pool3d_inputs()
    with tuning.using("all"):
        y, thw = _pool3d(x, w, nw, nb)
        assert len(timed) == 3 and len(tuning.choices()) == 1  # every candidate, one decision
        _pool3d(x, w, nw, nb)
        assert len(timed) == 3  # same key: cached
        _pool3d(x, w, nw, nb, stride=(1, 1, 1))  # another shape
        with torch.no_grad():
            _pool3d(x, w, nw, nb)  # forward only: another key
        _pool3d(*_pool3d_inputs(batch=1))
    choices = tuning.choices()
    assert len(choices) == 4 and len(timed) == 12
    assert [c.backward for c in choices] == [True, True, False, True]
    first = choices[0]
    assert set(first.ms) == {"fused", "reference", "reference-ncdhw"} and all(t > 0 for t in first.ms.values())
    assert first.winner == min(first.ms, key=first.ms.get)
    assert first.label().startswith("pool3d (2, 3, 61, 8) float64") and first.label().endswith("fwd+bwd")
    y_ref, thw_ref = reference.pool3d(x, THW, KERNEL, STRIDE, PADDING, "conv", w, True, nw, nb)
    assert thw == thw_ref
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("winner", ["fused", "reference", "reference-ncdhw"])
def test_the_faster_candidate_runs(monkeypatch, winner):
    # Fake clock: the winner takes 1 ms, the others 2 ms.
    monkeypatch.setattr(tuning, "_best_ms", lambda fn, *a: 1.0 if fn is POOL3D_CANDIDATES[winner] else 2.0)
    x, w, nw, nb = _pool3d_inputs()
    with tuning.using("all"):
        y, _ = _pool3d(x, w, nw, nb)
    assert tuning.choices()[0].winner == winner
    assert _ran_fused_op(y) == (winner == "fused")
    grads = torch.autograd.grad(y.square().sum(), (x, w, nw, nb))
    y_ref, _ = reference.pool3d(x, THW, KERNEL, STRIDE, PADDING, "conv", w, True, nw, nb)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (x, w, nw, nb))
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10)


def test_saved_bytes_counts_new_storage_kept_for_backward():
    a = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    assert tuning._saved_bytes(lambda t: t * 2.0, (a,)) == 0  # a scalar product keeps nothing
    assert tuning._saved_bytes(lambda t: t * t, (a,)) == 0  # keeps its input, not new storage
    assert tuning._saved_bytes(lambda t: t.exp(), (a,)) == a.numel() * 8  # keeps its output
    assert tuning._saved_bytes(lambda t: (t.exp() * t.exp()).sum(), (a,)) == 2 * a.numel() * 8  # each once
    assert tuning._saved_bytes(lambda t: t.view(-1).exp().view(64, 32), (a,)) == a.numel() * 8


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("memory", ["keep", "any"])
def test_keep_policy_passes_over_a_faster_candidate_that_keeps_more_memory(monkeypatch, memory):
    # The reference pooling keeps its convolution output and layout copy for the backward (here
    # well over the 64 KiB slack), the fused op only its inputs. Fake clock: the reference is faster.
    monkeypatch.setattr(tuning, "_best_ms", lambda fn, *a: 1.0 if fn is POOL3D_CANDIDATES["reference"] else 2.0)
    x, w, nw, nb = _pool3d_inputs(batch=16)
    with tuning.using("all", memory=memory):
        y, _ = _pool3d(x, w, nw, nb)
    (choice,) = tuning.choices()
    assert choice.memory == memory
    assert choice.saved_mb["fused"] * 2**20 < tuning.MEMORY_SLACK_BYTES < choice.saved_mb["reference"] * 2**20
    if memory == "keep":
        assert choice.winner == "fused" and _ran_fused_op(y) and choice.held_back == ("reference",)
    else:
        assert choice.winner == "reference" and not _ran_fused_op(y) and choice.held_back == ()
    assert not choice.note  # nothing failed: no warning
    assert tuning.summary()[0]["saved_mb"] == dict(choice.saved_mb)
    # The benchmarks' table (bench/throughput.py) shows both, and what the policy passed over.
    throughput = _bench_throughput()
    row = next(line for line in throughput.tuning_section() if line.startswith("| pool3d"))
    assert f"reference {choice.saved_mb['reference']:.1f}" in row
    cells = row.split(" | ")
    assert (cells[5] == "reference") == (memory == "keep")  # faster, passed over for memory
    assert cells[1] == memory  # the policy that decided the row
    assert cells[6].startswith("fused ") and "reference-ncdhw" in cells[6]  # both checked against the reference
    with torch.no_grad(), tuning.using("all", memory="keep"):  # no backward: time alone decides
        _pool3d(x, w, nw, nb)
    assert tuning.choices()[-1].winner == "reference" and not tuning.choices()[-1].saved_mb
    assert throughput.tuning_section()[-1].split(" | ")[1:3] == ["— (no backward)", "reference"]


def test_throughput_time_only_variant_tunes_by_time_alone(monkeypatch):
    # bench/throughput.py's ours-fused-timeonly runs the fused model with tuning under policy
    # "any", beside ours-fused under the default; fake clock: the reference pooling is faster.
    monkeypatch.setattr(tuning, "_best_ms", lambda fn, *a: 1.0 if fn is POOL3D_CANDIDATES["reference"] else 2.0)
    throughput = _bench_throughput()
    cpu = torch.device("cpu")
    specs = throughput._variants("mvit_tiny", cpu, {"ours-fused", "ours-fused-timeonly"})
    assert list(specs) == ["ours-fused", "ours-fused-timeonly"]
    with tuning.using("all"):
        for label, spec in specs.items():
            row = throughput.measure("mvit_tiny", label, spec, cpu, 1, "train", 0, 1, contextlib.nullcontext)
            assert row["variant"] == label and row["step_s"] > 0
    trained = [c for c in tuning.choices() if c.op == "pool3d" and c.backward]
    assert {c.memory for c in trained} == {"keep", "any"}
    assert all(c.winner == "reference" for c in trained if c.memory == "any")  # time alone
    assert tuning.memory_policy() == "keep"  # the variant's policy ended with it


def test_ties_go_to_the_fused_kernel(monkeypatch):
    monkeypatch.setattr(tuning, "_best_ms", lambda fn, *a: 1.0)
    with tuning.using("all"):
        y, _ = _pool3d(*_pool3d_inputs())
    assert tuning.choices()[0].winner == "fused" and _ran_fused_op(y)


def _out_of_memory(*args):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")


def test_out_of_memory_while_timing_keeps_the_default(monkeypatch):
    monkeypatch.setattr(tuning, "_best_ms", _out_of_memory)
    x, w, nw, nb = _pool3d_inputs()
    with tuning.using("all"), pytest.warns(RuntimeWarning, match="out of memory while timing"):
        y, _ = _pool3d(x, w, nw, nb)
    (choice,) = tuning.choices()
    assert choice.winner == "fused" and not choice.ms and "out of memory" in choice.note and _ran_fused_op(y)
    _pool3d(x, w, nw, nb)  # decided: not timed (nor warned) again
    assert len(tuning.choices()) == 1


def test_a_failing_alternative_is_not_used(monkeypatch):
    real = tuning._best_ms

    def timing(fn, *args):
        if fn is POOL3D_CANDIDATES["reference"]:
            raise RuntimeError("no kernel image is available for execution on the device (simulated)")
        return real(fn, *args)

    monkeypatch.setattr(tuning, "_best_ms", timing)
    x, w, nw, nb = _pool3d_inputs()
    with tuning.using("all"), pytest.warns(RuntimeWarning, match="reference failed .*RuntimeError: no kernel image"):
        y, _ = _pool3d(x, w, nw, nb)
    (choice,) = tuning.choices()
    assert choice.winner == "fused" and choice.ms["reference"] == float("inf") and _ran_fused_op(y)


def test_a_failing_default_raises(monkeypatch):
    def timing(fn, *args):
        if fn is POOL3D_CANDIDATES["fused"]:
            raise RuntimeError("the fused kernel failed (simulated)")
        return 1.0

    monkeypatch.setattr(tuning, "_best_ms", timing)
    with tuning.using("all"), pytest.raises(RuntimeError, match="the fused kernel failed"):
        _pool3d(*_pool3d_inputs())
    assert not tuning.choices()


def test_timing_leaves_the_callers_state_alone():
    x, w, nw, nb = _pool3d_inputs()
    rng = torch.get_rng_state()
    with tuning.using("all"):
        y, _ = _pool3d(x, w, nw, nb)
    assert tuning.choices(), "nothing was tuned"
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(t.grad is None for t in (x, w, nw, nb))
    assert x._version == 0


def test_reference_winner_keeps_the_ops_dtype_under_autocast(monkeypatch):
    # Under autocast the reference's LayerNorm returns float32; the candidate casts back so
    # either choice hands the same dtype on.
    monkeypatch.setattr(tuning, "_best_ms", lambda fn, *a: 1.0 if fn is POOL3D_CANDIDATES["reference"] else 2.0)
    x, w, nw, nb = (t.detach().float() for t in _pool3d_inputs())
    with tuning.using("all"), torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = _pool3d(x, w, nw, nb)
    assert tuning.choices()[0].winner == "reference" and y.dtype == torch.bfloat16


@pytest.mark.parametrize("winner", [None, "fused", "reference", "reference-ncdhw"])
def test_pool_residual_add_is_tuned(monkeypatch, winner):
    # None: real timings; otherwise a fake clock makes ``winner`` the fastest.
    if winner is not None:
        candidates = POOL_RESIDUAL_ADD_CANDIDATES
        monkeypatch.setattr(tuning, "_best_ms", lambda fn, *a: 1.0 if fn is candidates[winner] else 2.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1 + 4 * 6 * 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    branch = torch.randn(2, 1 + 4 * 3 * 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(2, generator=g, dtype=torch.float64)
    args = ((4, 6, 5), (1, 3, 3), (1, 2, 2), (0, 1, 1))
    with tuning.using("all"):
        out = mvit_kernels.pool_residual_add(x, *args, branch, scale)
    (choice,) = tuning.choices()
    assert choice.op == "pool_residual_add" and set(choice.ms) == {"fused", "reference", "reference-ncdhw"}
    assert winner is None or choice.winner == winner
    want = reference.pool_residual_add(x, *args, branch, scale)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn(out.shape, generator=g, dtype=out.dtype)
    for got_g, want_g in zip(torch.autograd.grad(out, (x, branch), grad), torch.autograd.grad(want, (x, branch), grad)):
        torch.testing.assert_close(got_g, want_g, atol=1e-10, rtol=1e-10)


@needs_interpreter
def test_pooled_projection_tunes_where_the_rule_takes_triton(monkeypatch):
    # The rule takes Triton on CUDA only; here it is forced so the Triton candidate runs in the
    # interpreter (TRITON_INTERPRET=1, tests/conftest.py).
    if pp_module._kernels is None:
        pytest.skip("needs Triton")
    monkeypatch.setattr(pp_module, "uses_triton", lambda *a: True)
    g = torch.Generator().manual_seed(2)
    B, heads, d, thw = 1, 2, 8, (2, 8, 8)
    C, N = 12, 1 + 2 * 8 * 8
    x = torch.randn(B, N, C, generator=g, requires_grad=True)
    weight = torch.randn(3 * heads * d, C, generator=g, requires_grad=True)
    bias = torch.randn(3 * heads * d, generator=g, requires_grad=True)
    pool_w = torch.randn(d, 1, 3, 3, 3, generator=g, requires_grad=True)
    nw, nb = torch.randn(d, generator=g), torch.randn(d, generator=g)
    args = ("k", heads, thw, (3, 3, 3), (1, 4, 4), (1, 1, 1), "conv", pool_w, True, nw, nb)
    with tuning.using("all"):
        y, thw_out = mvit_kernels.pooled_projection(x, weight, bias, *args)
    choices = {c.op: c for c in tuning.choices()}
    # 1x4x4 windows leave tokens unread: the gathered candidate projects only the read ones.
    assert set(choices["pooled_projection"].ms) == {"triton", "gathered", "composed"}
    assert "pool3d" in choices  # the composed and gathered candidates' pool3d is tuned in turn
    y_ref, thw_ref = reference.pooled_projection(x, weight, bias, *args)
    assert thw_out == thw_ref
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)  # float32; the kernel's dots
    grads = torch.autograd.grad(y.square().sum(), (x, weight, bias, pool_w))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (x, weight, bias, pool_w))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


@needs_interpreter
@pytest.mark.parametrize("rel_pos", [True, False], ids=["relpos", "plain"])
def test_pooling_attention_tunes_triton_against_sdpa(monkeypatch, rel_pos):
    # The Triton candidate applies to CUDA tensors; forced here, it runs in the interpreter.
    if pa_module._kernels is None:
        pytest.skip("needs Triton")
    monkeypatch.setattr(pa_module, "_triton_applies", lambda *a: True)
    g = torch.Generator().manual_seed(3)
    B, heads, d, thw_q, thw_kv = 1, 2, 16, (2, 4, 4), (2, 2, 2)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).requires_grad_()

    q, k, v = rand(B, heads, 33, d), rand(B, heads, 9, d), rand(B, heads, 9, d)
    tables = (rand(3, d, scale=0.1), rand(7, d, scale=0.1), rand(7, d, scale=0.1)) if rel_pos else (None,) * 3
    with tuning.using("all"):
        out = mvit_kernels.pooling_attention(q, k, v, thw_q, thw_kv, True, *tables, residual_pooling=True)
    (choice,) = tuning.choices()
    assert choice.op == "pooling_attention" and set(choice.ms) == {"triton", "sdpa"}
    want = reference.pooling_attention(q, k, v, thw_q, thw_kv, True, *tables, residual_pooling=True)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)  # float32; the kernels' dots
    leaves = [t for t in (q, k, v, *tables) if t is not None]
    for got, ref in zip(torch.autograd.grad(out.square().sum(), leaves), torch.autograd.grad(want.square().sum(), leaves)):
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)


def _scaled(fn, forward=1.0, backward=1.0):
    """fn with its output scaled by ``forward`` and its gradient by ``backward``: a wrong candidate."""

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y * forward

        @staticmethod
        def backward(ctx, g):
            return g * backward

    def wrong(*args):
        y, thw = fn(*args)
        return Scale.apply(y), thw

    return wrong


@pytest.mark.parametrize("broken", ["fused", "reference-ncdhw"])
@pytest.mark.parametrize("forward, backward", [(1.5, 1.0), (1.0, 0.5)], ids=["forward", "gradient"])
def test_a_candidate_that_disagrees_with_the_trusted_one_is_not_used(monkeypatch, broken, forward, backward):
    # A kernel bug on some GPU or shape: the wrong candidate is the fastest by a fake clock, and
    # still the trusted reference's (or the fused op's) result is what runs, with a warning.
    wrong = _scaled(POOL3D_CANDIDATES[broken], forward, backward)
    monkeypatch.setitem(POOL3D_CANDIDATES, broken, wrong)
    monkeypatch.setattr(tuning, "_best_ms", lambda fn, *a: 1.0 if fn is wrong else 2.0)
    x, w, nw, nb = _pool3d_inputs()
    with tuning.using("all"), pytest.warns(RuntimeWarning, match=f"{broken} disagrees with reference .*not used"):
        y, _ = _pool3d(x, w, nw, nb)
    (choice,) = tuning.choices()
    assert choice.winner == ("reference" if broken == "fused" else "fused") and choice.held_back == ()
    fwd_err, grad_err = choice.checked[broken]
    assert fwd_err == pytest.approx(abs(forward - 1)) and grad_err == pytest.approx(abs(backward - 1))
    others = [n for n in POOL3D_CANDIDATES if n not in (broken, "reference")]
    assert all(max(choice.checked[n]) < 1e-12 for n in others)  # float64: the right ones agree
    grads = torch.autograd.grad(y.square().sum(), (x, w, nw, nb))
    y_ref, _ = reference.pool3d(x, THW, KERNEL, STRIDE, PADDING, "conv", w, True, nw, nb)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref.square().sum(), (x, w, nw, nb))):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10)
    row = next(line for line in _bench_throughput().tuning_section() if line.startswith("| pool3d"))
    assert f"{broken} disagrees with reference" in row.split(" | ")[7]


def test_a_wrong_default_is_not_kept_for_lack_of_memory(monkeypatch):
    wrong = _scaled(POOL3D_CANDIDATES["fused"], 2.0)
    monkeypatch.setitem(POOL3D_CANDIDATES, "fused", wrong)
    monkeypatch.setattr(tuning, "_best_ms", _out_of_memory)
    x, w, nw, nb = _pool3d_inputs()
    with tuning.using("all"), pytest.warns(RuntimeWarning, match="fused disagrees"):
        y, _ = _pool3d(x, w, nw, nb)
    assert tuning.choices()[0].winner == "reference" and not _ran_fused_op(y)


@pytest.mark.parametrize(
    "mode, dtype",
    # torch's CPU avg_pool3d has no bf16 kernel (the reference fails; the CUDA one has).
    [(m, t) for m in ("conv", "max", "avg") for t in (torch.float32, torch.bfloat16) if (m, t) != ("avg", torch.bfloat16)],
)
def test_the_real_candidates_agree_within_the_tolerances(mode, dtype):
    # No false alarms from rounding: the C++ op against the reference at 16-bit and fp32, max
    # pooling included (bf16 makes ties between window inputs common; either may get the gradient).
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 1 + THW[0] * THW[1] * THW[2], 8, generator=g)
    if mode == "max":
        x = x.mul(4).round()  # many exact ties
    x = x.to(dtype).requires_grad_()
    w = torch.randn(8, 1, *KERNEL, generator=g).to(dtype).requires_grad_() if mode == "conv" else None
    nw, nb = (torch.randn(8, generator=g).to(dtype).requires_grad_() for _ in range(2))
    with tuning.using("all"), warnings.catch_warnings():
        warnings.simplefilter("error")  # a disagreement would warn
        mvit_kernels.pool3d(x, THW, KERNEL, STRIDE, PADDING, mode, w, True, nw, nb)
    (choice,) = tuning.choices()
    limits = tuning.TOLERANCES[dtype]
    assert set(choice.checked) == {"fused", "reference-ncdhw"}
    for fwd, grad in choice.checked.values():
        assert fwd <= limits[0] / 4 and grad <= limits[1] / 4  # well inside: the tolerance is not marginal


def test_a_failing_trusted_candidate_leaves_the_choice_unchecked(monkeypatch):
    def fails(*args):
        raise NotImplementedError("no kernel for this dtype (simulated)")

    monkeypatch.setitem(POOL3D_CANDIDATES, "reference", fails)
    x, w, nw, nb = _pool3d_inputs()
    with tuning.using("all"), pytest.warns(RuntimeWarning, match="reference failed .*not used, results not cross-checked"):
        _pool3d(x, w, nw, nb)
    (choice,) = tuning.choices()
    assert choice.ms["reference"] == float("inf") and not choice.checked and choice.note.count("reference failed") == 1


def test_disagreement_measures():
    y = torch.tensor([1.0, -4.0, float("inf"), float("nan")])
    grads = (torch.tensor([3.0, 4.0]), None)
    same = (y, grads)
    assert tuning.disagreement(same, same) == (0.0, 0.0)  # equal infinities and NaNs agree
    assert tuning.disagreement((y + torch.tensor([0.4, 0, 0, 0]), grads), same)[0] == pytest.approx(0.1)  # of max |y|
    routed = (torch.tensor([4.0, 3.0]), None)  # the same values, swapped (two tied inputs)
    assert tuning.disagreement((y, routed), same)[1] == pytest.approx(2**0.5 / 5)  # L2: ||(1, -1)|| / ||(3, 4)||
    assert tuning.disagreement((torch.tensor([1.0, -4.0, float("inf"), 0.0]), grads), same)[0] == float("inf")
    assert tuning.disagreement((y, (torch.zeros(2), torch.zeros(1))), same)[1] == float("inf")  # None vs a tensor
    assert tuning.disagreement((y[:3], grads), same)[0] == float("inf")  # shape
    assert tuning.disagreement((y, (torch.tensor([3.0, float("nan")]), None)), same)[1] == float("inf")
    empty = (torch.zeros(0), ())
    assert tuning.disagreement(empty, empty) == (0.0, 0.0)


def test_modes(monkeypatch):
    monkeypatch.setattr(tuning, "_override", None)  # the test fixture's "off"; read the environment
    monkeypatch.delenv(tuning.ENV, raising=False)
    x, w, nw, nb = _pool3d_inputs()
    _pool3d(x, w, nw, nb)
    assert tuning.mode() == "cuda" and not tuning.choices()  # CPU tensors: not tuned by default
    monkeypatch.setenv(tuning.ENV, "0")
    assert tuning.mode() == "off"
    monkeypatch.setenv(tuning.ENV, "1")
    y, _ = _pool3d(x, w, nw, nb)
    assert tuning.mode() == "all" and len(tuning.choices()) == 1
    monkeypatch.setenv(tuning.ENV, "sometimes")
    with pytest.raises(ValueError, match="MVIT_KERNELS_AUTOTUNE"):
        _pool3d(x, w, nw, nb)
    with pytest.raises(ValueError, match="tuning mode"):
        with tuning.using("yes"):
            pass
    monkeypatch.delenv(tuning.ENV, raising=False)
    monkeypatch.delenv(tuning.MEMORY_ENV, raising=False)
    assert tuning.memory_policy() == "keep"
    monkeypatch.setenv(tuning.MEMORY_ENV, "any")
    assert tuning.memory_policy() == "any"
    with tuning.using("all", memory="keep"):
        assert tuning.memory_policy() == "keep"
    monkeypatch.setenv(tuning.MEMORY_ENV, "less")
    with pytest.raises(ValueError, match="MVIT_KERNELS_AUTOTUNE_MEMORY"):
        tuning.memory_policy()
    with pytest.raises(ValueError, match="tuning memory policy"):
        with tuning.using("all", memory="some"):
            pass


def test_torch_compile_traces_the_fused_op_without_tuning():
    x, w, nw, nb = (t.detach() for t in _pool3d_inputs())

    def f(x):
        return _pool3d(x, w, nw, nb)[0]

    with tuning.using("all"):
        y = torch.compile(f, fullgraph=True, backend="eager")(x)
    assert not tuning.choices()
    torch.testing.assert_close(y, reference.pool3d(x, THW, KERNEL, STRIDE, PADDING, "conv", w, True, nw, nb)[0],
                               atol=1e-10, rtol=1e-10)


def test_model_with_checkpointing_tunes_and_matches_the_reference():
    # Tuning inside torch.utils.checkpoint's forward must not disturb its recompute (the timing
    # graph is shielded from its saved-tensor hooks), and every choice reproduces the reference.
    torch.manual_seed(0)
    ref = build_model("mvit_tiny").double().train()
    fused = copy.deepcopy(ref).set_fused(True)
    fused.checkpoint_activations = True
    video = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
    results = []
    with tuning.using("all"):
        for model in (ref, fused):
            torch.manual_seed(1)  # same stochastic-depth masks
            logits = model(video)
            results.append((logits, torch.autograd.grad(logits.square().sum(), list(model.parameters()))))
    ops = {c.op for c in tuning.choices()}
    assert {"pool3d", "pool_residual_add"} <= ops
    (logits_ref, grads_ref), (logits, grads) = results
    torch.testing.assert_close(logits, logits_ref, atol=1e-8, rtol=1e-8)
    for (name, _), g, g_ref in zip(ref.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-8, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("overrides", [dict(), dict(rel_pos_spatial=True, rel_pos_temporal=True, residual_pooling=True)],
                         ids=["v1", "v2"])
def test_cuda_model_default_tuning_matches_the_reference(ieee_fp32, overrides):
    # The default mode on a GPU: every CUDA op with alternatives is timed, and whatever won,
    # the model equals the reference (float32, TF32 off).
    torch.manual_seed(0)
    ref = build_model("mvit_tiny", **overrides).cuda().train()
    fused = copy.deepcopy(ref).set_fused(True)
    video = torch.randn(2, 3, 8, 32, 32, device="cuda")
    results = []
    with tuning.using("cuda"):
        for model in (ref, fused):
            torch.manual_seed(1)
            logits = model(video)
            results.append((logits, torch.autograd.grad(logits.square().sum(), list(model.parameters()))))
    assert {"pool3d", "pool_residual_add", "pooling_attention"} <= {c.op for c in tuning.choices()}
    # Every fused candidate was cross-checked against its trusted alternative on the GPU, and agreed.
    assert all(c.checked for c in tuning.choices() if c.ms)
    assert not [c.note for c in tuning.choices() if "disagrees" in c.note]
    (logits_ref, grads_ref), (logits, grads) = results
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)
    for (name, _), g, g_ref in zip(ref.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-3, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_deterministic_algorithms_take_the_deterministic_candidate_on_cuda_with_a_backward():
    # The CUDA backwards of pool3d, pool_residual_add (scale) and the Triton projection add with
    # float atomics; under torch.use_deterministic_algorithms(True) their references run
    # instead, and nothing is timed (a timed choice can differ from run to run). A fake CUDA
    # tensor stands in for a GPU: select only reads its device and flags.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, device="cuda", requires_grad=True)
        x_cpu = torch.empty(2, 3, requires_grad=True)
    candidates = {"fused": "fused", "reference": "reference"}

    def pick(t, **kw):
        return tuning.select("pool3d", candidates, (t,), "fused", trusted="reference", **kw)

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert pick(x, deterministic="reference") == "reference"
        assert pick(x) == "fused"  # an op whose backward is deterministic keeps its kernel
        assert pick(x_cpu, deterministic="reference") == "fused"  # the CPU backwards reduce in order
        with torch.no_grad():
            assert pick(x, deterministic="reference") == "fused"  # no backward follows
        with tuning.using("all"):
            assert not tuning._can_tune(torch.empty(2))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert pick(x, deterministic="reference") == "fused"
    with tuning.using("all"):
        assert tuning._can_tune(torch.empty(2))
