"""A whole model with fused=True (C++ CPU pooling ops + SDPA attention) against fused=False.

Float64 model and input, so the comparison can be tight (atol = rtol = 1e-10 would do; 1e-8 is
used): any difference is a bug, not rounding. Checked: logits and every parameter gradient, in
training mode (stochastic depth on, so pool_residual_add gets a per-sample scale) with the same
random stream in both runs.
"""

from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch

import mvit_kernels
from mvit import build_model
from mvit_kernels import reference


V2 = dict(rel_pos_spatial=True, rel_pos_temporal=True, residual_pooling=True, dim_mul_in_att=True, abs_pos="none")


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(pool_mode="max", cls_embed=False), dict(V2, residual_pooling_cls=True)],
    ids=["conv-cls", "max-nocls", "v2-residual-pooling-of-the-class-token"],
)
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


def test_mvitv2_l_at_312_px_pools_grids_its_tables_were_not_sized_for():
    """MViTv2-L 40x3's 78x78 grid pools to 39, 20 and 10, where the reference code sizes the rel-pos
    tables by floor division (19 at blocks 44-47): those tables are interpolated at run time. The
    preset's grid rules at 312 px, narrowed to 8 channels and 2 frames, fused against reference."""
    torch.manual_seed(0)
    ref = build_model("mvitv2_l_40x3", input_size=(2, 312, 312), embed_dim=8, num_classes=5,
                      drop_path_rate=0.0).double().train()
    fused = copy.deepcopy(ref).set_fused(True)
    assert ref.blocks[44].attn.rel_pos_h.shape[0] == 37  # 2 * 19 - 1, while k covers 20 rows there
    assert reference.rel_pos_table_length(10, 20) == 39
    video = torch.randn(1, 3, 2, 312, 312, dtype=torch.float64)
    results = []
    for model in (ref, fused):
        torch.manual_seed(1)
        logits = model(video)
        results.append((logits, torch.autograd.grad(logits.square().sum(), list(model.parameters()))))
    (logits_ref, grads_ref), (logits, grads) = results
    torch.testing.assert_close(logits, logits_ref, atol=1e-8, rtol=1e-8)
    for (name, _), g, g_ref in zip(ref.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-8, msg=lambda m: f"{name}: {m}")
    assert grads[[n for n, _ in ref.named_parameters()].index("blocks.44.attn.rel_pos_h")].abs().sum() > 0


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


def _rel_case(thw_q, thw_kv, axes, has_cls, B=2, heads=3, d=8, seed=3):
    """q (B, heads, N_q, d) as a strided view of a qkv-like tensor (the model's unpooled q), k, v and
    the tables of REL_CASES' axes, float64."""
    g = torch.Generator().manual_seed(seed)
    n_q = (1 if has_cls else 0) + thw_q[0] * thw_q[1] * thw_q[2]
    n_kv = (1 if has_cls else 0) + thw_kv[0] * thw_kv[1] * thw_kv[2]
    q = torch.randn(B, n_q, 3, heads, d, generator=g, dtype=torch.float64).permute(2, 0, 3, 1, 4)[0]
    k, v = (torch.randn(B, heads, n_kv, d, generator=g, dtype=torch.float64) for _ in range(2))
    tables = [torch.randn(2 * max(a, b) - 1 + (2 if i == 1 else 0), d, generator=g, dtype=torch.float64)
              if "thw"[i] in axes else None for i, (a, b) in enumerate(zip(thw_q, thw_kv))]
    return q, k, v, tables


def assert_gradients_strided_as_parameters(model):
    """DDP copies a gradient whose strides differ from its parameter's and warns in every run
    ("Grad strides do not match bucket view strides")."""
    for name, p in model.named_parameters():
        assert p.grad is None or p.grad.stride() == p.stride(), name


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("contiguous_grid", [False, True])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("batch", [1, 2])
def test_every_gradient_has_its_parameters_strides(fused, contiguous_grid, v2, batch, monkeypatch):
    # The conv pooling's weight gradient came back from the channels-last grid with strides
    # (27, 1, 9, 3, 1) for its (d, 1, 3, 3, 3) weight, the class token's position entry's as a
    # slice of the whole table's gradient, and at batch 1 the class token's as a slice of the input's.
    monkeypatch.setattr(reference, "pool3d", functools.partial(reference.pool3d, contiguous_grid=contiguous_grid))
    torch.manual_seed(0)
    model = build_model("mvit_tiny", fused=fused, **(V2 if v2 else {})).train()
    assert (model.pos_embed_class is None) == v2
    assert model.cfg.pool_mode == "conv"
    model(torch.randn(batch, 3, 8, 32, 32)).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert_gradients_strided_as_parameters(model)


