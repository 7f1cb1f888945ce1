"""How the ops and the model meet PyTorch's machinery, on CPU tensors (the Triton ops through the
interpreter, as tests/conftest.py sets up):

- ``torch.library.opcheck`` on every op registered under ``torch.ops.mvit_kernels`` (the list is
  read from the dispatcher, so a new op without a case here fails), with non-contiguous inputs,
  with and without the class token, batch 1, float32 / float64 / bfloat16 where the op takes them;
- the fake implementations: outputs of the real op's shape, strides and dtype, and the real op's
  errors for arguments it refuses;
- ``torch.func`` transforms (grad, vmap) of the fused model against the reference model;
- whole-model behaviours: state_dict, deepcopy / torch.save, dtype conversions, input layouts and
  the gradient with respect to the input, fused against reference.

Tolerances: float64 models agree to 1e-8 (any difference is a bug, not rounding); float32 to
1e-5, bfloat16 to 5e-2.
"""

from __future__ import annotations

import copy
import importlib
import io

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mvit_kernels
from mvit import build_model
from mvit_kernels import _extension, reference

pytestmark = pytest.mark.skipif(not _extension.load(), reason="needs the C++ extension")

# The modules, not the functions of the same names that mvit_kernels exports.
pa = importlib.import_module("mvit_kernels.pooling_attention")
pp = importlib.import_module("mvit_kernels.pooled_projection")
lin = importlib.import_module("mvit_kernels.linear")
ops = torch.ops.mvit_kernels

V2 = dict(rel_pos_spatial=True, rel_pos_temporal=True, residual_pooling=True, dim_mul_in_att=True, abs_pos="none")

# Ops with no tensor arguments: nothing for opcheck to check.
NO_TENSORS = {"built_with_cuda", "built_with_cpu_threads"}


def _registered_ops() -> set[str]:
    return {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mvit_kernels::")}


def _strided(t: torch.Tensor) -> torch.Tensor:
    """t's values in a non-contiguous layout (dims 0 and 1 swapped in memory), last dim contiguous."""
    order = (1, 0) + tuple(range(2, t.dim()))
    return t.permute(order).contiguous().permute(order)


def _rand(g, *shape, dtype=torch.float32, strided=False):
    t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return _strided(t) if strided else t


def _leaves(*tensors):
    return [None if t is None else t.requires_grad_() for t in tensors]


def _detached(args):
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


# --------------------------------------------------------------------------------------------
# One builder per op: (dtype, batch, has_cls, strided, seed) -> the op's positional arguments.
# The backward ops' incoming gradients take the forward's output shape.
# --------------------------------------------------------------------------------------------

THW, KERNEL, STRIDE, PAD = [3, 4, 5], [3, 3, 3], [1, 2, 2], [1, 1, 1]


def _pool3d_args(dtype, B, has_cls, strided, seed, mode="conv"):
    g = torch.Generator().manual_seed(seed)
    d = 4
    x = _rand(g, B, 2, 60 + has_cls, d, dtype=dtype, strided=strided)
    w = _rand(g, d, 1, *KERNEL, dtype=dtype) if mode == "conv" else None
    nw, nb = _rand(g, d, dtype=dtype), _rand(g, d, dtype=dtype)
    x, w, nw, nb = _leaves(x, w, nw, nb)
    return (x, THW, KERNEL, STRIDE, PAD, mode, w, has_cls, nw, nb, 1e-6)


def _backward_args(forward, forward_args):
    """A backward op's arguments: a random gradient of forward's output, then forward's arguments."""
    def make(dtype, B, has_cls, strided, seed):
        args = _detached(forward_args(dtype, B, has_cls, strided, seed))
        y = forward(*args)
        gy = _rand(torch.Generator().manual_seed(seed + 1), *y.shape, dtype=dtype, strided=strided)
        return (gy, *args)
    return make


def _pool_residual_add_args(dtype, B, has_cls, strided, seed):
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, B, 60 + has_cls, 8, dtype=dtype, strided=strided)
    branch = _rand(g, B, 3 * 2 * 3 + has_cls, 8, dtype=dtype, strided=strided)
    scale = torch.rand(B, generator=g, dtype=torch.float64).to(dtype) if seed % 2 else None
    x, branch, scale = _leaves(x, branch, scale)
    return (x, THW, [1, 3, 3], [1, 2, 2], [0, 1, 1], branch, scale, has_cls)


