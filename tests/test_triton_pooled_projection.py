"""The Triton pooled Q/K/V projection against ``mvit_kernels.reference.pooled_projection``:
forward and every gradient (x, weight, bias, pool_weight, norm weight/bias; modes conv and avg
all three modes through the Triton backward kernel, max's ties as torch breaks them), the registered ops
(opcheck of the forward and backward ops, torch.compile, FLOP formulas), the dispatch rule and
the argument checks.

In CI the kernel runs in the Triton interpreter on CPU tensors, float32 (the interpreter's
tl.dot is a numpy fp32 matmul). Tolerances: atol = rtol = 1e-4 for the forward and the
gradients; observed errors are ~1e-6 before and ~1e-5 after the LayerNorm (which divides by
the standard deviation over d); one float16 forward is held to 2e-2 of a float64 reference,
and the float16 (bfloat16 on a GPU) output and gradients to 2e-2 or 1.5x the reference's own
error in that dtype.
Sizes are small because the interpreter is slow. On a GPU machine with TRITON_INTERPRET=0 the
same tests run the compiled kernel on CUDA tensors with TF32 off (IEEE fp32 dots)."""

import importlib
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mvit_kernels import reference
from mvit_kernels.triton import pooled_projection as kernels
from mvit_kernels.triton.pooling_attention import RULES
from test_pooled_projection import make_inputs as op_inputs
from test_pooled_projection import outputs_and_gradients, run

# The module, not the function of the same name that mvit_kernels exports.
pp = importlib.import_module("mvit_kernels.pooled_projection")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = [
    pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                       reason="needs the Triton interpreter (CPU tensors) or a GPU with TRITON_INTERPRET=0"),
    pytest.mark.usefixtures("ieee_fp32"),  # conftest.py
]
TOL = dict(atol=1e-4, rtol=1e-4)
K3, P1 = (3, 3, 3), (1, 1, 1)


@pytest.fixture
def backward_launches(monkeypatch):
    """How many times the Triton backward kernel's launcher ran (every mode's gradients come from it)."""
    calls = []
    launcher = kernels.backward

    def counted(*args, **kwargs):
        calls.append(args[10])  # the mode
        return launcher(*args, **kwargs)

    monkeypatch.setattr(kernels, "backward", counted)
    return calls


def make_inputs(B, heads, d, C, thw, kernel, mode, has_cls, norm, strided=False, seed=0):
    """The op's random inputs (tests/test_pooled_projection.py) in float32 on DEVICE."""
    return op_inputs(B, heads, d, C, thw, mode, has_cls, norm, dtype=torch.float32, device=DEVICE, seed=seed,
                     kernel=kernel, strided=strided)


def check_against_reference(fn, inputs, which, heads, thw, kernel, stride, padding, mode, has_cls):
    args = (which, heads, thw, kernel, stride, padding, mode, has_cls)
    got, got_thw = run(fn, inputs, *args)
    want, want_thw = run(reference.pooled_projection, inputs, *args)
    assert got_thw == want_thw
    torch.testing.assert_close(got, want, **TOL)
    leaves = [t for t in inputs.values() if t is not None]
    grad_y = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, leaves, grad_y)
    want_grads = torch.autograd.grad(want, leaves, grad_y)
    for name, a, b in zip([k for k, t in inputs.items() if t is not None], got_grads, want_grads):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"grad of {name}: {m}")


STRIDES = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8), (2, 2, 2)]
MODE_CASES = [(m, c, n) for m in ("conv", "avg", "max") for c in (True, False) for n in (True, False)]


@pytest.mark.parametrize("mode,has_cls,norm", MODE_CASES,
                         ids=[f"{m}-{'cls' if c else 'nocls'}-{'ln' if n else 'noln'}" for m, c, n in MODE_CASES])