def test_compiled_gradients_have_their_parameters_strides():
    # Under torch.compile the class token's, its position entry's and the conv pooling weights'
    # gradients came back strided otherwise too
    torch.manual_seed(0)
    model = build_model("mvit_tiny").train()
    torch.compile(model)(torch.randn(1, 3, 8, 32, 32)).square().sum().backward()
    assert_gradients_strided_as_parameters(model)
    double = copy.deepcopy(model).double()  # the hooks belong to the parameters: a copy has its own
    double(torch.randn(1, 3, 8, 32, 32, dtype=torch.float64)).sum().backward()
    assert_gradients_strided_as_parameters(double)


def _from_meta_assigned(state):
    with torch.device("meta"):
        model = build_model("mvit_tiny")
    model.load_state_dict(state, assign=True)
    return model


def _from_meta_emptied(state):
    with torch.device("meta"):
        model = build_model("mvit_tiny")
    model.to_empty(device="cpu").load_state_dict(state)
    return model


def _wrapped_and_assigned(state):
    # load_state_dict called on a module that holds the model, not on the model
    with torch.device("meta"):
        wrapper = torch.nn.Sequential(build_model("mvit_tiny"))
    wrapper.load_state_dict({f"0.{k}": v for k, v in state.items()}, assign=True)
    return wrapper[0]


def _pickled(state):
    model = build_model("mvit_tiny")
    model.load_state_dict(state)
    return pickle.loads(pickle.dumps(model))


def _converted_back_and_forth(state):
    model = build_model("mvit_tiny")
    model.load_state_dict(state)
    for _ in range(3):
        model.double().float()
    return model


@pytest.mark.parametrize(
    "make", [_from_meta_assigned, _from_meta_emptied, _wrapped_and_assigned, _pickled, _converted_back_and_forth]
)
def test_gradients_keep_their_strides_wherever_the_parameters_are_replaced(make):
    # The stride hooks belong to parameter objects; building on the meta device and then
    # assigning the weights (or to_empty) makes new ones, which had none.
    torch.manual_seed(0)
    state = build_model("mvit_tiny").state_dict()
    model = make(state).train()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, state[name], rtol=0, atol=0, msg=name)
        if 1 in p.shape:  # hooked once, however often the parameters were converted or loaded
            assert len(p._backward_hooks) == 1, name
    model(torch.randn(1, 3, 8, 32, 32)).square().sum().backward()
    assert_gradients_strided_as_parameters(model)


@pytest.mark.parametrize("thw_q, thw_kv, axes, has_cls", REL_CASES)
def test_rel_pos_mask_written_in_chunks_matches_the_reference_bias(thw_q, thw_kv, axes, has_cls):
    # The inference mask, written chunk by chunk of query rows into buffers of the chunk's shape
    # (one row; a chunk holding only the class token's row; uneven chunks; the whole), equals the
    # reference's bias with the class token's row and column zero.
    import torch.nn.functional as F

    from mvit_kernels import reference
    from mvit_kernels.pooling_attention import _rel_pos_term_rows, _write_rel_pos_mask

    q, k, _, tables = _rel_case(thw_q, thw_kv, axes, has_cls)
    want = reference.decomposed_rel_pos(q, thw_q, thw_kv, *tables, has_cls)
    want = F.pad(want, (1, 0, 1, 0)) if has_cls else want
    terms = _rel_pos_term_rows(q, thw_q, thw_kv, *tables, has_cls)
    n_q, n_kv = q.shape[2], k.shape[2]
    for rows in (1, 2, 5, n_q):
        got = torch.full_like(want, float("nan"))
        for r0 in range(0, n_q, rows):
            chunk = torch.full((*q.shape[:2], min(rows, n_q - r0), n_kv), float("nan"), dtype=q.dtype)
            _write_rel_pos_mask(chunk, *terms, r0, thw_kv, has_cls)
            got[:, :, r0:r0 + chunk.shape[2]] = chunk
        torch.testing.assert_close(got, want, msg=lambda m: f"rows={rows}: {m}")


