"""The reference ops against the reference repositories' code (torchvision's ``Pool`` and
``_add_rel_pos``, which follow pySlowFast) and their argument checks."""

import pytest
import torch
import torch.nn as nn
from torchvision.models.video import mvit as tv_mvit

from mvit_kernels import reference


@pytest.mark.parametrize("thw", [(2, 5, 7), (1, 4, 4)])
@pytest.mark.parametrize("stride", [(1, 1, 1), (1, 2, 2), (2, 3, 1)])
def test_pool3d_conv_with_norm_matches_torchvision_pool(thw, stride):
    torch.manual_seed(0)
    B, heads, d = 2, 3, 8
    kernel, padding = (3, 3, 3), (1, 1, 1)
    x = torch.randn(B, heads, 1 + thw[0] * thw[1] * thw[2], d)
    conv = nn.Conv3d(d, d, kernel, stride, padding, groups=d, bias=False)
    norm = nn.LayerNorm(d, eps=1e-6)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    expected, expected_thw = tv_mvit.Pool(conv, norm)(x, thw)
    got, got_thw = reference.pool3d(x, thw, kernel, stride, padding, "conv", conv.weight, True, norm.weight, norm.bias)
    assert got_thw == tuple(expected_thw)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pool3d_max_avg_without_class_token(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 3 * 5 * 5, 4)
    pool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)) if mode == "max" else nn.AvgPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
    grid = x.reshape(4, 3, 5, 5, 4).permute(0, 4, 1, 2, 3)
    expected = pool(grid).reshape(2, 2, 4, -1).transpose(2, 3)
    got, thw = reference.pool3d(x, (3, 5, 5), (1, 3, 3), (1, 2, 2), (0, 1, 1), mode, has_cls=False)
    assert thw == (3, 3, 3)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("q_thw, k_thw", [((2, 4, 4), (2, 4, 4)), ((2, 4, 4), (2, 2, 2)), ((4, 7, 7), (2, 4, 4))])
def test_decomposed_rel_pos_matches_torchvision(q_thw, k_thw):
    torch.manual_seed(0)
    B, heads, d = 2, 2, 8
    q = torch.randn(B, heads, 1 + q_thw[0] * q_thw[1] * q_thw[2], d)
    k = torch.randn(B, heads, 1 + k_thw[0] * k_thw[1] * k_thw[2], d)
    # tables deliberately of another length than the grids need: exercises the interpolation
    rel_h, rel_w, rel_t = torch.randn(9, d), torch.randn(9, d), torch.randn(5, d)
    attn = q @ k.transpose(-2, -1)
    expected = tv_mvit._add_rel_pos(attn.clone(), q, q_thw, k_thw, rel_h, rel_w, rel_t)
    bias = reference.decomposed_rel_pos(q, q_thw, k_thw, rel_t, rel_h, rel_w, has_cls=True)
    got = attn.clone()
    got[:, :, 1:, 1:] += bias
    torch.testing.assert_close(got, expected)


def test_rel_pos_index_is_built_on_the_requested_device():
    # Built where it is used: a CPU index copied to a GPU would synchronize host and GPU every
    # attention call. The meta device shows no host tensor is made and moved.
    idx = reference.rel_pos_index(7, 4, torch.device("meta"))
    assert idx.device.type == "meta" and idx.shape == (7, 4) and idx.dtype == torch.int64
    # q 7 long, k 4: k's coordinates scaled by 7/4 so both span the same extent (MViTv2 3.1).
    expected = torch.tensor([[int(i - j * 7 / 4 + 3 * 7 / 4) for j in range(4)] for i in range(7)])
    assert torch.equal(reference.rel_pos_index(7, 4, torch.device("cpu")), expected)


def test_pooling_attention_residual_pooling_matches_torchvision_formula():
    torch.manual_seed(0)
    B, heads, d = 2, 2, 8
    q = torch.randn(B, heads, 1 + 2 * 3 * 3, d)
    k = torch.randn(B, heads, 1 + 2 * 2 * 2, d)
    v = torch.randn_like(k)
    attn = ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(-1)
    x = attn @ v
    x[:, :, 1:] += q[:, :, 1:]  # torchvision _add_shortcut, residual_with_cls_embed=False
    expected = x.transpose(1, 2).reshape(B, -1, heads * d)
    got = reference.pooling_attention(q, k, v, (2, 3, 3), (2, 2, 2), True, residual_pooling=True)
    torch.testing.assert_close(got, expected)