def test_modes_class_token_and_norm(mode, has_cls, norm, backward_launches):
    i = MODE_CASES.index((mode, has_cls, norm))
    stride, which, heads = STRIDES[i % len(STRIDES)], "qkv"[i % 3], 1 + i % 4
    # torch's CPU avg_pool3d rejects an axis shorter than the kernel even with padding.
    thw = (2, 4, 5) if stride[0] == 1 and mode != "avg" else (3, 4, 5)
    inputs = make_inputs(1 + i % 2, heads, 16, 12, thw, K3, mode, has_cls, norm, seed=i)
    check_against_reference(pp.triton_pooled_projection, inputs, which, heads, thw, K3, stride, P1, mode, has_cls)
    assert backward_launches == [mode]  # the gradients came from the Triton backward kernel


@pytest.mark.parametrize("has_cls", [True, False])
def test_max_ties_go_to_the_first_tap_like_torch(has_cls):
    # Tokens repeated along w (pairs) and h (pairs) give windows with equal projections, exactly
    # equal because x, W and the bias are small multiples of 1/8 (every sum is exact in fp32,
    # whatever order a matmul adds in): torch's max_pool3d takes the first maximum in (t, h, w)
    # order and so must the kernel, in the forward and in where the backward sends the gradient
    # (x's gradient shows the tap taken).
    g = torch.Generator().manual_seed(11)
    thw, heads, d, C = (2, 6, 6), 2, 16, 8

    def eighths(*shape):
        return torch.randint(-8, 9, shape, generator=g).float() / 8

    grid = eighths(1, thw[0], thw[1] // 2, 1, thw[2] // 2, 1, C).expand(-1, -1, -1, 2, -1, 2, -1).reshape(1, -1, C)
    x = torch.cat([eighths(1, 1, C), grid], 1) if has_cls else grid
    inputs = make_inputs(1, heads, d, C, thw, K3, "max", has_cls, True, seed=11)
    inputs.update(x=x, weight=eighths(3 * heads * d, C), bias=eighths(3 * heads * d))
    inputs.update({k: inputs[k].to(DEVICE).requires_grad_() for k in ("x", "weight", "bias")})
    check_against_reference(pp.triton_pooled_projection, inputs, "k", heads, thw, K3, (1, 2, 2), P1, "max", has_cls)


# (B, heads, d, C, thw, kernel, stride, padding, mode, which): every stride with kernel 3 on odd
# and MViT-like grids, kernel 1, kernel 3 without padding, head_dim 96 (padded to 128).
SHAPE_CASES = [
    (1, 2, 16, 20, (3, 5, 7), K3, (1, 1, 1), P1, "conv", "k"),
    (2, 1, 16, 8, (3, 5, 7), K3, (1, 2, 2), P1, "max", "v"),
    (1, 3, 16, 12, (2, 9, 9), K3, (1, 4, 4), P1, "conv", "q"),
    (1, 4, 16, 40, (2, 16, 16), K3, (1, 8, 8), P1, "conv", "k"),
    (1, 2, 16, 12, (3, 5, 7), K3, (2, 2, 2), P1, "avg", "v"),
    (2, 2, 16, 12, (2, 3, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), "conv", "q"),
    (1, 2, 16, 12, (3, 5, 7), K3, (1, 2, 2), (0, 0, 0), "conv", "k"),
    (1, 1, 96, 40, (1, 8, 8), K3, (1, 8, 8), P1, "conv", "v"),
    (1, 2, 16, 12, (1, 6, 7), (1, 3, 3), (1, 4, 4), (0, 1, 1), "conv", "k"),  # image presets' block 0
    (1, 2, 72, 24, (2, 8, 8), K3, (1, 8, 8), P1, "conv", "v"),  # MViTv2-L's head 72: a constant HEAD_DIM
]


@pytest.mark.parametrize("case", SHAPE_CASES, ids=lambda c: f"thw{c[4]}-k{c[5][0]}-s{c[6]}-p{c[7][0]}-d{c[2]}-h{c[1]}")
def test_strides_kernels_and_shapes(case):
    B, heads, d, C, thw, kernel, stride, padding, mode, which = case
    inputs = make_inputs(B, heads, d, C, thw, kernel, mode, True, True, seed=1)
    check_against_reference(pp.triton_pooled_projection, inputs, which, heads, thw, kernel, stride, padding, mode, True)


def test_non_contiguous_x():
    inputs = make_inputs(2, 2, 16, 24, (1, 8, 8), K3, "conv", True, True, strided=True, seed=2)
    assert not inputs["x"].is_contiguous()
    check_against_reference(pp.triton_pooled_projection, inputs, "k", 2, (1, 8, 8), K3, (1, 4, 4), P1, "conv", True)


def test_linear_without_bias():
    inputs = make_inputs(1, 2, 16, 12, (1, 8, 8), K3, "conv", True, True, seed=7)
    inputs["bias"] = None
    check_against_reference(pp.triton_pooled_projection, inputs, "q", 2, (1, 8, 8), K3, (1, 4, 4), P1, "conv", True)


def test_float16_forward_close_to_float64():
    # Half-precision inputs, fp32 accumulation. float16, not bfloat16: the interpreter's bf16
    # tl.dot returns garbage (a plain 16x16 bf16 dot is off by 1e10 there), fp16 is exact.
    inputs = make_inputs(1, 2, 96, 40, (1, 8, 8), K3, "conv", True, True, seed=8)
    args = ("k", 2, (1, 8, 8), K3, (1, 4, 4), P1, "conv", True)
    got, _ = run(pp.triton_pooled_projection, {k: t.detach().half() for k, t in inputs.items()}, *args)
    want, _ = run(reference.pooled_projection, {k: t.detach().double() for k, t in inputs.items()}, *args)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("mode", ["conv", "avg", "max"])
def test_half_precision_gradients_close_to_float64(mode):
    # The 16-bit backward: float16 in the interpreter (see above), bfloat16 on a GPU. Every
    # gradient within 2e-2 of float64 (relative norm), or no worse than 1.5x the reference's own
    # error when run in the same dtype, where rounding alone exceeds that.
    low_dtype = torch.float16 if INTERPRET else torch.bfloat16
    thw = (3, 5, 6)  # avg needs every axis at least the kernel
    inputs = make_inputs(1, 2, 96, 40, thw, K3, mode, True, True, seed=9)
    low = {k: None if t is None else t.detach().to(low_dtype).requires_grad_() for k, t in inputs.items()}
    high = {k: None if t is None else t.detach().double().requires_grad_() for k, t in low.items()}
    args = ("v", 2, thw, K3, (1, 2, 2), P1, mode, True)
    got, _ = run(pp.triton_pooled_projection, low, *args)
    # torch's CPU avg_pool3d has no float16: that reference runs in float32 on the same values.
    cpu_avg = not low["x"].is_cuda and mode == "avg"
    same, _ = run(reference.pooled_projection,
                  {k: t.float() if cpu_avg and t is not None else t for k, t in low.items()}, *args)
    want, _ = run(reference.pooled_projection, high, *args)
    assert got.dtype == low_dtype

    def rel_err(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel_err(got, want) <= max(2e-2, 1.5 * rel_err(same, want))
    names = [k for k, t in low.items() if t is not None]
    grad_y = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(want.device)
    grads = torch.autograd.grad(got, [low[k] for k in names], grad_y.to(low_dtype))
    ref_grads = torch.autograd.grad(same, [low[k] for k in names], grad_y.to(low_dtype))
    want_grads = torch.autograd.grad(want, [high[k] for k in names], grad_y)
    for name, a, r, b in zip(names, grads, ref_grads, want_grads):
        assert a.dtype == low_dtype, name
        bound = max(2e-2, 1.5 * rel_err(r, b))
        assert rel_err(a, b) <= bound, f"grad {name}: {rel_err(a, b):.2e} (reference in {low_dtype}: {rel_err(r, b):.2e})"


def test_public_op_composed_path_matches_reference():
    # CPU tensors (and strides with recompute factor > 1 on CUDA) take F.linear + pool3d.
    inputs = make_inputs(2, 2, 16, 12, (2, 4, 4), K3, "conv", True, True, seed=3)
    assert not pp.uses_triton(inputs["x"].cpu(), inputs["weight"], 2, (2, 4, 4), K3, (1, 2, 2), P1)
    check_against_reference(pp.pooled_projection, inputs, "v", 2, (2, 4, 4), K3, (1, 2, 2), P1, "conv", True)


def op_args(mode="conv", has_cls=True, norm=True):
    # avg pooling needs the grid at least the kernel on every axis (torch's avg_pool3d rule, which
    # the registered ops now check too): a (1, 3, 3) window on the one-frame grid
    kernel, padding = ((1, 3, 3), (0, 1, 1)) if mode == "avg" else (K3, P1)
    inputs = make_inputs(1, 2, 16, 8, (1, 4, 4), kernel, mode, has_cls, norm, seed=4)
    return (inputs["x"], inputs["weight"], inputs["bias"], inputs["pool_weight"], inputs["norm_weight"],
            inputs["norm_bias"], "k", 2, [1, 4, 4], list(kernel), [1, 4, 4], list(padding), mode, has_cls, 1e-6)


@pytest.mark.parametrize("mode", ["conv", "max"])
def test_opcheck(mode):
    torch.library.opcheck(pp._fwd_op, op_args(mode, has_cls=mode == "conv", norm=mode == "conv"))


def bwd_op_args(mode):
    args = op_args(mode, has_cls=mode == "conv", norm=mode == "conv")
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    y = pp._fwd_op(*args)
    return (torch.randn_like(y), *args)


@pytest.mark.parametrize("mode", ["conv", "avg", "max"])
def test_opcheck_backward(mode):
    torch.library.opcheck(pp._bwd_op, bwd_op_args(mode))


def test_backward_op_matches_eager_and_flop_formula():
    args = bwd_op_args("conv")
    with FlopCounterMode(display=False) as counter:
        grads = pp._bwd_op(*args)
    eager = pp._launch_backward(*args)
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b)
    x, weight = args[1], args[2]
    rows = kernels.projected_rows((1, 4, 4), K3, (1, 4, 4), P1, True)
    # Recompute, a second recompute for d pool_weight, dW and dx: 4x the forward's dots (avg 3x).
    assert counter.get_total_flops() == 4 * 2 * x.shape[0] * rows * x.shape[2] * weight.shape[0] // 3
    A = weight.shape[0] // 3
    assert grads[1][:A].abs().sum() == 0 and grads[1][2 * A:].abs().sum() == 0  # the "k" slice only
    assert grads[1][A:2 * A].abs().sum() > 0


def test_gradients_only_for_inputs_that_need_them(mode="conv"):
    inputs = make_inputs(1, 2, 16, 12, (1, 8, 8), K3, mode, True, True, seed=9)
    inputs = {k: (t.detach().requires_grad_(k in ("x", "norm_bias")) if t is not None else None)
              for k, t in inputs.items()}
    for fn in (pp._EagerTritonProjection.apply, pp._fwd_op):
        y = fn(inputs["x"], inputs["weight"], inputs["bias"], inputs["pool_weight"], inputs["norm_weight"],
               inputs["norm_bias"], "v", 2, [1, 8, 8], list(K3), [1, 4, 4], list(P1), mode, True, 1e-6)
        y.sum().backward()
    assert inputs["x"].grad is not None and inputs["norm_bias"].grad is not None
    assert all(inputs[k].grad is None for k in ("weight", "bias", "norm_weight") if inputs[k] is not None)


def test_torch_compile_fullgraph():
    inputs = make_inputs(1, 2, 16, 8, (1, 8, 8), K3, "conv", True, True, seed=5)
    leaves = list(inputs.values())

    def block(x, weight, bias, pool_weight, norm_weight, norm_bias):
        y, _ = pp.triton_pooled_projection(x, weight, bias, "k", 2, (1, 8, 8), K3, (1, 8, 8), P1, "conv",
                                           pool_weight, True, norm_weight, norm_bias)
        return (y * 2.0).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    want = block(*leaves)
    want_grads = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **TOL)


