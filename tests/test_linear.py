"""mvit_kernels.linear (the fused CPU inference path: oneDNN matmul with bias and GELU post-ops)
against reference.linear, and mlp (the same path in token chunks where the hidden activation is large)
against reference.mlp. float32 tolerance 1e-5 (oneDNN blocks the reduction differently)."""

import contextlib
import importlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mvit_kernels
from mvit_kernels import reference

# The module, not the function of the same name that mvit_kernels exports.
linear_module = importlib.import_module("mvit_kernels.linear")
TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs(shape, c_in, c_out, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, c_in, generator=g)
    w = torch.randn(c_out, c_in, generator=g) * c_in**-0.5
    b = torch.randn(c_out, generator=g) if bias else None
    return x, w, b


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("shape, c_in, c_out, bias", [
    ((1, 393), 96, 384, True), ((2, 7), 33, 17, True), ((5,), 8, 3, False), ((1, 1, 65), 64, 192, True),
])
def test_matches_reference_in_inference(shape, c_in, c_out, bias, activation):
    x, w, b = _inputs(shape, c_in, c_out, bias)
    with torch.inference_mode():
        assert linear_module.uses_onednn(x, w, b) == linear_module._ONEDNN
        got = mvit_kernels.linear(x, w, b, activation)
    torch.testing.assert_close(got, reference.linear(x, w, b, activation), **TOL)


def test_non_contiguous_input():
    x, w, b = _inputs((3, 10), 24, 16)
    x = x.transpose(0, 1)  # (10, 3, 24), not contiguous
    with torch.no_grad():
        got = mvit_kernels.linear(x, w, b, "gelu")
    torch.testing.assert_close(got, reference.linear(x, w, b, "gelu"), **TOL)


def _strided(*shape, layout):
    """A random tensor of shape whose last dim is strided (every other element) or expanded (stride 0)."""
    if layout == "strided":
        return torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]
    return torch.randn(*shape[:-1], 1).expand(*shape)


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_non_contiguous_bias_and_weight(layout):
    # oneDNN read a strided bias as dense: every output column but the first was wrong, silently.
    torch.manual_seed(3)
    x = torch.randn(3, 5, 12)
    w1, b1 = _strided(10, 12, layout=layout), _strided(10, layout=layout)
    w2, b2 = _strided(10, 7, layout=layout).mT, _strided(7, layout=layout)  # transposed too
    with torch.inference_mode():
        assert linear_module.uses_onednn(x, w1, b1) == linear_module._ONEDNN
        got, got_mlp = mvit_kernels.linear(x, w1, b1, "gelu"), mvit_kernels.mlp(x, w1, b1, w2, b2)
    torch.testing.assert_close(got, reference.linear(x, w1, b1, "gelu"), **TOL)
    torch.testing.assert_close(got_mlp, reference.mlp(x, w1, b1, w2, b2), **TOL)


def test_no_input_features_gives_the_bias():
    # oneDNN failed with "could not create a primitive descriptor" on an empty reduction.
    x, w, b = torch.randn(3, 5, 0), torch.randn(4, 0), torch.randn(4)
    with torch.inference_mode():
        got = mvit_kernels.linear(x, w, b)
    torch.testing.assert_close(got, b.expand(3, 5, 4))
    torch.testing.assert_close(got, reference.linear(x, w, b))


def test_gradients_take_the_reference():
    x, w, b = _inputs((2, 5), 12, 7)
    w.requires_grad_()
    assert not linear_module.uses_onednn(x, w, b)
    got = mvit_kernels.linear(x, w, b, "gelu")
    got.sum().backward()
    w2 = w.detach().clone().requires_grad_()
    reference.linear(x, w2, b, "gelu").sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)


def test_flop_counter_sees_the_reference_matmul():
    x, w, b = _inputs((1, 9), 16, 32)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        mvit_kernels.linear(x, w, b, "gelu")
    assert counter.get_total_flops() == 2 * 9 * 16 * 32


def test_other_dtypes_and_bad_input():
    x, w, b = _inputs((2, 3), 8, 4)
    with torch.inference_mode():
        assert not linear_module.uses_onednn(x.double(), w.double(), b.double())
        torch.testing.assert_close(mvit_kernels.linear(x.double(), w.double(), b.double()),
                                   reference.linear(x.double(), w.double(), b.double()))
        with pytest.raises(ValueError, match="activation"):
            mvit_kernels.linear(x, w, b, "relu")