def _pool_residual_add_backward_args(dtype, B, has_cls, strided, seed):
    x, thw, k, s, p, branch, scale, has_cls = _detached(_pool_residual_add_args(dtype, B, has_cls, strided, seed))
    grad = _rand(torch.Generator().manual_seed(seed + 1), *branch.shape, dtype=dtype, strided=strided)
    return (grad, x, thw, k, s, p, branch, scale, has_cls)


THW_Q, THW_KV = [2, 3, 3], [2, 2, 2]


def _attention_inputs(dtype, B, has_cls, strided, seed, d=16):
    g = torch.Generator().manual_seed(seed)
    n_q, n_kv = 18 + has_cls, 8 + has_cls
    q = _rand(g, B, 2, n_q, d, dtype=dtype, strided=strided)
    k = _rand(g, B, 2, n_kv, d, dtype=dtype, strided=strided)
    v = _rand(g, B, 2, n_kv, d, dtype=dtype, strided=strided)
    lengths = [2 * max(a, b) - 1 for a, b in zip(THW_Q, THW_KV)]
    # Spatial tables always, the temporal one on odd seeds.
    tables = [_rand(g, n, d, dtype=dtype) if (axis or seed % 2) else None for axis, n in enumerate(lengths)]
    return q, k, v, tables


def _rel_pos_mask_args(dtype, B, has_cls, strided, seed):
    q, _, _, tables = _attention_inputs(dtype, B, has_cls, strided, seed)
    gathered = reference.rel_pos_tables(THW_Q, THW_KV, *tables)
    row0, rows = (1, 7) if seed % 2 else (0, q.shape[2])
    out = torch.empty(B, 2, rows, 8 + has_cls, dtype=dtype)
    return (q, *gathered, THW_Q, THW_KV, has_cls, row0, out)


def _sdpa_rel_pos_inference_args(dtype, B, has_cls, strided, seed):
    q, k, v, tables = _attention_inputs(dtype, B, has_cls, strided, seed)
    return (q, k, v, *tables, THW_Q, THW_KV, has_cls, bool(seed % 2))


def _attention_triton_args(dtype, B, has_cls, strided, seed):
    q, k, v, tables = _attention_inputs(dtype, B, has_cls, strided, seed)
    q, k, v, *tables = _leaves(q, k, v, *tables)
    return (q, k, v, *tables, THW_Q, THW_KV, has_cls, bool(seed % 2), True)


def _attention_triton_backward_args(dtype, B, has_cls, strided, seed):
    q, k, v, t, h, w, thw_q, thw_kv, has_cls, residual, _ = _detached(
        _attention_triton_args(dtype, B, has_cls, strided, seed))
    out, lse, rel, o_attn = pa._fwd_op(q, k, v, t, h, w, thw_q, thw_kv, has_cls, residual, True)
    dout = _rand(torch.Generator().manual_seed(seed + 1), *out.shape, dtype=dtype, strided=strided)
    return (dout, q, k, v, o_attn if residual else out, lse, rel, t, h, w, thw_q, thw_kv, has_cls, residual)