def test_flop_formula_counts_the_projected_rows():
    B, heads, d, C, thw = 2, 2, 16, 8, (1, 8, 8)
    inputs = make_inputs(B, heads, d, C, thw, K3, "conv", True, False, seed=6)
    with FlopCounterMode(display=False) as counter:
        run(pp.triton_pooled_projection, inputs, "k", heads, thw, K3, (1, 8, 8), P1, "conv", True)
    # One output (1x1x1); its window -1..1 on each axis reads t 0, h 0..1, w 0..1: 4 rows, plus
    # the class token.
    assert kernels.projected_rows(thw, K3, (1, 8, 8), P1, True) == 5
    assert counter.get_total_flops() == 2 * B * heads * 5 * C * d
    full = pp.reference_projection_flops(inputs["x"].shape, inputs["weight"].shape)
    assert full == 2 * B * 65 * C * heads * d
    assert counter.get_total_flops() < full
    with FlopCounterMode(display=False) as counter:
        run(reference.pooled_projection, inputs, "k", heads, thw, K3, (1, 8, 8), P1, "conv", True)
    assert counter.get_total_flops() >= full  # the projection plus the depthwise conv
    # Stride 1: every output projects its in-grid taps (a 3-wide window over 4 positions reads
    # 2+3+3+2 = 10 of them).
    assert kernels.projected_rows((1, 4, 4), K3, (1, 1, 1), P1, False) == 1 * 10 * 10