def _bad_linear_args():
    x, w, b = _inputs((2, 3), 8, 4)
    return [
        ("features", (torch.randn(2, 3, 5), w, b), "x has 5 features but weight expects 8"),
        ("x 0-d", (torch.tensor(1.0), w, b), r"x must be \(..., in_features\), got a 0-d tensor"),
        # oneDNN read this weight as the (4, 8) one and answered, silently
        ("weight rank", (x, w.unsqueeze(-1), b), r"weight must be 2-D \(out_features, in_features\), got shape \(4, 8, 1\)"),
        ("weight 1-D", (x, w[0], None), r"weight must be 2-D .* got shape \(8,\)"),
        # oneDNN failed with "could not create a primitive descriptor"
        ("bias length", (x, w, b[:3]), r"bias must have shape \(4,\) to match weight, got \(3,\)"),
        ("bias rank", (x, w, b[None]), r"bias must have shape \(4,\) to match weight, got \(1, 4\)"),
        # these two returned uninitialized memory on every path (F.linear's own behaviour)
        ("weight on meta", (x, w.to("meta"), b), "weight is on meta but x is on cpu"),
        ("bias on meta", (x, w, b.to("meta")), "bias is on meta but x is on cpu"),
        # F.linear's own errors named no argument ("mat1 and mat2 must have the same dtype")
        ("x integer", (x.long(), w, b), "x must be float32, float64, bfloat16 or float16, got torch.int64", TypeError),
        ("weight dtype", (x, w.double(), b), "weight has dtype torch.float64 but x has dtype torch.float32", TypeError),
        ("bias dtype", (x, w, b.half()), "bias has dtype torch.float16 but x has dtype torch.float32", TypeError),
    ]


@pytest.mark.parametrize("case", _bad_linear_args(), ids=lambda c: c[0])
@pytest.mark.parametrize("path", ["reference", "fused", "fused-inference"])
def test_bad_input_names_the_argument_on_every_path(case, path):
    """The same error, naming the argument, on the reference, on the fused op with gradients (the
    reference's ops) and on its oneDNN inference path."""
    _, args, message, *error = case
    fn = reference.linear if path == "reference" else mvit_kernels.linear
    ctx = torch.inference_mode() if path == "fused-inference" else contextlib.nullcontext()
    if path == "fused":  # gradients wanted for the weight: x may be an integer tensor
        args = (args[0], args[1].requires_grad_(), *args[2:])
    with ctx, pytest.raises(error[0] if error else ValueError, match=message):
        fn(*args)