@pytest.mark.parametrize("thw_q, thw_kv, axes, has_cls", REL_CASES)
@pytest.mark.parametrize("residual_pooling", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 1, 4], ids=["whole", "rows1", "rows4"])
@pytest.mark.parametrize("writer", ["cpp", "torch"])
def test_sdpa_rel_pos_inference_matches_the_reference(thw_q, thw_kv, axes, has_cls, residual_pooling, chunk_rows,
                                                      writer, monkeypatch):
    # Without gradients the SDPA path writes the mask itself (on CPU with the C++ op; the torch
    # writer is what CUDA tensors and builds without the extension take), whole or in query
    # chunks through one buffer (forced small here: CPU inference chunks only masks over 32 MiB);
    # with gradients it uses the reference's bias. Both equal reference.pooling_attention, and
    # with gradients so do the gradients of q, k, v and the tables.
    import importlib

    import torch.nn.functional as F

    from mvit_kernels import reference

    pa = importlib.import_module("mvit_kernels.pooling_attention")
    if writer == "torch":
        monkeypatch.setattr(pa._extension, "load", lambda: False)
    cpp_calls = []
    op = torch.ops.mvit_kernels.rel_pos_mask
    monkeypatch.setattr(torch.ops.mvit_kernels, "rel_pos_mask", lambda *a: cpp_calls.append(a[7]) or op(*a))
    q, k, v, tables = _rel_case(thw_q, thw_kv, axes, has_cls)
    B, heads, n_q, d = q.shape
    n_kv = k.shape[2]
    if chunk_rows is not None:
        monkeypatch.setattr(pa, "REL_POS_MASK_CHUNKED_ABOVE_BYTES", 0)
        monkeypatch.setattr(pa, "REL_POS_MASK_CHUNK_BYTES", B * heads * chunk_rows * n_kv * q.element_size())
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, attn_mask=None, **kw):
        calls.append(q.shape[2])
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(pa.F, "scaled_dot_product_attention", counting_sdpa)
    args = (list(thw_q), list(thw_kv), has_cls, *tables, residual_pooling)
    want = reference.pooling_attention(q, k, v, *args)
    with torch.no_grad():
        got = pa._sdpa_pooling_attention(q, k, v, *args)
    torch.testing.assert_close(got, want)
    rows = n_q if chunk_rows is None else -(-n_q // -(-n_q // chunk_rows))  # equal chunks
    assert calls == [min(rows, n_q - r0) for r0 in range(0, n_q, rows)]
    assert cpp_calls == (list(range(0, n_q, rows)) if writer == "cpp" else [])

    inputs = [t.detach().requires_grad_() for t in (q, k, v, *[t for t in tables if t is not None])]
    it = iter(inputs[3:])
    tables_g = [None if t is None else next(it) for t in tables]
    args_g = (list(thw_q), list(thw_kv), has_cls, *tables_g, residual_pooling)
    dout = torch.randn_like(want)
    got = pa._sdpa_pooling_attention(*inputs[:3], *args_g)
    want = reference.pooling_attention(*inputs[:3], *args_g)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, inputs, dout), torch.autograd.grad(want, inputs, dout)):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("qkv_grad", [False, True], ids=["tables-only", "with-qkv"])
def test_empty_batch_gives_the_tables_zero_gradients(qkv_grad):
    # SDPA's backward of an empty batch dropped the mask from the graph: the tables got no
    # gradient at all (an error from autograd.grad, None from backward) instead of zeros.
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(0, 2, 1 + 2 * 2 * 2, 4, generator=g).requires_grad_(qkv_grad) for _ in range(3))
    tables = [torch.randn(n, 4, generator=g).requires_grad_() for n in (3, 3, 3)]
    for op in (reference.pooling_attention, mvit_kernels.pooling_attention):
        out = op(q, k, v, (2, 2, 2), (2, 2, 2), True, *tables, residual_pooling=True)
        assert out.shape == (0, 9, 8)
        for grad in torch.autograd.grad(out.sum(), tables):
            assert grad.shape == (3, 4) and not grad.any()


