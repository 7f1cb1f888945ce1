"""A whole model with fused=True (C++ CPU pooling ops + SDPA attention) against fused=False.

Float64 model and input, so the comparison can be tight (atol = rtol = 1e-10 would do; 1e-8 is
used): any difference is a bug, not rounding. Checked: logits and every parameter gradient, in
training mode (stochastic depth on, so pool_residual_add gets a per-sample scale) with the same
random stream in both runs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mvit import build_model


@pytest.mark.parametrize("overrides", [dict(), dict(pool_mode="max", cls_embed=False)], ids=["conv-cls", "max-nocls"])
def test_fused_model_matches_reference(overrides):
    torch.manual_seed(0)
    ref = build_model("mvit_tiny", **overrides).double().train()
    fused = copy.deepcopy(ref).set_fused(True)
    video = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
    results = []
    for model in (ref, fused):
        torch.manual_seed(1)  # same stochastic-depth masks
        logits = model(video)
        grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
        results.append((logits, grads))
    (logits_ref, grads_ref), (logits, grads) = results
    torch.testing.assert_close(logits, logits_ref, atol=1e-8, rtol=1e-8)
    names = [n for n, _ in ref.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-8, msg=lambda m: f"{name}: {m}")


V2 = dict(rel_pos_spatial=True, rel_pos_temporal=True, residual_pooling=True, dim_mul_in_att=True, abs_pos="none")


@pytest.mark.parametrize("overrides", [dict(), V2], ids=["v1", "v2-relpos-residual"])
def test_fused_model_float32_eval(overrides):
    torch.manual_seed(0)
    ref = build_model("mvit_tiny", **overrides).eval()
    fused = copy.deepcopy(ref).set_fused(True)
    video = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(video), ref(video), atol=1e-5, rtol=1e-5)


# (thw_q, thw_kv, axes, has_cls): both axes' tables, spatial only, temporal only; q finer and
# coarser than kv; with and without the class token.
REL_CASES = [((2, 4, 6), (2, 2, 3), "thw", True), ((3, 5, 5), (1, 5, 5), "hw", False), ((2, 4, 4), (2, 2, 2), "hw", True),
             ((4, 2, 2), (2, 2, 2), "t", True), ((1, 3, 3), (2, 5, 5), "thw", False)]


@pytest.mark.parametrize("thw_q, thw_kv, axes, has_cls", REL_CASES)
def test_sdpa_rel_pos_mask_matches_the_reference_bias(thw_q, thw_kv, axes, has_cls):
    import torch.nn.functional as F

    from mvit_kernels import reference
    from mvit_kernels.pooling_attention import _rel_pos_mask

    g = torch.Generator().manual_seed(3)
    B, heads, d = 2, 3, 8
    q = torch.randn(B, heads, (1 if has_cls else 0) + thw_q[0] * thw_q[1] * thw_q[2], d, generator=g, dtype=torch.float64)
    tables = [torch.randn(2 * max(a, b) - 1 + (2 if i == 1 else 0), d, generator=g, dtype=torch.float64)
              if "thw"[i] in axes else None for i, (a, b) in enumerate(zip(thw_q, thw_kv))]
    want = reference.decomposed_rel_pos(q, thw_q, thw_kv, *tables, has_cls)
    want = F.pad(want, (1, 0, 1, 0)) if has_cls else want
    with torch.no_grad():  # the one-pass path
        torch.testing.assert_close(_rel_pos_mask(q, thw_q, thw_kv, *tables, has_cls), want)
    # With gradients: the reference's bias, and its gradients reach q and the tables.
    q.requires_grad_()
    mask = _rel_pos_mask(q, thw_q, thw_kv, *tables, has_cls)
    torch.testing.assert_close(mask, want)
    assert torch.autograd.grad(mask.sum(), q)[0].abs().sum() > 0


def test_compile_fullgraph_on_a_fused_block_and_model():
    """torch.compile(fullgraph=True) traces a real MultiScaleBlock and a whole model through the
    fused ops (fake impls + autograd registrations); results equal eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model("mvit_tiny", drop_path_rate=0.0, fused=True)
    block = model.blocks[1]  # Q pooling with stride, K/V pooling, pooled skip, channel change
    assert block.spec.pool_skip and block.spec.pool_q
    x = torch.randn(2, 1 + 4 * 8 * 8, block.spec.dim_in, requires_grad=True)

    def run(x):
        out, thw = block(x, (4, 8, 8), True)
        return out.square().sum(), thw

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    (loss_c, thw_c), (loss_e, thw_e) = compiled(x), run(x)
    assert thw_c == thw_e == (4, 4, 4)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(torch.autograd.grad(loss_c, x)[0], torch.autograd.grad(loss_e, x)[0])

    clip = torch.randn(2, 3, 8, 32, 32)
    whole = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(whole(clip), model(clip))