def test_the_oneDNN_op_takes_float32_cpu_tensors_only():
    # Called directly (as a compiled graph calls it): a float64 x reached oneDNN, whose error
    # ("itensor_view_from_dense expects float/bfloat16/half ...") named no argument.
    x, w, b = _inputs((2, 3), 8, 4)
    op = torch.ops.mvit_kernels.linear_onednn
    with pytest.raises(RuntimeError, match="linear_onednn: x must be a float32 CPU tensor .* got torch.float64 on cpu"):
        op(x.double(), w.double(), b.double(), False)
    with pytest.raises(RuntimeError, match="linear_onednn: bias is on meta but x is on cpu"):
        op(x, w, b.to("meta"), False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's mixed dtypes: F.linear's path
        with pytest.raises(RuntimeError, match="linear_onednn: weight must be a float32 CPU tensor .* got torch.bfloat16"):
            op(x, w.bfloat16(), b, False)
        assert mvit_kernels.linear(x, w.bfloat16(), b).dtype == torch.bfloat16


def _compiled_graph_ops(fn, *args):
    """(result, the op targets in the graph torch.compile traced for fn)."""
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    return torch.compile(fn, fullgraph=True, backend=backend)(*args), seen


@pytest.mark.skipif(not linear_module._ONEDNN, reason="torch built without oneDNN")
def test_torch_compile_keeps_the_onednn_linear_for_inference():
    # Inference: the registered oneDNN op (opaque to Inductor); with gradients: the reference's ops.
    x, w, b = _inputs((2, 6), 8, 12)
    want = reference.linear(x, w, b, "gelu")
    with torch.no_grad():
        got, ops = _compiled_graph_ops(lambda x: mvit_kernels.linear(x, w, b, "gelu"), x)
    torch.testing.assert_close(got, want, **TOL)
    assert "mvit_kernels.linear_onednn.default" in ops, ops
    wg = w.detach().clone().requires_grad_()
    got, ops = _compiled_graph_ops(lambda x: mvit_kernels.linear(x, wg, b, "gelu"), x)
    torch.testing.assert_close(got, want, **TOL)
    assert not any("linear_onednn" in op for op in ops), ops
    # And through Inductor itself.
    with torch.no_grad():
        compiled = torch.compile(lambda x: mvit_kernels.linear(x, w, b, "gelu") * 2.0, fullgraph=True)
        torch.testing.assert_close(compiled(x), want * 2.0, **TOL)


@pytest.mark.skipif(not linear_module._ONEDNN, reason="torch built without oneDNN")
def test_onednn_op_opcheck():
    x, w, b = _inputs((3, 5), 16, 24)
    torch.library.opcheck(linear_module._linear_onednn_op, (x, w, b, True))
    torch.library.opcheck(linear_module._linear_onednn_op, (x, w, None, False))


def test_autocast_takes_the_reference():
    x, w, b = _inputs((2, 5), 16, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not linear_module.uses_onednn(x, w, b)
        got = mvit_kernels.linear(x, w, b, "gelu")
        want = reference.linear(x, w, b, "gelu")
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


# --- mlp: fc2(GELU(fc1(x))), in token chunks on the eager oneDNN path where the hidden is large ---

def _mlp_inputs(shape, c_in, hidden, c_out, bias=True, seed=0):
    x, w1, b1 = _inputs(shape, c_in, hidden, bias, seed)
    _, w2, b2 = _inputs((1,), hidden, c_out, bias, seed + 1)
    return x, w1, b1, w2, b2


def _count_onednn_calls(monkeypatch):
    calls = []
    real = linear_module._run_onednn
    # Records the tokens (rows) of each oneDNN matmul.
    monkeypatch.setattr(linear_module, "_run_onednn",
                        lambda x, *a: calls.append(x.numel() // x.shape[-1]) or real(x, *a))
    return calls


@pytest.mark.skipif(not linear_module._ONEDNN, reason="this torch build has no oneDNN: mlp is the reference")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
def test_mlp_chunks_match_reference(monkeypatch, bias, contiguous):
    # 2 x 19 = 38 tokens in chunks of 5 (the last one 3 tokens), hidden 24, odd feature counts.
    x, w1, b1, w2, b2 = _mlp_inputs((19, 2) if not contiguous else (2, 19), 13, 24, 7, bias)
    if not contiguous:
        x = x.transpose(0, 1)
    monkeypatch.setattr(linear_module, "MLP_CHUNKED_ABOVE_BYTES", 0)
    monkeypatch.setattr(linear_module, "MLP_CHUNK_BYTES", 5 * 24 * 4)
    calls = _count_onednn_calls(monkeypatch)
    with torch.inference_mode():
        got = mvit_kernels.mlp(x, w1, b1, w2, b2)
    assert calls == [5, 5] * 7 + [3, 3]  # fc1 and fc2 of every chunk
    assert got.shape == (2, 19, 7)
    torch.testing.assert_close(got, reference.mlp(x, w1, b1, w2, b2), **TOL)


@pytest.mark.skipif(not linear_module._ONEDNN, reason="this torch build has no oneDNN: mlp is the reference")
def test_mlp_is_one_pass_below_the_threshold(monkeypatch):
    x, w1, b1, w2, b2 = _mlp_inputs((3, 40), 16, 64, 16)
    calls = _count_onednn_calls(monkeypatch)
    with torch.inference_mode():
        got = mvit_kernels.mlp(x, w1, b1, w2, b2)
    assert calls == [120, 120]  # one fc1, one fc2 over all 3 x 40 tokens
    torch.testing.assert_close(got, reference.mlp(x, w1, b1, w2, b2), **TOL)


def test_mlp_gradients_and_bad_shapes(monkeypatch):
    monkeypatch.setattr(linear_module, "MLP_CHUNKED_ABOVE_BYTES", 0)
    x, w1, b1, w2, b2 = _mlp_inputs((2, 9), 12, 20, 6)
    w1.requires_grad_()
    got = mvit_kernels.mlp(x, w1, b1, w2, b2)  # gradients needed: the reference path
    got.sum().backward()
    w1_ref = w1.detach().clone().requires_grad_()
    reference.mlp(x, w1_ref, b1, w2, b2).sum().backward()
    torch.testing.assert_close(w1.grad, w1_ref.grad)
    for fn in (reference.mlp, mvit_kernels.mlp):
        with torch.inference_mode():  # the chunked oneDNN path for the fused op
            with pytest.raises(ValueError, match="fc2_weight expects 7 features but fc1_weight gives 20"):
                fn(x, w1.detach(), b1, w2[:, :7], b2)
            with pytest.raises(ValueError, match=r"fc1_bias must have shape \(20,\)"):
                fn(x, w1.detach(), b1[:5], w2, b2)
            with pytest.raises(ValueError, match=r"fc2_bias must have shape \(6,\)"):
                fn(x, w1.detach(), b1, w2, b2[:5])
            with pytest.raises(ValueError, match="fc2_weight must be 2-D"):
                fn(x, w1.detach(), b1, w2[None], b2)
            with pytest.raises(ValueError, match="x has 11 features but fc1_weight expects 12"):
                fn(x[..., :11], w1.detach(), b1, w2, b2)
            with pytest.raises(ValueError, match="fc2_weight is on meta but x is on cpu"):
                fn(x, w1.detach(), b1, w2.to("meta"), b2)
            with pytest.raises(TypeError, match="fc2_bias has dtype torch.float64 but x has dtype torch.float32"):
                fn(x, w1.detach(), b1, w2, b2.double())


def test_fused_model_with_chunked_mlps_matches_reference(monkeypatch):
    # Every MLP of a tiny model chunked (4 hidden rows' worth of bytes a chunk): same logits.
    import copy

    from mvit import build_model

    monkeypatch.setattr(linear_module, "MLP_CHUNKED_ABOVE_BYTES", 0)
    monkeypatch.setattr(linear_module, "MLP_CHUNK_BYTES", 1)  # one token a chunk
    torch.manual_seed(0)
    ref = build_model("mvit_tiny").eval()
    fused = copy.deepcopy(ref).set_fused(True)
    calls = _count_onednn_calls(monkeypatch)
    video = torch.randn(1, 3, 4, 16, 16)
    with torch.inference_mode():
        got = fused(video)
        want = ref(video)
    assert calls.count(1) > 0 or not linear_module._ONEDNN
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