def test_pool_residual_add_is_maxpool_plus_scaled_branch():
    torch.manual_seed(0)
    x = torch.randn(3, 1 + 2 * 5 * 5, 6)
    branch = torch.randn(3, 1 + 2 * 3 * 3, 6)
    scale = torch.tensor([0.0, 2.0, 1.0])
    out = reference.pool_residual_add(x, (2, 5, 5), (1, 3, 3), (1, 2, 2), (0, 1, 1), branch, scale)
    skip = tv_mvit.Pool(nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)), None)(x, (2, 5, 5))[0]
    torch.testing.assert_close(out, skip + scale.view(3, 1, 1) * branch)


def test_reference_ops_reject_bad_input_with_named_arguments():
    x = torch.randn(2, 1, 1 + 2 * 4 * 4, 8)
    w = torch.randn(8, 1, 3, 3, 3)
    ok = dict(thw=(2, 4, 4), kernel=3, stride=(1, 2, 2), padding=1, mode="conv", weight=w)
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor"):
        reference.pool3d(x[0], **ok)
    with pytest.raises(ValueError, match=r"x has 33 tokens but thw=\(2, 4, 5\)"):
        reference.pool3d(x, **{**ok, "thw": (2, 4, 5)})
    with pytest.raises(ValueError, match=r"stride\[h\] must be >= 1"):
        reference.pool3d(x, **{**ok, "stride": (1, 0, 1)})
    with pytest.raises(ValueError, match=r"padding\[t\] must be in \[0, kernel//2\]"):
        reference.pool3d(x, **{**ok, "padding": (2, 1, 1)})
    with pytest.raises(ValueError, match=r"weight must have shape \(8, 1, 3, 3, 3\)"):
        reference.pool3d(x, **{**ok, "weight": torch.randn(8, 1, 3, 3)})
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(8,\)"):
        reference.pool3d(x, **ok, norm_weight=torch.ones(4), norm_bias=torch.zeros(4))
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        reference.pool3d(x, **{**ok, "weight": w.double()})
    with pytest.raises(TypeError, match="x must be float32"):
        reference.pool3d(x.int(), **ok)
    with pytest.raises(ValueError, match="mode must be one of"):
        reference.pool3d(x, **{**ok, "mode": "median"})
    with pytest.raises(ValueError, match=r"branch must have shape \(2, 9, 8\)"):
        reference.pool_residual_add(x[:, 0], (2, 4, 4), (1, 3, 3), (1, 2, 2), (0, 1, 1), torch.randn(2, 33, 8))
    with pytest.raises(ValueError, match="rel_pos_h and rel_pos_w must be given together"):
        reference.pooling_attention(x, x, x, (2, 4, 4), (2, 4, 4), rel_pos_h=torch.randn(7, 8))


def test_sizes_and_flags_are_not_coerced():
    """NumPy ints and integer 0-d tensors are sizes; floats, bools and strings are refused: a
    truncated 2.5 or a truthy "False" would run and give a wrong answer."""
    import numpy as np

    x = torch.randn(2, 1, 1 + 2 * 4 * 4, 8)
    y, thw = reference.pool3d(x, (np.int64(2), torch.tensor(4), 4), 3, (1, 2, 2), 1, "max")
    assert thw == (2, 2, 2) and all(type(s) is int for s in thw)
    assert torch.equal(y, reference.pool3d(x, (2, 4, 4), 3, (1, 2, 2), 1, "max")[0])
    with pytest.raises(ValueError, match=r"thw must be an int or a sequence of 3 ints, got \(2, 4.5, 4\)"):
        reference.pool3d(x, (2, 4.5, 4), 3, (1, 2, 2), 1, "max")
    with pytest.raises(ValueError, match="padding must be an int or a sequence of 3 ints"):
        reference.pool3d(x, (2, 4, 4), 3, (1, 2, 2), 1.0, "max")
    with pytest.raises(ValueError, match="thw must be an int or a sequence of 3 ints"):
        reference.pool_residual_add(x[:, 0], (2, 4, 4.0), (1, 3, 3), (1, 2, 2), (0, 1, 1), torch.randn(2, 9, 8))
    with pytest.raises(TypeError, match="has_cls must be a bool, got int"):
        reference.pool_residual_add(x[:, 0], (2, 4, 4), (1, 3, 3), (1, 2, 2), (0, 1, 1), torch.randn(2, 9, 8), None, 1)
    with pytest.raises(TypeError, match="residual_pooling must be a bool, got str"):
        reference.pooling_attention(x, x, x, (2, 4, 4), (2, 4, 4), residual_pooling="no")
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1"):
        reference.pooled_projection(x[:, 0], torch.randn(24, 8), None, "k", 1, (2, 4, 4), 1, 1, 0, "max",
                                    norm_weight=torch.ones(8), norm_bias=torch.zeros(8), eps=-1)