def test_dispatch_rule():
    mvit_b = (8, 56, 56)
    assert kernels.recompute_factor(K3, (1, 8, 8), mvit_b) == pytest.approx(27 * 392 / 25088)
    # The byte/FLOP model's crossover (recompute <= 2): MViT-B's blocks 0-2 fuse, the rest do not.
    assert kernels.recompute_factor(K3, (1, 4, 4), mvit_b) == pytest.approx(27 * 8 * 14 * 14 / 25088)
    for stride, thw in (((1, 8, 8), mvit_b), ((1, 8, 8), (8, 28, 28)), ((1, 4, 4), mvit_b), ((1, 4, 4), (8, 28, 28))):
        assert pp.use_fused_projection(K3, stride, thw)
    for stride in ((1, 2, 2), (1, 1, 1)):
        assert not pp.use_fused_projection(K3, stride, mvit_b)
        assert not pp.use_fused_projection(K3, stride, (8, 14, 14))
    specs = __import__("mvit.presets", fromlist=["get_preset"]).get_preset("mvit_b_16x4").block_specs()
    fused = [i for i, sp in enumerate(specs) if pp.use_fused_projection(sp.kernel_kv, sp.stride_kv, sp.input_thw, sp.padding_kv)]
    assert fused == [0, 1, 2]
    x = torch.randn(1, 1 + 8 * 16 * 16, 16)
    w = torch.randn(48, 16)
    # CPU tensors never take Triton in the public op.
    assert not pp.uses_triton(x, w, 1, (8, 16, 16), K3, (1, 8, 8), P1)
    with pytest.raises(ValueError, match="does not cover"):  # on DEVICE: a CPU tensor is refused first off the interpreter
        pp.triton_pooled_projection(x.double().to(DEVICE), w.double().to(DEVICE), None, "k", 1, (8, 16, 16), K3,
                                    (1, 8, 8), P1, "max")