@pytest.mark.parametrize("v2", [False, True], ids=["v1-unpooled-q", "v2-relpos-residual"])
def test_bf16_autocast_fused_and_reference(v2):
    # Under autocast an unpooled q (bf16, from the Linear) meets a pooled, LayerNorm-ed k (fp32):
    # every op casts as mvit_kernels.autocast says, on both paths. Against the fp32 reference:
    # within 2e-2, and the fused path within 1.5x of the reference's own bf16 error.
    torch.manual_seed(0)
    extra = dict(rel_pos_spatial=True, rel_pos_temporal=True, residual_pooling=True, dim_mul_in_att=True,
                 abs_pos="none") if v2 else {}
    ref = build_model("mvit_tiny", drop_path_rate=0.0, **extra).eval()
    fused = copy.deepcopy(ref).set_fused(True)
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        truth = ref(x)
        errors = []
        for model in (ref, fused):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            assert out.dtype == torch.bfloat16
            errors.append(((out.float() - truth).norm() / truth.norm()).item())
    assert errors[0] <= 2e-2 and errors[1] <= max(2e-2, 1.5 * errors[0]), errors


def test_compile_fullgraph_v2_inference():
    # MViTv2 inference on CPU writes the rel-pos mask with out= into a view of it; torch.compile
    # (fullgraph) must trace that path and agree with eager.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model("mvit_tiny", drop_path_rate=0.0, fused=True, **V2).eval()
    clip = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(clip), model(clip), atol=1e-5, rtol=1e-5)


def test_rel_pos_mask_is_one_registered_op_under_compile():
    # Inference under torch.compile writes the mask with the registered op (Inductor's own loop
    # for the same sum was 3x slower on CPU); opcheck covers its fake implementation.
    import importlib

    from mvit_kernels import reference

    pa = importlib.import_module("mvit_kernels.pooling_attention")  # the module, not the function

    g = torch.Generator().manual_seed(4)
    thw_q, thw_kv = (2, 4, 4), (2, 2, 2)
    q = torch.randn(2, 3, 1 + 32, 8, generator=g)
    tables = [torch.randn(3, 8, generator=g), torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)]
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    with torch.no_grad():
        want = pa._rel_pos_mask(q, thw_q, thw_kv, *tables, True)
        got = torch.compile(lambda q: pa._rel_pos_mask(q, thw_q, thw_kv, *tables, True), fullgraph=True,
                            backend=backend)(q)
    torch.testing.assert_close(got, want)
    assert "mvit_kernels.rel_pos_mask.default" in seen, seen
    terms = reference.rel_pos_terms(q, thw_q, thw_kv, *tables, True)
    torch.library.opcheck(pa._rel_pos_mask_op, (*terms, q.shape[2], list(thw_q), list(thw_kv), True))
    torch.library.opcheck(pa._rel_pos_mask_op, (None, *terms[1:], q.shape[2], list(thw_q), list(thw_kv), True))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_torch_export_with_a_dynamic_batch(v2):
    # Deployment path: torch.export sees the registered pool ops (their fake implementations give
    # the shapes) and the exported program runs other batch sizes than the example's.
    overrides = dict(rel_pos_spatial=True, rel_pos_temporal=True, residual_pooling=True) if v2 else {}
    torch.manual_seed(0)
    model = build_model("mvit_tiny", fused=True, **overrides).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.randn(2, 3, 8, 32, 32),), dynamic_shapes={"x": {0: batch}})
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"mvit_kernels.pool3d.default", "mvit_kernels.pool_residual_add.default"} <= ops
    for b in (1, 5):
        clip = torch.randn(b, 3, 8, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(clip), model(clip), atol=1e-5, rtol=1e-5)