def test_size_sequences_are_read_without_a_caught_error(monkeypatch):
    """A list or tuple of sizes (what the model passes) must not go through operator.index first:
    under torch.compile with torch 2.11 (the GPU machines' release), Dynamo turned that caught
    TypeError into an internal error, and compiling any fused model failed."""
    from mvit_kernels import checks

    seen = []
    as_int = checks._as_int
    monkeypatch.setattr(checks, "_as_int", lambda v: seen.append(v) or as_int(v))
    assert checks.triple((1, 2, 2), "stride") == (1, 2, 2) and checks.triple([3, 3, 3], "kernel") == (3, 3, 3)
    assert checks.triple(2, "padding") == (2, 2, 2)
    assert seen == [1, 2, 2, 3, 3, 3, 2]


@pytest.mark.parametrize("op", ["reference", "fused"])
def test_attention_refuses_empty_tables_and_head_dim(op):
    """An empty rel-pos table used to fail inside F.interpolate; head_dim 0 inside d**-0.5 in
    the reference while SDPA returned an empty output: both now fail the same clear way."""
    import mvit_kernels

    attention = reference.pooling_attention if op == "reference" else mvit_kernels.pooling_attention
    q = torch.randn(1, 2, 1 + 2 * 3 * 3, 8)
    k = torch.randn(1, 2, 1 + 2 * 2 * 2, 8)
    tables = dict(rel_pos_h=torch.randn(5, 8), rel_pos_w=torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"rel_pos_t must have shape \(L, 8\) with L >= 1, got \(0, 8\)"):
        attention(q, k, k, (2, 3, 3), (2, 2, 2), rel_pos_t=torch.randn(0, 8), **tables)
    with pytest.raises(ValueError, match=r"rel_pos_w must have shape \(L, 8\) with L >= 1"):
        attention(q, k, k, (2, 3, 3), (2, 2, 2), rel_pos_h=tables["rel_pos_h"], rel_pos_w=torch.randn(0, 8))
    with pytest.raises(ValueError, match="need head_dim >= 1"):
        attention(q[..., :0], k[..., :0], k[..., :0], (2, 3, 3), (2, 2, 2))


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_pooled_projection_matches_torchvision_qkv_split_and_pool(which):
    # torchvision's MultiscaleAttention: qkv Linear, reshape (B, N, 3, heads, d), transpose, unbind.
    torch.manual_seed(0)
    B, heads, d, C, thw = 2, 2, 8, 12, (2, 5, 7)
    x = torch.randn(B, 1 + thw[0] * thw[1] * thw[2], C)
    qkv = nn.Linear(C, 3 * heads * d)
    conv = nn.Conv3d(d, d, (3, 3, 3), (1, 2, 2), (1, 1, 1), groups=d, bias=False)
    norm = nn.LayerNorm(d, eps=1e-6)
    nn.init.normal_(norm.weight)
    parts = qkv(x).reshape(B, x.shape[1], 3, heads, d).transpose(1, 3).unbind(dim=2)
    expected, expected_thw = tv_mvit.Pool(conv, norm)(parts["qkv".index(which)], thw)
    got, got_thw = reference.pooled_projection(
        x, qkv.weight, qkv.bias, which, heads, thw, (3, 3, 3), (1, 2, 2), (1, 1, 1), "conv", conv.weight, True,
        norm.weight, norm.bias,
    )
    assert got_thw == tuple(expected_thw)
    torch.testing.assert_close(got, expected)


def test_pooled_projection_errors_name_the_argument():
    x, w = torch.randn(1, 5, 8), torch.randn(12, 8)
    with pytest.raises(ValueError, match="which must be one of"):
        reference.pooled_projection(x, w, None, "o", 1, (1, 2, 2), 1, 1, 0, "max")
    with pytest.raises(ValueError, match="weight has 8 input channels"):
        reference.pooled_projection(x[..., :6], w, None, "k", 1, (1, 2, 2), 1, 1, 0, "max")
    with pytest.raises(ValueError, match="num_heads=5 does not divide"):
        reference.pooled_projection(x, w, None, "k", 5, (1, 2, 2), 1, 1, 0, "max")