def test_config_rule_covers_every_dtype_and_head_pad():
    for dtype in kernels.DTYPES:
        for d_pad in kernels.D_PADS:
            for precision in ("tf32", "ieee"):
                cfg = kernels.select_config(dtype, d_pad, 90, precision)
                assert cfg.block_m >= 16 and cfg.block_k >= 16


def _tile_choices():
    """Every distinct (forward, backward) tile pair a rule picks, over rules, dtypes, dot
    precisions, head pads 32 and 128 and the modes."""
    choices = {}
    for rule in RULES:
        for dtype in kernels.DTYPES:
            for precision in ("tf32", "ieee") if dtype == torch.float32 else ("tf32",):
                for d_pad in (32, 128):
                    for mode in kernels.MODES:
                        fwd = kernels.select_config(dtype, d_pad, rule, precision)
                        bwd = kernels.select_bwd_config(dtype, d_pad, rule, precision, mode)
                        key = (d_pad, fwd.block_m, fwd.block_k, bwd.block_m, bwd.block_k)
                        choices.setdefault(key, (f"d{d_pad}-rule{rule}-{str(dtype)[6:]}-{precision}-{mode}", fwd, bwd))
    return list(choices.values())


@pytest.mark.skipif(not INTERPRET, reason="the interpreter runs any tile shape on fp32 data")
@pytest.mark.parametrize("name, fwd, bwd", _tile_choices(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_rules_tiles_run_correctly(monkeypatch, name, fwd, bwd, backward_launches):
    # As in test_triton_attention.py: the fp32 interpreter tests run the sm_90 rule's fp32 tiles;
    # every other rule's and dtype's tiles run here on fp32 data (33 grid rows at stride 1x2x2
    # leave partial row tiles; C = 40 leaves a partial channel chunk).
    monkeypatch.setattr(kernels, "select_config", lambda *args, **kw: fwd)
    monkeypatch.setattr(kernels, "select_bwd_config", lambda *args, **kw: bwd)
    d = 24 if name.startswith("d32") else 96
    thw = (3, 5, 6)
    inputs = make_inputs(1, 1, d, 40, thw, K3, "conv", True, True)
    check_against_reference(pp.triton_pooled_projection, inputs, "v", 1, thw, K3, (1, 2, 2), P1, "conv", True)
    assert backward_launches == ["conv"]


def _bad(**changes):
    base = make_inputs(1, 2, 16, 8, (1, 4, 4), K3, "conv", True, True)
    args = dict(x=base["x"], weight=base["weight"], bias=base["bias"], which="k", num_heads=2, thw=(1, 4, 4),
                kernel=K3, stride=(1, 2, 2), padding=P1, mode="conv", pool_weight=base["pool_weight"],
                has_cls=True, norm_weight=base["norm_weight"], norm_bias=base["norm_bias"])
    args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})
    return args


