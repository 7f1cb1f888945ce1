"""The pooled projection's gathered path (``mvit_kernels.pooled_projection`` off the Triton
kernel): where pooling windows leave tokens unread (a stride larger than the kernel), only the
tokens some window reads are projected, and pooled on their smaller grid with the stride set to
the kernel.

Checked against ``mvit_kernels.reference.pooled_projection`` (projection of every token, then
pooling): the read-token index against a brute-force list of what the windows read; forward and
every gradient (x, qkv weight and bias, conv weight, LayerNorm parameters) in every mode, with
and without the class token and the LayerNorm, at odd grid sizes where the first window starts
in the padding and the last is cut by the end of the grid; max pooling's ties; bfloat16;
non-contiguous x; batch 1 and an empty batch; torch.compile; and the fused model, whose output,
parameter gradients and FLOP count (fewer multiply-adds, by exactly the tokens skipped) are
checked against the reference model.

Tolerances: float64 1e-10 (the same sums in another grouping); float32 1e-5 forward and 1e-4
gradients (LayerNorm divides by the standard deviation over d); bfloat16 within 2e-2 or 1.5x
the reference's own bfloat16 error against float64."""

import importlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mvit_kernels import reference
from test_fused_model_cpu import assert_gradients_strided_as_parameters

# The module, not the function of the same name that mvit_kernels exports.
pp = importlib.import_module("mvit_kernels.pooled_projection")

K3, P1 = (3, 3, 3), (1, 1, 1)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def read_positions(size, kernel, stride, padding):
    """Brute force: every position of one axis that some pooling window covers."""
    n_out = (size + 2 * padding - kernel) // stride + 1
    return sorted({o * stride - padding + j for o in range(n_out) for j in range(kernel)
                   if 0 <= o * stride - padding + j < size})


def read_tokens(thw, kernel, stride, padding, has_cls):
    """Brute force: the token indices (class token first) that some window reads."""
    T, H, W = thw
    it, ih, iw = (read_positions(*a) for a in zip(thw, kernel, stride, padding))
    grid = [(t * H + h) * W + w + int(has_cls) for t in it for h in ih for w in iw]
    return ([0] if has_cls else []) + grid


def make_inputs(B, heads, d, C, thw, mode, has_cls, norm, dtype=torch.float64, device="cpu", seed=0,
                kernel=K3, bias=True, strided=False):
    """Random leaves (never zeros) requiring grad: x (B, N, C), the qkv weight (3A, C) and bias,
    the conv weight (mode conv) and the LayerNorm parameters (norm). strided: x is a view with a
    row stride wider than C. Also the inputs of tests/test_triton_pooled_projection.py."""
    g = torch.Generator().manual_seed(seed)
    n = thw[0] * thw[1] * thw[2] + int(has_cls)
    A = heads * d

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()

    if strided:
        x = rand(B, n, C + 5).detach()[:, :, 2:C + 2].requires_grad_()
    else:
        x = rand(B, n, C)
    return dict(
        x=x,
        weight=rand(3 * A, C, scale=C**-0.5),
        bias=rand(3 * A) if bias else None,
        pool_weight=rand(d, 1, *kernel, scale=0.3) if mode == "conv" else None,
        norm_weight=rand(d) if norm else None,
        norm_bias=rand(d) if norm else None,
    )


def run(fn, inputs, which, heads, thw, kernel, stride, padding, mode, has_cls):
    return fn(inputs["x"], inputs["weight"], inputs["bias"], which, heads, thw, kernel, stride, padding, mode,
              inputs["pool_weight"], has_cls, inputs["norm_weight"], inputs["norm_bias"])


@pytest.fixture
def projected_tokens(monkeypatch):
    """The token counts the composed projection ran on (the gathered path calls it on the read
    tokens only)."""
    seen = []
    composed = pp._composed

    def spy(x, *args):
        seen.append(x.shape[1])
        return composed(x, *args)

    monkeypatch.setattr(pp, "_composed", spy)
    return seen