def _projection_triton_args(dtype, B, has_cls, strided, seed):
    g = torch.Generator().manual_seed(seed)
    C, heads, A = 8, 2, 8
    mode = ("conv", "max")[seed % 2]
    x = _rand(g, B, 50 + has_cls, C, dtype=dtype, strided=strided)
    w = _rand(g, C, 3 * A, dtype=dtype).t() if strided else _rand(g, 3 * A, C, dtype=dtype)
    b = _rand(g, 3 * A, dtype=dtype)
    pw = _rand(g, A // heads, 1, 1, 3, 3, dtype=dtype) if mode == "conv" else None
    nw, nb = _rand(g, A // heads, dtype=dtype), _rand(g, A // heads, dtype=dtype)
    x, w, b, pw, nw, nb = _leaves(x, w, b, pw, nw, nb)
    return (x, w, b, pw, nw, nb, "k", heads, [2, 5, 5], [1, 3, 3], [1, 4, 4], [0, 1, 1], mode, has_cls, 1e-6)


def _linear_onednn_args(dtype, B, has_cls, strided, seed):
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, B, 5 + has_cls, 8, dtype=dtype, strided=strided)
    w = _rand(g, 8, 6, dtype=dtype).t() if strided else _rand(g, 6, 8, dtype=dtype)
    return (x, w, _rand(g, 6, dtype=dtype) if seed % 2 else None, bool(seed % 2))


ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# (op name, callable, builder, dtypes). The Triton ops run in the interpreter (slow): fewer cases.
CASES = [
    ("pool3d", ops.pool3d.default, _pool3d_args, ALL_DTYPES),
    ("pool3d_backward", ops.pool3d_backward.default, _backward_args(ops.pool3d, _pool3d_args), ALL_DTYPES),
    ("pool_residual_add", ops.pool_residual_add.default, _pool_residual_add_args, ALL_DTYPES),
    ("pool_residual_add_backward", ops.pool_residual_add_backward.default, _pool_residual_add_backward_args, ALL_DTYPES),
    ("rel_pos_mask", ops.rel_pos_mask.default, _rel_pos_mask_args, ALL_DTYPES),
    ("sdpa_rel_pos_inference", pa._sdpa_rel_pos_inference_op, _sdpa_rel_pos_inference_args, ALL_DTYPES),
    ("linear_onednn", lin._linear_onednn_op, _linear_onednn_args, (torch.float32,)),
    ("pooling_attention_triton", pa._fwd_op, _attention_triton_args, (torch.bfloat16,)),
    ("pooling_attention_triton_backward", pa._bwd_op, _attention_triton_backward_args, (torch.float32,)),
    ("pooled_projection_triton", pp._fwd_op, _projection_triton_args, (torch.bfloat16,)),
    ("pooled_projection_triton_backward", pp._bwd_op, _backward_args(pp._fwd_op, _projection_triton_args), (torch.float32,)),
]
TRITON_OPS = {name for name, *_ in CASES if "triton" in name}


def _params():
    for name, op, build, dtypes in CASES:
        if name in TRITON_OPS:  # one case: non-contiguous, batch 1, no class token
            variants = [(dtypes[0], 1, False, True, 1)]
        else:
            variants = [(dtype, B, has_cls, strided, seed)
                        for seed, (dtype, B, has_cls, strided) in enumerate(
                            [(dtype, 1, False, True) for dtype in dtypes] + [(torch.float32, 2, True, False),
                                                                           (torch.float32, 2, False, True)])]
        for dtype, B, has_cls, strided, seed in variants:
            dt = str(dtype).removeprefix("torch.")
            yield pytest.param(op, build, dtype, B, has_cls, strided, seed,
                               id=f"{name}-{dt}-B{B}-{'cls' if has_cls else 'nocls'}-{'strided' if strided else 'dense'}"
                                  f"-{seed}")


def test_every_registered_op_has_an_opcheck_case():
    covered = {name for name, *_ in CASES}
    assert _registered_ops() - NO_TENSORS == covered, "give every op in torch.ops.mvit_kernels a case in CASES"


def _fake_outputs(op, args):
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    return out


def _as_tuple(out):
    return () if out is None else tuple(out) if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("op, build, dtype, B, has_cls, strided, seed", list(_params()))
def test_opcheck_and_fake_layout(op, build, dtype, B, has_cls, strided, seed):
    args = build(dtype, B, has_cls, strided, seed)
    torch.library.opcheck(op, args)
    # opcheck compares shapes and dtypes of fake and real outputs; the strides too, here.
    real = _as_tuple(op(*_detached(args)))
    fake = _as_tuple(_fake_outputs(op, _detached(args)))
    assert len(real) == len(fake)
    for i, (r, f) in enumerate(zip(real, fake)):
        assert (r.shape, r.dtype) == (f.shape, f.dtype), i
        if r.numel() > 1:
            assert r.stride() == f.stride(), (i, r.stride(), f.stride())


# Arguments the C++ pool ops refuse: (op, change to the valid arguments, the op's message).
BAD_ARGS = [
    ("pool3d", lambda a: a.__setitem__(1, [3, 4, 4]), r"x has 61 tokens but thw=.*3, 4, 4.* implies 49"),
    ("pool3d", lambda a: a.__setitem__(0, a[0][0]), r"x must be a 4-D tensor"),
    ("pool3d", lambda a: a.__setitem__(6, None), r"mode='conv' needs weight"),
    ("pool3d", lambda a: a.__setitem__(5, "sum"), r"mode must be one of"),
    ("pool3d_backward", lambda a: a.__setitem__(0, a[0][:, :, :5]), r"grad_y must have shape"),
    ("pool_residual_add", lambda a: a.__setitem__(5, a[5][:, :5]), r"branch must have shape"),
    ("pool_residual_add", lambda a: a.__setitem__(6, torch.ones(3)), r"scale must have shape"),
    ("pool_residual_add_backward", lambda a: a.__setitem__(0, a[0][:, :5]), r"grad_out must have shape"),
    # sizes whose products overflowed: thw wrapped to 0 tokens in int64 (a segfault), a kernel
    # of 2^61 reached the 32-bit window loops as 0 (a division by zero)
    ("pool3d", lambda a: a.__setitem__(1, [2**32, 2**32, 1]), r"thw must hold at most 2\^31 - 1 positions"),
    ("pool3d", lambda a: (a.__setitem__(2, [2**61, 1, 1]), a.__setitem__(4, [2**60, 0, 0])),
     r"kernel must have at most 2\^31 - 1 taps"),
    ("pool_residual_add", lambda a: a.__setitem__(2, [1, 2**40, 2**40]), r"kernel must have at most 2\^31 - 1 taps"),
    ("rel_pos_mask", lambda a: a.__setitem__(8, torch.empty(1, 2, 7, 3)), r"out must be \(1, 2, rows, 9\)"),
    # The ops registered in Python checked nothing: wrong arguments gave an output (on a GPU, the
    # kernels read out of bounds).
    ("sdpa_rel_pos_inference", lambda a: a.__setitem__(6, [8, 1]), r"thw must have 3 entries"),
    ("linear_onednn", lambda a: a.__setitem__(1, a[1].reshape(6, 4, 2)), r"weight must be 2-D"),
    ("pooling_attention_triton", lambda a: a.__setitem__(7, [3, 3, 3]), r"k has 9 tokens but thw=\(3, 3, 3\)"),
    ("pooling_attention_triton", lambda a: (a.__setitem__(1, a[1][..., :8]), a.__setitem__(2, a[2][..., :8])),
     r"must agree on batch, heads and head_dim"),
    ("pooling_attention_triton", lambda a: a.__setitem__(4, torch.randn(7, 16)), r"rel_pos_h must have 5 rows"),
    ("pooling_attention_triton_backward", lambda a: a.__setitem__(0, a[0][:, :5]), r"dout must have shape"),
    ("pooled_projection_triton", lambda a: a.__setitem__(12, "sum"), r"mode must be one of"),
    ("pooled_projection_triton", lambda a: a.__setitem__(6, "z"), r"which must be one of"),
    ("pooled_projection_triton", lambda a: a.__setitem__(1, a[1][:, :4]), r"weight has 4 input channels"),
    ("pooled_projection_triton", lambda a: a.__setitem__(8, [4, 5, 5]), r"x has 51 tokens but thw=\(4, 5, 5\)"),
    ("pooled_projection_triton_backward", lambda a: a.__setitem__(0, a[0][:, :, :5]), r"grad_y must have shape"),
]


def test_every_registered_op_has_a_bad_argument_case():
    assert {name for name, *_ in CASES} - {name for name, *_ in BAD_ARGS} == set()


@pytest.mark.parametrize("name, change, match", BAD_ARGS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_ARGS)])
def test_fake_implementations_refuse_what_the_op_refuses(name, change, match):
    # Before: the fakes gave any arguments an output shape (or failed unpacking a 3-D x), so
    # torch.compile / torch.export traced a call the op refuses, which failed only when run.
    build = {n: b for n, _, b, _ in CASES}[name]
    args = list(_detached(build(torch.float32, 1, True, False, 1)))
    change(args)
    op = getattr(ops, name).default
    with pytest.raises(RuntimeError, match=match):
        op(*args)
    with pytest.raises(RuntimeError, match=f"^mvit_kernels.{name}: .*{match}"):
        _fake_outputs(op, args)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _pair(overrides, dtype=torch.float64, **extra):
    torch.manual_seed(0)
    ref = build_model("mvit_tiny", drop_path_rate=0.0, **overrides, **extra).to(dtype).eval()
    return ref, copy.deepcopy(ref).set_fused(True)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_torch_func_grad_and_vmap_of_the_fused_model(v2, compiled):
    # Before: the fused ops' autograd (the eager Functions, torch.library's registered autograd)
    # has no setup_context, so torch.func.grad / vmap of a fused model failed inside torch ("In
    # order to use an autograd.Function with functorch transforms ..."). Under a transform the
    # fused ops now run their references: per-sample gradients equal the reference model's.
    # Compiled, the fallback was skipped while Dynamo traced (the same error; SDPA's mask "cannot
    # have requires_grad"), and the class-token row's SDPA had no double backward for
    # AOTAutograd's joint graph.
    from torch.func import functional_call, grad, vmap

    ref, fused = _pair(V2 if v2 else {})
    x = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def run(fn):
        if not compiled:
            return fn()
        torch._dynamo.reset()
        return torch.compile(fn, backend="aot_eager", fullgraph=True)()

    def per_sample_grads(model):
        def loss(p, clip):
            return functional_call(model, p, (clip[None],)).square().sum()

        return vmap(grad(loss), in_dims=(None, 0))(params, x)

    def input_grad(model):  # parameters require grad: a compiled joint graph differentiates the backward
        return grad(lambda c: model(c).square().sum())(x)

    want, got = per_sample_grads(ref), run(lambda: per_sample_grads(fused))
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-8, rtol=1e-8, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(run(lambda: input_grad(fused)), input_grad(ref), atol=1e-8, rtol=1e-8)
    with torch.no_grad():
        batched = run(lambda: vmap(lambda clip: fused(clip))(x[:, None]))
        torch.testing.assert_close(batched[:, 0], ref(x), atol=1e-8, rtol=1e-8)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # sizes read as Python values, as on the reference path
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_torch_jit_trace_of_the_fused_model(v2):
    # Before: "unsupported input list type: Scalar?" from the oneDNN linear's op while tracing.
    # Traced, the fused ops take their plain paths, the C++ pool ops recorded as themselves. The
    # trace serves other batch sizes (not other input sizes, like the reference path's).
    ref, fused = _pair(V2 if v2 else {}, torch.float32)
    with torch.no_grad():
        traced = torch.jit.trace(fused, torch.randn(1, 3, 8, 32, 32), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        for batch in (1, 3):
            x = torch.randn(batch, 3, 8, 32, 32)
            want = ref(x)
            for module in (traced, loaded):
                torch.testing.assert_close(module(x), want, atol=1e-5, rtol=1e-5)
    recorded = {n.kind() for n in traced.inlined_graph.nodes() if n.kind().startswith("mvit_kernels::")}
    assert {"mvit_kernels::pool3d", "mvit_kernels::pool_residual_add"} <= recorded


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_state_dict_deepcopy_and_save_across_fused(v2):
    ref, fused = _pair(V2 if v2 else {}, torch.float32)
    x = torch.randn(2, 3, 8, 32, 32)
    sd_ref, sd_fused = ref.state_dict(), fused.state_dict()
    assert list(sd_ref) == list(sd_fused)
    assert all(sd_ref[k].shape == sd_fused[k].shape for k in sd_ref)
    other = build_model("mvit_tiny", fused=True, **(V2 if v2 else {})).eval()
    other.load_state_dict(sd_ref)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.fused
    with torch.no_grad():
        want = ref(x)
        for model in (fused, other, loaded, copy.deepcopy(fused)):
            torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_model_dtype_conversion_fused_and_reference(dtype):
    ref, fused = _pair(V2, torch.float32)
    ref, fused = ref.to(dtype), fused.to(dtype)
    x = torch.randn(2, 3, 8, 32, 32).to(dtype)
    with torch.no_grad():
        want, got = ref(x), fused(x)
    assert want.dtype == got.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 5e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_input_layouts_and_input_gradient(v2):
    ref, fused = _pair(V2 if v2 else {})
    x = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
    layouts = [x.contiguous(memory_format=torch.channels_last_3d), x.transpose(3, 4).contiguous().transpose(3, 4),
               x[:1].expand(2, -1, -1, -1, -1)]
    with torch.no_grad():
        for clip in layouts:
            torch.testing.assert_close(fused(clip), ref(clip), atol=1e-8, rtol=1e-8)
    grads = []
    for model, clip in ((ref, x), (fused, x), (fused, layouts[0])):
        leaf = clip.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        model(leaf).square().sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-8, rtol=1e-8)