BAD = [
    (dict(x=lambda a: a["x"][0]), "x must be a 3-D tensor"),
    (dict(weight=lambda a: a["weight"][:, :5]), "weight has 5 input channels"),
    (dict(weight=lambda a: a["weight"][:-1]), "3\\*A rows"),
    (dict(weight=lambda a: a["weight"][0]), "weight must be a 2-D tensor"),
    (dict(num_heads=3), "num_heads=3 does not divide"),
    (dict(bias=lambda a: a["bias"][:-3]), "bias must have shape"),
    (dict(bias=lambda a: a["bias"].double()), "bias has dtype"),
    (dict(weight=lambda a: a["weight"].double()), "weight has dtype"),
    (dict(which="o"), "which must be one of"),
    (dict(thw=(1, 4, 5)), "x has 17 tokens but thw"),
    (dict(pool_weight=lambda a: a["pool_weight"][:, :, :1]), "pool_weight must have shape"),
    (dict(pool_weight=None), "mode='conv' needs pool_weight"),
    (dict(mode="max"), "pool_weight is only used with mode='conv'"),
    (dict(mode="sum"), "mode must be one of"),
    (dict(norm_bias=None), "norm_weight and norm_bias"),
    (dict(norm_weight=lambda a: a["norm_weight"][:4]), "norm_weight must have shape"),
    (dict(padding=(2, 2, 2)), "padding"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[m for _, m in BAD])
@pytest.mark.parametrize("fn", ["reference", "fused", "triton"])
def test_bad_inputs_raise_errors_naming_the_argument(fn, changes, message):
    op = {"reference": reference.pooled_projection, "fused": pp.pooled_projection,
          "triton": pp.triton_pooled_projection}[fn]
    with pytest.raises((ValueError, TypeError), match=message):
        op(**_bad(**changes))


def test_tiny_mvit_through_the_fused_kv_projection(monkeypatch):
    """MViT(fused=True) takes the fused K/V projection where the dispatch rule picks it (here a
    1x8x8 K/V stride, MViT-B's first-block pattern) and equals fused=False: logits and every
    parameter gradient. The device check of the rule is lifted so CPU tensors reach the kernel
    through the interpreter; on a GPU the rule picks it by itself."""
    from mvit import build_model

    torch.manual_seed(0)
    ref = build_model("mvit_tiny", pool_kv_stride_adaptive=(1, 8, 8), drop_path_rate=0.0).to(DEVICE)
    fused = build_model("mvit_tiny", pool_kv_stride_adaptive=(1, 8, 8), drop_path_rate=0.0, fused=True).to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, *ref.cfg.input_size, device=DEVICE)
    calls = []
    real_rule = pp.uses_triton

    def rule(x, weight, num_heads, thw, kernel, stride, padding):
        picked = real_rule(x, weight, num_heads, thw, kernel, stride, padding) or (
            not x.is_cuda and kernels.use_fused_projection(kernel, stride, thw, padding)
        )
        calls.append(picked)
        return picked

    monkeypatch.setattr(pp, "uses_triton", rule)
    outs, grads = outputs_and_gradients((ref, fused), x)
    assert any(calls), "the fused K/V projection was never picked"
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_environment_switch_turns_the_fused_projection_off(monkeypatch):
    monkeypatch.delenv(pp.ENV_SWITCH, raising=False)
    assert pp.fused_projection_enabled()
    monkeypatch.setenv(pp.ENV_SWITCH, "0")
    assert not pp.fused_projection_enabled()
    if torch.cuda.is_available() and not INTERPRET:  # the whole rule, on a GPU
        x = torch.randn(1, 1 + 4 * 16 * 16, 16, device="cuda")
        w = torch.randn(48, 16, device="cuda")
        assert not pp.uses_triton(x, w, 1, (4, 16, 16), K3, (1, 8, 8), P1)
        monkeypatch.setenv(pp.ENV_SWITCH, "1")
        assert pp.uses_triton(x, w, 1, (4, 16, 16), K3, (1, 8, 8), P1)