def test_rel_pos_mask_chunks_on_cpu_only_above_32_mib():
    # The rule's arithmetic on shapes alone (stride-0 tensors hold no memory): MViTv2-S's block 1
    # (2 heads, 6273 queries, 1569 keys: 78.8 MB fp32) runs in 5 equal chunks of at most 16 MiB;
    # block 14 (8 heads, 393 x 1569: 19.7 MB) and any mask off the CPU run whole; at batch 4 block 14
    # chunks too.
    from mvit_kernels.pooling_attention import REL_POS_MASK_CHUNK_BYTES, _mask_rows_per_chunk

    def q(B, heads, n_q, device="cpu"):
        return torch.empty(1, device=device).expand(B, heads, n_q, 96)

    assert _mask_rows_per_chunk(q(1, 8, 393), 1569) == 393
    rows = _mask_rows_per_chunk(q(1, 2, 6273), 1570)
    assert rows == 1255 and 2 * rows * 1570 * 4 <= REL_POS_MASK_CHUNK_BYTES
    assert _mask_rows_per_chunk(q(1, 2, 6273, "meta"), 1570) == 6273
    assert _mask_rows_per_chunk(q(4, 8, 393), 1569) == 79  # the batch counts: 78.9 MB in 5 chunks


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
    # MViTv2 inference on CPU runs the rel-pos attention as one registered op (the mask written
    # out= views of it, in chunks); torch.compile (fullgraph) must trace it and agree with eager.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model("mvit_tiny", drop_path_rate=0.0, fused=True, **V2).eval()
    clip = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(clip), model(clip), atol=1e-5, rtol=1e-5)


def test_rel_pos_attention_is_one_registered_op_under_compile():
    # Inference under torch.compile runs the rel-pos SDPA as the registered op (Inductor's own loop
    # for the mask's sum was 3x slower on CPU); opcheck covers its fake implementation.
    import importlib

    pa = importlib.import_module("mvit_kernels.pooling_attention")  # the module, not the function

    thw_q, thw_kv = (2, 4, 4), (2, 2, 2)
    q, k, v, tables = _rel_case(thw_q, thw_kv, "thw", True, seed=4)
    q, k, v = (t.float() for t in (q, k, v))
    tables = [t.float() for t in tables]
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    def run(q):
        return pa._sdpa_pooling_attention(q, k, v, list(thw_q), list(thw_kv), True, *tables, True)

    with torch.no_grad():
        want = run(q)
        got = torch.compile(run, fullgraph=True, backend=backend)(q)
    torch.testing.assert_close(got, want)
    assert "mvit_kernels.sdpa_rel_pos_inference.default" in seen, seen
    torch.library.opcheck(pa._sdpa_rel_pos_inference_op, (q, k, v, *tables, list(thw_q), list(thw_kv), True, True))
    torch.library.opcheck(pa._sdpa_rel_pos_inference_op,
                          (q, k, v, None, *tables[1:], list(thw_q), list(thw_kv), True, False))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_compile_dynamic_shapes_fullgraph(v2):
    # torch.compile(dynamic=True) makes a module's floats symbolic too: the pool norms' eps was
    # checked with math.isfinite, a graph break per pooled tensor (36 in mvit_tiny), after which
    # every block recompiled per instance past Dynamo's recompile limit. fullgraph=True fails on
    # any break; one compiled graph then serves two batch sizes, forward and backward.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model("mvit_tiny", drop_path_rate=0.0, fused=True, **(V2 if v2 else {}))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (2, 3):
        clip = torch.randn(batch, 3, 8, 32, 32)
        got, want = compiled(clip), model(clip)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        grads = [torch.autograd.grad(out.square().sum(), model.patch_embed.proj.weight)[0] for out in (got, want)]
        torch.testing.assert_close(*grads, atol=1e-4, rtol=1e-4)


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