def assert_matches_reference(inputs, which, heads, thw, kernel, stride, padding, mode, has_cls, fwd_tol, grad_tol):
    args = (which, heads, thw, kernel, stride, padding, mode, has_cls)
    got, got_thw = run(pp.pooled_projection, inputs, *args)
    want, want_thw = run(reference.pooled_projection, inputs, *args)
    assert got_thw == want_thw
    torch.testing.assert_close(got, want, atol=fwd_tol, rtol=fwd_tol)
    names = [k for k, t in inputs.items() if t is not None]
    leaves = [inputs[k] for k in names]
    grad_y = torch.randn_like(want)
    for name, a, b in zip(names, torch.autograd.grad(got, leaves, grad_y), torch.autograd.grad(want, leaves, grad_y)):
        torch.testing.assert_close(a, b, atol=grad_tol, rtol=grad_tol, msg=lambda m: f"grad of {name}: {m}")


# ------------------------------------------------------------------------------------------
# The geometry
# ------------------------------------------------------------------------------------------


def test_read_token_index_is_what_the_windows_read():
    """Every axis length 1..19, kernel 1..4, stride 1..9, padding 0..k//2: where the gathered
    grid is smaller, its index lists exactly the read positions in order, and pooling it with
    stride = kernel gives the original output length."""
    compacted = 0
    for n in range(1, 20):
        for k in range(1, 5):
            for s in range(1, 10):
                for p in range(k // 2 + 1):
                    if n + 2 * p < k:
                        continue
                    geometry = pp.read_grid((1, 1, n), (1, 1, k), (1, 1, s), (0, 0, p))
                    read = read_positions(n, k, s, p)
                    if geometry is None:
                        # Every position read, or windows overlap, or too short for avg pooling.
                        assert len(read) == n or s < k or len(read) < k
                        continue
                    compacted += 1
                    (_, _, n_read), (_, _, s_read) = geometry
                    assert (n_read, s_read) == (len(read), k)
                    assert (n_read + 2 * p - k) // k + 1 == (n + 2 * p - k) // s + 1
                    idx = pp.read_token_index((1, 1, n), (1, 1, k), (1, 1, s), (0, 0, p), False)
                    assert idx.tolist() == read
    assert compacted > 500


@pytest.mark.parametrize("has_cls", [True, False])
def test_read_token_index_three_axes(has_cls):
    thw, kernel, stride, padding = (5, 17, 13), (3, 3, 2), (3, 8, 4), (1, 1, 1)
    idx = pp.read_token_index(thw, kernel, stride, padding, has_cls)
    assert idx.tolist() == read_tokens(thw, kernel, stride, padding, has_cls)
    thw_read, stride_read = pp.read_grid(thw, kernel, stride, padding)
    assert thw_read == tuple(len(read_positions(*a)) for a in zip(thw, kernel, stride, padding))
    assert stride_read == kernel


def test_mvit_b_kv_strides():
    # Block 0 (1x8x8 on 8x56x56): 20 of 56 rows and columns; blocks 1-2 (1x4x4): 41 of 56, 20 of 28.
    assert pp.read_grid((8, 56, 56), K3, (1, 8, 8), P1) == ((8, 20, 20), (1, 3, 3))
    assert pp.read_grid((8, 56, 56), K3, (1, 4, 4), P1) == ((8, 41, 41), (1, 3, 3))
    assert pp.read_grid((8, 28, 28), K3, (1, 4, 4), P1) == ((8, 20, 20), (1, 3, 3))
    # Overlapping windows (q pooling, later K/V strides) and no stride read every token.
    assert pp.read_grid((8, 28, 28), K3, (1, 2, 2), P1) is None
    assert pp.read_grid((8, 7, 7), K3, (1, 1, 1), P1) is None


# ------------------------------------------------------------------------------------------
# Against the reference
# ------------------------------------------------------------------------------------------

# (thw, stride): the first window starts in the padding; the last is cut by the end of the grid
# (17 = 2*8 + 1, 9 = 2*4 + 1) or not; gaps along t too; kernel = stride along one axis (no gap).
GEOMETRIES = [((3, 17, 13), (1, 8, 4)), ((7, 9, 11), (3, 4, 4)), ((3, 9, 10), (1, 4, 3)), ((4, 6, 11), (1, 4, 8))]
MODE_CASES = [(m, c, n) for m in ("conv", "avg", "max") for c in (True, False) for n in (True, False)]


@pytest.mark.parametrize("mode,has_cls,norm", MODE_CASES,
                         ids=[f"{m}-{'cls' if c else 'nocls'}-{'ln' if n else 'noln'}" for m, c, n in MODE_CASES])
def test_float64_forward_and_every_gradient(mode, has_cls, norm, projected_tokens):
    i = MODE_CASES.index((mode, has_cls, norm))
    thw, stride = GEOMETRIES[i % len(GEOMETRIES)]
    heads, which = 1 + i % 3, "kv"[i % 2]
    inputs = make_inputs(1 + i % 2, heads, 8, 12, thw, mode, has_cls, norm, seed=i)
    assert_matches_reference(inputs, which, heads, thw, K3, stride, P1, mode, has_cls, 1e-10, 1e-10)
    expected = len(read_tokens(thw, K3, stride, P1, has_cls))
    assert projected_tokens == [expected] and expected < inputs["x"].shape[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["conv", "avg", "max"])
def test_float32(device, mode, ieee_fp32):
    inputs = make_inputs(2, 2, 16, 24, (3, 17, 17), mode, True, True, dtype=torch.float32, device=device, seed=7)
    assert_matches_reference(inputs, "k", 2, (3, 17, 17), K3, (1, 8, 8), P1, mode, True, 1e-5, 1e-4)


def test_float32_inference_through_onednn():
    """Without gradients on the CPU the projection is oneDNN's matmul (mvit_kernels.linear)."""
    inputs = make_inputs(1, 2, 16, 24, (2, 12, 12), "conv", True, True, dtype=torch.float32, seed=8)
    args = ("v", 2, (2, 12, 12), K3, (1, 4, 4), P1, "conv", True)
    with torch.no_grad():
        got, _ = run(pp.pooled_projection, inputs, *args)
        want, _ = run(reference.pooled_projection, inputs, *args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_max_ties_go_to_the_first_tap_like_torch():
    """Every token equal: every window ties everywhere, and torch's max pooling gives the
    gradient to the first tap in window order. Compacting the grid keeps that order."""
    inputs = make_inputs(1, 2, 8, 12, (3, 10, 10), "max", True, False, seed=9)
    with torch.no_grad():
        inputs["x"].copy_(inputs["x"][:, :1].expand_as(inputs["x"]))
    args = ("k", 2, (3, 10, 10), K3, (1, 4, 4), P1, "max", True)
    got, _ = run(pp.pooled_projection, inputs, *args)
    want, _ = run(reference.pooled_projection, inputs, *args)
    grad_y = torch.randn_like(want)
    (gx,) = torch.autograd.grad(got, [inputs["x"]], grad_y)
    (wx,) = torch.autograd.grad(want, [inputs["x"]], grad_y)
    assert torch.equal(gx != 0, wx != 0)
    torch.testing.assert_close(gx, wx, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", ["conv", "max"])
def test_bfloat16_close_to_float64(mode):
    high = make_inputs(2, 2, 16, 24, (3, 17, 13), mode, True, True, seed=10)
    low = {k: None if t is None else t.detach().bfloat16().requires_grad_() for k, t in high.items()}
    args = ("v", 2, (3, 17, 13), K3, (1, 8, 4), P1, mode, True)
    got, _ = run(pp.pooled_projection, low, *args)
    same, _ = run(reference.pooled_projection, low, *args)
    want, _ = run(reference.pooled_projection, high, *args)

    def rel_err(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= max(2e-2, 1.5 * rel_err(same, want))
    names = [k for k, t in high.items() if t is not None]
    grad_y = torch.randn_like(want)
    grads = torch.autograd.grad(got, [low[k] for k in names], grad_y.bfloat16())
    ref_grads = torch.autograd.grad(same, [low[k] for k in names], grad_y.bfloat16())
    want_grads = torch.autograd.grad(want, [high[k] for k in names], grad_y)
    for name, a, r, b in zip(names, grads, ref_grads, want_grads):
        bound = max(2e-2, 1.5 * rel_err(r, b))
        assert rel_err(a, b) <= bound, f"grad {name}: {rel_err(a, b):.2e} (reference in bf16: {rel_err(r, b):.2e})"


def test_non_contiguous_x_batch_one_and_no_bias():
    inputs = make_inputs(1, 4, 8, 12, (2, 9, 9), "conv", False, True, seed=11, bias=False, strided=True)
    assert not inputs["x"].is_contiguous()
    assert_matches_reference(inputs, "k", 4, (2, 9, 9), K3, (1, 4, 4), P1, "conv", False, 1e-10, 1e-10)


def test_empty_batch():
    inputs = make_inputs(1, 2, 8, 12, (2, 9, 9), "conv", True, True, seed=12)
    inputs["x"] = inputs["x"].detach()[:0].requires_grad_()
    y, thw = run(pp.pooled_projection, inputs, "k", 2, (2, 9, 9), K3, (1, 4, 4), P1, "conv", True)
    assert y.shape == (0, 2, 1 + 2 * 3 * 3, 8) and thw == (2, 3, 3)
    leaves = [t for t in inputs.values() if t is not None]
    for leaf, g in zip(leaves, torch.autograd.grad(y.sum(), leaves)):
        assert g.shape == leaf.shape and not g.any()


def test_bad_input_is_refused_before_the_gather():
    inputs = make_inputs(1, 2, 8, 12, (2, 9, 9), "conv", True, True, seed=13)
    with pytest.raises(ValueError, match="thw"):
        run(pp.pooled_projection, inputs, "k", 2, (2, 9, 8), K3, (1, 4, 4), P1, "conv", True)


def test_torch_compile_fullgraph():
    inputs = make_inputs(1, 2, 8, 12, (2, 9, 9), "conv", True, True, dtype=torch.float32, seed=14)
    args = ("k", 2, (2, 9, 9), K3, (1, 4, 4), P1, "conv", True)

    def f(x, weight, bias, pool_weight, norm_weight, norm_bias):
        return pp.pooled_projection(x, weight, bias, *args[:7], pool_weight, args[7], norm_weight, norm_bias)[0]

    leaves = [inputs[k] for k in ("x", "weight", "bias", "pool_weight", "norm_weight", "norm_bias")]
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    want, _ = run(reference.pooled_projection, inputs, *args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# In the model
# ------------------------------------------------------------------------------------------


def outputs_and_gradients(models, x):
    """Each model's output for x and its parameters' gradients of sum(output^2), each strided as
    its parameter (DDP copies and warns otherwise)."""
    outs, grads = [], []
    for model in models:
        out = model(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert_gradients_strided_as_parameters(model)
    return outs, grads


def test_fused_model_projects_only_read_tokens(projected_tokens):
    """MViT(fused=True) on the CPU with a K/V stride larger than the kernel (MViT-B's first
    blocks' pattern): k and v go through the gathered path, and logits and every parameter
    gradient equal fused=False."""
    from mvit import build_model

    torch.manual_seed(0)
    kw = dict(pool_kv_stride_adaptive=(1, 4, 4), drop_path_rate=0.0)
    ref = build_model("mvit_tiny", **kw).double()
    fused = build_model("mvit_tiny", fused=True, **kw).double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, *ref.cfg.input_size, dtype=torch.float64)
    outs, grads = outputs_and_gradients((ref, fused), x)
    # Block 0 (4x8x8 grid, 1x4x4 K/V stride): rows and columns {0, 1, 3, 4, 5} of 8, k and v.
    assert projected_tokens[:2] == [1 + 4 * 5 * 5] * 2
    torch.testing.assert_close(outs[1], outs[0], atol=1e-10, rtol=1e-10)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", ["mvit_b_16x4", "mvitv2_s_16x4", "mvitv2_t_image"])
def test_fused_model_flops_are_the_reference_minus_the_skipped_tokens(name):
    """The FLOPs the fused model executes off the Triton kernel: the reference's count minus the
    k and v projections of the tokens no window reads (1.49 G multiply-adds for MViT-B 16x4).
    Everything else (pool3d, attention, skip pooling) registers FLOP formulas equal to the
    reference's."""
    from mvit.flops import count_model
    from mvit.presets import get_preset

    cfg = get_preset(name)
    skipped = 0
    for spec in cfg.block_specs():
        if spec.pool_kv:
            n = spec.input_thw[0] * spec.input_thw[1] * spec.input_thw[2] + int(cfg.cls_embed)
            read = len(read_tokens(spec.input_thw, spec.kernel_kv, spec.stride_kv, spec.padding_kv, cfg.cls_embed))
            skipped += 2 * (n - read) * spec.dim_in * spec.attn_dim
    assert skipped > 0
    # both with the fused model's class-token-only last block (tests/test_model.py counts that saving)
    ref = count_model(cfg, cls_only=cfg.cls_embed).gflops
    fused = count_model(cfg, fused=True, cls_only=cfg.cls_embed).gflops
    assert fused == pytest.approx(ref - skipped / 1e9, rel=1e-9)


def test_flop_counter_sees_the_gathered_projection():
    inputs = make_inputs(1, 2, 8, 12, (2, 9, 9), "conv", True, True, dtype=torch.float32, seed=15)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run(pp.pooled_projection, inputs, "k", 2, (2, 9, 9), K3, (1, 4, 4), P1, "conv", True)
    read = len(read_tokens((2, 9, 9), K3, (1, 4, 4), P1, True))
    projection = 2 * read * 12 * 16
    conv = counter.get_total_flops() - projection
    assert counter.get_total_flops() > projection and conv == 2 * 2 * (2 * 3 * 3) * 8 * 27


def test_eager_calls_reuse_the_index_and_traced_ones_build_it(monkeypatch):
    built = []
    real = pp.read_token_index
    monkeypatch.setattr(pp, "read_token_index", lambda *a: built.append(a) or real(*a))
    monkeypatch.setattr(pp, "_READ_INDEX_CACHE", {})
    inputs = make_inputs(1, 2, 8, 12, (2, 9, 9), "conv", True, True, dtype=torch.float32, seed=16)
    args = ("k", 2, (2, 9, 9), K3, (1, 4, 4), P1, "conv", True)
    first, _ = run(pp.pooled_projection, inputs, *args)
    second, _ = run(pp.pooled_projection, inputs, *args)
    assert len(built) == 1 and torch.equal(first, second)
    with FlopCounterMode(display=False):  # a dispatch mode sees every op: built in place
        run(pp.pooled_projection, inputs, *args)
    assert len(built) == 2 and len(pp._READ_INDEX_CACHE) == 1


def test_inference_mode_first_then_training(monkeypatch):
    # An eval pass under inference_mode cached the read index as an inference tensor; every later
    # training call with that geometry then failed ("Inference tensors cannot be saved for backward").
    monkeypatch.setattr(pp, "_READ_INDEX_CACHE", {})
    inputs = make_inputs(1, 2, 8, 12, (2, 9, 9), "max", True, True, seed=17)
    args = ("k", 2, (2, 9, 9), K3, (1, 4, 4), P1, "max", True)
    with torch.inference_mode():
        run(pp.pooled_projection, inputs, *args)
    assert_matches_reference(inputs, *args, 1e-10, 1e-10)