class _PoolInputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the memory layout of every convolution / pooling input."""

    def __init__(self):
        super().__init__()
        self.layouts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("convolution", "max_pool3d_with_indices", "avg_pool3d"):
            self.layouts.append((name, args[0].is_contiguous()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["conv", "max", "avg"])
@pytest.mark.parametrize("has_cls", [True, False])
def test_pool3d_contiguous_grid_changes_the_layout_not_the_result(mode, has_cls):
    # contiguous_grid pools a contiguous NCDHW copy (torchvision's layout) instead of the
    # channels-last view; values and every gradient are the same.
    g = torch.Generator().manual_seed(3)
    thw, kernel, stride, padding = (3, 5, 4), (3, 3, 3), (1, 2, 2), (1, 1, 1)
    d = 6
    x = torch.randn(2, 3, has_cls + 60, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d, 1, *kernel, generator=g, dtype=torch.float64, requires_grad=True) if mode == "conv" else None
    nw = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)
    nb = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)
    leaves = [t for t in (x, w, nw, nb) if t is not None]
    results, grad_y = {}, None
    for contiguous in (False, True):
        log = _PoolInputs()
        with log:
            y, thw_out = reference.pool3d(x, thw, kernel, stride, padding, mode, w, has_cls, nw, nb,
                                          contiguous_grid=contiguous)
        assert log.layouts and all(is_contiguous == contiguous for _, is_contiguous in log.layouts)
        if grad_y is None:  # the same for both layouts
            grad_y = torch.randn(y.shape, generator=g, dtype=y.dtype)
        results[contiguous] = (y, thw_out, torch.autograd.grad(y, leaves, grad_y))
    (y0, thw0, grads0), (y1, thw1, grads1) = results[False], results[True]
    assert thw0 == thw1
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "fp32-autocast-bf16"])
def test_pool3d_conv_bf16_weight_grad_of_padding_only_taps_is_zero_on_cpu(autocast):
    # PyTorch's CPU bf16 conv3d backward left the weight gradient of taps that read only padding
    # unwritten on the channels-last view (1e30s and NaNs from whatever memory held: a NaN update
    # of the reference model under bf16 autocast). The reference pools a contiguous grid then.
    g = torch.Generator().manual_seed(11)
    dtype = torch.float32 if autocast else torch.bfloat16
    thw, kernel, stride, padding = (1, 8, 3), (1, 4, 5), (1, 3, 4), (0, 2, 2)  # w taps 0, 1 read padding only
    x = torch.randn(12, 2, 1 + 24, 2, generator=g).to(dtype)
    w = torch.randn(2, 1, *kernel, generator=g)
    gy = torch.randn(12, 2, 1 + 3, 2, generator=g)
    expected = None
    for _ in range(5):  # garbage depends on what the allocator hands back: fill memory first
        junk = torch.full((1 << 16,), 1e30, dtype=torch.bfloat16)
        del junk
        wi = w.to(dtype).requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y, thw_out = reference.pool3d(x, thw, kernel, stride, padding, "conv", wi)
        assert thw_out == (1, 3, 1)
        (grad,) = torch.autograd.grad(y, wi, gy.to(y.dtype))
        assert torch.equal(grad[..., :2], torch.zeros_like(grad[..., :2]))
        if expected is None:  # the taps that read tokens, against float64
            w64 = w.double().requires_grad_()
            y64, _ = reference.pool3d(x.double(), thw, kernel, stride, padding, "conv", w64)
            (expected,) = torch.autograd.grad(y64, w64, gy.double())
        torch.testing.assert_close(grad.double(), expected, atol=0.05 * expected.abs().max().item(), rtol=0.02)


def test_pool_residual_add_contiguous_grid_same_result():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1 + 2 * 5 * 5, 6, generator=g, dtype=torch.float64)
    branch = torch.randn(2, 1 + 2 * 3 * 3, 6, generator=g, dtype=torch.float64)
    args = ((2, 5, 5), (1, 3, 3), (1, 2, 2), (0, 1, 1), branch, None, True)
    outs = []
    for contiguous in (False, True):
        log = _PoolInputs()
        with log:
            outs.append(reference.pool_residual_add(x, *args, contiguous_grid=contiguous))
        assert log.layouts == [("max_pool3d_with_indices", contiguous)]
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