def test_autocast_computes_in_the_autocast_dtype():
    # The same rule as the other ops (mvit_kernels.autocast.for_compute): float32 x and weights
    # under autocast run the kernel in the autocast dtype (float16 on CPU, see the float16 test).
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    inputs = make_inputs(1, 2, 16, 24, (1, 8, 8), K3, "conv", True, True, seed=14)
    args = ("k", 2, (1, 8, 8), K3, (1, 4, 4), P1, "conv", True)
    with torch.no_grad():
        want, _ = run(reference.pooled_projection, {k: t.double() for k, t in inputs.items()}, *args)
        with torch.autocast(DEVICE, dtype=dtype):
            got, _ = run(pp.triton_pooled_projection, inputs, *args)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("mode", ["conv", "max"])
def test_empty_batch_forward_and_backward(mode):
    inputs = make_inputs(1, 2, 16, 8, (1, 4, 4), K3, mode, True, True, seed=16)
    inputs["x"] = inputs["x"].detach()[:0].requires_grad_()
    y, thw = run(pp.triton_pooled_projection, inputs, "k", 2, (1, 4, 4), K3, (1, 2, 2), P1, mode, True)
    assert y.shape == (0, 2, 5, 16) and thw == (1, 2, 2)
    leaves = [t for t in inputs.values() if t is not None]
    for leaf, g in zip(leaves, torch.autograd.grad(y.sum(), leaves)):
        assert g.shape == leaf.shape and not g.any()


def test_kernel_covers_the_batch_head_grid_axis_up_to_its_limit():
    # (batch, head) is grid axis 1 of both kernels, whose limit is 65,535 programs; past it the
    # launch fails, so the composed ops take it (expanded inputs: no memory needed).
    x = torch.randn(1, 1 + 2 * 4 * 4, 16)
    weight = torch.randn(3 * 8 * 16, 16)
    assert pp._kernel_covers(x.expand(8191, -1, -1), weight, 8)
    assert not pp._kernel_covers(x.expand(8192, -1, -1), weight, 8)
