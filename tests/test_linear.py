"""mvit_kernels.linear (the fused CPU inference path: oneDNN matmul with bias and GELU post-ops)
against reference.linear. float32 tolerance 1e-5 (oneDNN blocks the reduction differently)."""

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
        with pytest.raises((ValueError, RuntimeError)):
            mvit_kernels.linear(torch.randn(2, 3, 5), w, b)


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
