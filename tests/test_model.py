"""The reference model: shapes, variants, other input sizes, checkpointing, errors, init."""

import pytest
import torch
import torch.nn.functional as F

from mvit import build_model
from mvit.model import MViT
from mvit.presets import get_preset

V2_TINY = dict(
    abs_pos="none",
    rel_pos_spatial=True,
    rel_pos_temporal=True,
    residual_pooling=True,
    dim_mul_in_att=True,
    pool_q_stride=tuple((i, 1, 2, 2) if i in (1, 3) else (i, 1, 1, 1) for i in range(4)),
)


def _video(b=2, t=8, s=32):
    return torch.randn(b, 3, t, s, s)


@pytest.mark.parametrize("mode", ["conv", "avg", "max"])
@pytest.mark.parametrize("cls_embed", [True, False])
def test_v1_variants_run_and_train(mode, cls_embed):
    torch.manual_seed(0)
    model = build_model("mvit_tiny", pool_mode=mode, cls_embed=cls_embed, num_classes=5)
    out = model(_video())
    assert out.shape == (2, 5)
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert (model.blocks[0].attn.pool_k.weight is not None) == (mode == "conv")


def test_v2_tiny_has_rel_pos_and_residual_pooling():
    torch.manual_seed(0)
    model = build_model("mvit_tiny", **V2_TINY)
    names = {n for n, _ in model.named_parameters()}
    assert "blocks.0.attn.rel_pos_t" in names and "blocks.0.attn.rel_pos_h" in names
    assert "pos_embed_spatial" not in names
    assert model(_video()).shape == (2, 4)


def test_joint_position_embedding_and_image_input():
    model = build_model("mvit_b16_image", input_size=(1, 64, 64), num_classes=3, depth=4,
                        dim_mul=((1, 2.0),), head_mul=((1, 2.0),), pool_q_stride=((1, 1, 2, 2),))
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 96)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 3)
    # (B, C, 1, H, W) is accepted too
    torch.testing.assert_close(model.eval()(x.unsqueeze(2)), model.eval()(x))


def test_other_input_sizes_interpolate_position_embeddings():
    """A 12-frame 40x40 input into the 8x32x32 tiny model (pytorchvideo#180 failed here)."""
    model = build_model("mvit_tiny").eval()
    out = model(_video(b=1, t=12, s=40))
    assert out.shape == (1, 4)
    v2 = build_model("mvit_tiny", **V2_TINY).eval()
    assert torch.isfinite(v2(_video(b=1, t=12, s=48))).all()


def test_separate_embedding_resize_equals_resizing_the_joint_table():
    """pySlowFast resizes the summed (T*H*W) table trilinearly; resizing each factor is equal."""
    torch.manual_seed(0)
    model = build_model("mvit_tiny")
    t, h, w = model.grid
    C = model.cfg.embed_dim
    joint = (model.pos_embed_temporal[:, :, None, :] + model.pos_embed_spatial[:, None, :, :]).reshape(1, t, h, w, C)
    new = (6, 10, 7)
    expected = F.interpolate(joint.permute(0, 4, 1, 2, 3), size=new, mode="trilinear")
    expected = expected.permute(0, 2, 3, 4, 1).reshape(1, -1, C)
    got = model._position_embedding(new)[:, 1:]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bad_inputs_give_clear_errors():
    model = build_model("mvit_tiny")
    with pytest.raises(ValueError, match=r"video model: input must be \(B, C, T, H, W\)"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(2, 4, 8, 32, 32))
    with pytest.raises(ValueError, match="batch is empty"):
        model(torch.randn(0, 3, 8, 32, 32))
    image = build_model("mvitv2_t_image", input_size=(1, 64, 64))
    with pytest.raises(ValueError, match="image model"):
        image(torch.randn(2, 3, 4, 64, 64))
    with pytest.raises(ValueError, match="too small for the patch embedding"):
        build_model("mvit_tiny", input_size=(8, 3, 3), patch_padding=(1, 0, 0))
    with pytest.raises(ValueError, match="drop_path_rate"):
        build_model("mvit_tiny", drop_path_rate=1.0)


def test_input_dtype_and_device_errors_name_the_fix():
    model = build_model("mvit_tiny").eval()
    clip = torch.randn(1, 3, 8, 32, 32)
    with pytest.raises(TypeError, match=r"floating-point tensor \(normalized pixels\), got torch.uint8"):
        model(torch.randint(0, 255, (1, 3, 8, 32, 32), dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"input has dtype torch.float64 but the model's parameters are torch.float32"):
        model(clip.double())
    with pytest.raises(ValueError, match="input is on meta but the model is on cpu"):
        model(clip.to("meta"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(clip.bfloat16()).shape == (1, model.cfg.num_classes)  # autocast casts as usual


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_classes=0), r"num_classes must be an int >= 1, got 0"),
        (dict(num_heads=0), r"num_heads must be an int >= 1"),
        (dict(embed_dim=2.5), r"embed_dim must be an int >= 1, got 2.5"),
        (dict(mlp_ratio=0.0), r"mlp_ratio must be > 0"),
        (dict(head_dropout=1.0), r"head_dropout must be a number in \[0, 1\)"),
        (dict(norm_eps=0.0), r"norm_eps must be a finite number > 0, got 0.0"),
        (dict(pool_norm_eps=-1e-5), r"pool_norm_eps must be a finite number > 0, got -1e-05"),
        (dict(residual_pooling_cls=True), r"residual_pooling_cls=True needs residual_pooling=True"),
        (dict(patch_stride=(2, 0, 4)), r"patch_stride entries must be >= 1"),
        (dict(patch_padding=(1, -1, 3)), r"patch_padding entries must be >= 0"),
        (dict(pool_kvq_kernel=(3, 0, 3)), r"pool_kvq_kernel must be None or a \(t, h, w\) triple of ints >= 1"),
        (dict(pool_q_stride=((1, 1, 0, 2),)), r"strides >= 1"),
        # The explicit strides were dropped for the adaptive ones, silently.
        (dict(pool_kv_stride=((0, 1, 4, 4),)), r"pool_kv_stride and pool_kv_stride_adaptive are exclusive"),
        # -1 was read as the last block; 7 an IndexError.
        (dict(no_kv_pool_blocks=(-1,)), r"no_kv_pool_blocks entries must be block indices in 0..3, got -1"),
        (dict(no_kv_pool_blocks=(7,)), r"no_kv_pool_blocks entries must be block indices in 0..3, got 7"),
        # Unpacking errors ("too many values to unpack") and a TypeError.
        (dict(dim_mul=((1, 2.0, 5),)), r"dim_mul entries must be \(block: int, finite multiplier > 0\) pairs, got \(1, 2.0, 5\)"),
        (dict(head_mul=((1.5, 2.0),)), r"head_mul entries must be \(block: int, finite multiplier > 0\) pairs"),
        (dict(dim_mul=((1, 0.0),)), r"dim_mul entries must be"),
        # Python's own TypeErrors and OverflowErrors, naming no field; norm_eps=inf failed in forward.
        (dict(drop_path_rate="0.1"), r"drop_path_rate must be a number in \[0, 1\), got '0.1'"),
        (dict(head_dropout=None), r"head_dropout must be a number in \[0, 1\), got None"),
        (dict(norm_eps=float("inf")), r"norm_eps must be a finite number > 0, got inf"),
        (dict(dim_mul=None), r"dim_mul must be a list \(one entry per block it changes\), got None"),
        (dict(pool_q_stride=None), r"pool_q_stride must be a list"),
        (dict(no_kv_pool_blocks=1), r"no_kv_pool_blocks must be a list .* got 1"),
        (dict(dim_mul=((1, float("inf")),)), r"dim_mul entries must be \(block: int, finite multiplier > 0\) pairs"),
        # Built: the border patches read padding alone.
        (dict(patch_padding=(1, 5, 2)), r"patch_padding \(1, 5, 2\) must be below patch_kernel \(3, 5, 5\) on every axis"),
        # Built, then failed in forward: "branch must have shape (1, 65, 64) (the pooled x)".
        (dict(pool_kvq_kernel=(2, 2, 2)), r"block 1: q pooling with kernel \(2, 2, 2\) \(pool_kvq_kernel\) and stride "
                                          r"\(1, 2, 2\) gives 5 tokens on axis t of the \(4, 8, 8\) grid"),
        (dict(pool_kvq_kernel=(3, 3, 3), pool_q_stride=((1, 1, 3, 3),), input_size=(8, 36, 36)),
         r"block 1: .* must be even"),
        # Built the opposite model: nn.Linear(bias="False") has a bias, "False" being truthy.
        (dict(qkv_bias="False"), r"qkv_bias must be True or False, got 'False'"),
        (dict(rel_pos_spatial=1), r"rel_pos_spatial must be True or False, got 1"),
        # Failed in forward, deep in an op ("has_cls must be a bool"), not naming the field.
        (dict(cls_embed="no"), r"cls_embed must be True or False, got 'no'"),
        # A TypeError from torch.zeros; a warning and an MLP without hidden units.
        (dict(input_size=(8.5, 32, 32)), r"input_size must be a \(t, h, w\) triple of ints, got \(8.5, 32, 32\)"),
        (dict(mlp_ratio=0.001), r"block 0: mlp_ratio 0.001 gives its MLP \(width 32\) no hidden units"),
        (dict(mlp_ratio=float("inf")), r"mlp_ratio must be > 0 \(a finite number\), got inf"),
        # The second entry for a block replaced the first, silently.
        (dict(pool_q_stride=((1, 1, 2, 2), (1, 1, 1, 1))), r"pool_q_stride gives block 1 more than one entry"),
        (dict(dim_mul=((1, 2.0), (1, 3.0))), r"dim_mul gives block 1 more than one entry"),
        (dict(pool_q_stride=((1, 1, 2.0, 2),)), r"pool_q_stride entry \(1, 1, 2.0, 2\) must be .* ints"),
        # Built, then failed in forward: "mode='avg' needs thw[t]=1 >= kernel[t]=3" (conv and max pad)
        (dict(pool_mode="avg", input_size=(2, 32, 32)),
         r"block 0: avg pooling of k/v with kernel \(3, 3, 3\) on its \(1, 8, 8\) grid \(axis t: 1 < 3\)"),
        (dict(pool_mode="avg", input_size=(8, 16, 16), no_kv_pool_blocks=(2, 3)),
         r"block 3: avg pooling of q with kernel \(3, 3, 3\) on its \(4, 2, 2\) grid \(axis h: 2 < 3\)"),
        # "zeros: Dimension size must be non-negative" from the table's nn.Parameter
        (dict(input_size=(8, 8, 8), rel_pos_spatial=True, pool_q_stride=((1, 1, 4, 4), (2, 1, 2, 2)),
              pool_kv_stride_adaptive=None, pool_kv_stride=((2, 1, 2, 2),)),
         r"block 2: rel_pos_spatial sizes its tables from max\(H, W\) = 1 of its \(4, 1, 1\) grid divided by the "
         r"q and kv strides along h \(2, 2\), as the reference code does: both are 0"),
    ],
)
def test_bad_configs_fail_at_build_time(overrides, match):
    # Before these checks, e.g. num_classes=0 built a model with empty logits and -1 failed
    # inside nn.Linear's init.
    with pytest.raises(ValueError, match=match):
        build_model("mvit_tiny", **overrides)


@pytest.mark.parametrize("fused", [False, True])
def test_q_grid_against_the_skip_is_checked_for_the_input_it_gets(fused):
    # Built for 6 frames (patch grid 3: the even q kernel and the skip's give 2 rows along t), then
    # given 8 (grid 4: 3 rows against 2). The reference failed in the skip's add with an error
    # about its branch; the fused path's class-token-only last block pools no skip and returned logits.
    torch.manual_seed(0)
    model = build_model("mvit_tiny", depth=1, dim_mul=(), head_mul=(), pool_q_stride=((0, 2, 1, 1),),
                        pool_kvq_kernel=(2, 3, 3), pool_kv_stride_adaptive=(1, 1, 1), input_size=(6, 32, 32),
                        drop_path_rate=0.0).set_fused(fused).eval()
    assert model(torch.randn(1, 3, 6, 32, 32)).shape == (1, model.cfg.num_classes)
    with pytest.raises(ValueError, match=r"block 0: q pooling with kernel \(2, 3, 3\) \(pool_kvq_kernel\) and stride "
                                         r"\(2, 1, 1\) gives 3 tokens on axis t of the \(4, 8, 8\) grid, the skip's "
                                         r"pooling \(kernel 3\) 2"):
        model(torch.randn(1, 3, 8, 32, 32))


def _two_block_config(width, kernel):
    """A 1 x width/4 x width/4 patch grid, q pooled with stride 2 at block 0 and 3 at block 1."""
    from mvit.config import MViTConfig

    return MViTConfig(input_size=(1, width, width), patch_kernel=(1, 4, 4), patch_stride=(1, 4, 4),
                      patch_padding=(0, 0, 0), depth=2, embed_dim=8, num_heads=1, dim_mul=(), head_mul=(),
                      pool_q_stride=((0, 1, 2, 2), (1, 1, 3, 3)), pool_kvq_kernel=kernel,
                      pool_kv_stride_adaptive=None)


def test_q_grid_against_the_skip_is_checked_on_the_grids_pooling_gives():
    # The build-time check ran on pySlowFast's floor(n / stride) grids (which size the rel-pos
    # tables), not on the grids pooling gives: 5 -> 2 by floor, 3 by pooling. A grid of 5 built
    # and then failed in forward; one of 7 (3 by floor, 4 by pooling) was refused and runs.
    with pytest.raises(ValueError, match=r"block 1: q pooling with kernel \(1, 3, 3\) \(pool_kvq_kernel\) and stride "
                                         r"\(1, 3, 3\) gives 1 tokens on axis h of the \(1, 3, 3\) grid"):
        MViT(_two_block_config(20, (1, 3, 3)))
    cfg = _two_block_config(28, (1, 3, 3))
    assert [spec.input_thw for spec in cfg.block_specs()] == [(1, 7, 7), (1, 3, 3)]  # the tables' floor grids
    for fused in (False, True):
        model = MViT(cfg, fused=fused)
        model(torch.randn(2, 3, 1, 28, 28)).sum().backward()


def test_switches_and_arguments_of_the_wrong_type_are_refused():
    # bool("no") is True: MViT(cfg, fused="no") ran the fused kernels.
    cfg = build_model("mvit_tiny").cfg
    with pytest.raises(TypeError, match=r"fused must be a bool, got str 'no'"):
        MViT(cfg, fused="no")
    with pytest.raises(TypeError, match=r"fused must be a bool, got int 0"):
        build_model("mvit_tiny").set_fused(0)
    with pytest.raises(TypeError, match=r"checkpoint_activations must be a bool, got str 'yes'"):
        build_model("mvit_tiny", checkpoint_activations="yes")
    # AttributeError: 'NoneType' object has no attribute 'block_specs'
    with pytest.raises(TypeError, match=r"preset must be a preset name or an MViTConfig, got None"):
        build_model(None)
    with pytest.raises(TypeError, match=r"cfg must be an MViTConfig, got dict"):
        MViT(cfg.to_dict())


@pytest.mark.parametrize("shape", [(1, 3, 0, 32, 32), (1, 3, 8, 0, 32), (1, 3, 8, 32, 0)])
def test_inputs_smaller_than_the_patch_kernel_are_named(shape):
    # torch's convolution error ("Calculated padded input size per channel: (2 x 36 x 36). Kernel
    # size: (3 x 5 x 5)") did not say which input or which size.
    model = build_model("mvit_tiny").eval()
    with pytest.raises(ValueError, match=r"input of \(T, H, W\) = .* is smaller than the patch embedding's kernel"):
        model(torch.randn(shape))
    image = build_model("mvitv2_t_image", num_classes=3).eval()
    with pytest.raises(ValueError, match=r"input of \(H, W\) = \(0, 32\) is smaller"):
        image(torch.randn(1, 3, 0, 32))


def test_q_kernels_that_give_the_skips_grid_build_and_run():
    # The q/skip grid check refuses only what fails: kernel 3 at q stride 3 gives the skip's grid
    # where 3 does not divide the axis (8 -> 3 either way), and the stride + 1 rule's even kernel
    # always does.
    for overrides in (dict(pool_kvq_kernel=(3, 3, 3)), dict(pool_kvq_kernel=None)):
        model = build_model("mvit_tiny", pool_q_stride=((1, 1, 3, 3),), dim_mul=((1, 2.0),), head_mul=((1, 2.0),),
                            **overrides)
        assert model.specs[1].stride_q == (1, 3, 3)
        assert model(torch.randn(1, 3, 8, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused-cls-only-last-block"])
def test_activation_checkpointing_gives_the_same_gradients(fused):
    torch.manual_seed(0)
    model = build_model("mvit_tiny", drop_path_rate=0.0, fused=fused)
    ckpt = build_model("mvit_tiny", drop_path_rate=0.0, checkpoint_activations=True, fused=fused)
    ckpt.load_state_dict(model.state_dict())
    x = _video()
    model(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_with_checkpointing_runs():
    model = build_model("mvit_tiny", checkpoint_activations=True, **V2_TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_video())
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_stochastic_depth_is_per_sample_in_training_only():
    torch.manual_seed(0)
    model = build_model("mvit_tiny", drop_path_rate=0.5)
    x = _video(b=4)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_initialization_follows_the_reference_repositories():
    torch.manual_seed(0)
    model = build_model("mvit_b_16x4", depth=2, dim_mul=(), head_mul=(), pool_q_stride=())
    qkv = model.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(qkv.bias) == 0
    assert torch.all(model.blocks[0].norm1.weight == 1) and torch.count_nonzero(model.norm.bias) == 0
    assert abs(model.pos_embed_spatial.std().item() - 0.02) < 0.002


def test_no_weight_decay_names():
    names = build_model("mvit_tiny").no_weight_decay()
    assert {"cls_token", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class"} <= names
    v2 = build_model("mvit_tiny", **V2_TINY).no_weight_decay()
    assert "blocks.0.attn.rel_pos_h" in v2


def test_specs_are_explicit_per_block():
    model = build_model("mvit_b_16x4", depth=2, dim_mul=(), head_mul=(), pool_q_stride=())
    assert len(model.specs) == 2 and model.specs == get_preset("mvit_b_16x4").replace(
        depth=2, dim_mul=(), head_mul=(), pool_q_stride=()
    ).block_specs()


CLS_ONLY_CASES = {"v1-conv": dict(), "v1-max": dict(pool_mode="max"), "v2": V2_TINY,
                  "v2-max-no-residual": dict(V2_TINY, pool_mode="max", residual_pooling=False)}


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("overrides", CLS_ONLY_CASES.values(), ids=CLS_ONLY_CASES.keys())
def test_cls_only_block_is_row_0_of_the_whole_block(overrides, fused):
    """Every block of the tiny models (q pooling with its LayerNorm, the pooled skip, channel
    expansion in the attention (v2) or the MLP (v1), rel-pos, residual pooling) run for the
    class token alone gives row 0 of its whole output, and the same parameter gradients from it;
    in training mode, stochastic depth drawing the same per-sample factors. float64, 1e-10."""
    torch.manual_seed(0)
    model = build_model("mvit_tiny", drop_path_rate=0.5, **overrides).double().train()
    if fused:
        model.set_fused(True)
    x, thw = model.patch_embed(_video().double())
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    kinds = set()
    for block in model.blocks:
        params = [p for p in block.parameters()]
        torch.manual_seed(1)
        whole, thw_whole = block(x, thw, fused)
        grads_whole = torch.autograd.grad(whole[:, :1].square().sum(), params, allow_unused=True)
        torch.manual_seed(1)
        cls, thw_cls = block(x, thw, fused, cls_only=True)
        grads_cls = torch.autograd.grad(cls.square().sum(), params, allow_unused=True)
        assert cls.shape == (x.shape[0], 1, whole.shape[-1]) and thw_cls == thw_whole
        torch.testing.assert_close(cls, whole[:, :1], atol=1e-10, rtol=1e-10)
        for g_cls, g_whole in zip(grads_cls, grads_whole):
            # every parameter in the graph, as in the whole block (DDP needs it): the rel-pos tables,
            # which the class row does not read, with a zero gradient
            assert (g_cls is None) == (g_whole is None)
            if g_whole is not None:
                torch.testing.assert_close(g_cls, g_whole, atol=1e-10, rtol=1e-10)
        kinds |= {"pool_skip"} if block.spec.pool_skip else set()
        kinds |= {"proj"} if block.proj is not None else set()
        x, thw = whole.detach(), thw_whole
    assert kinds == {"pool_skip", "proj"}  # the cases above reach both


def test_forward_runs_the_last_block_for_the_class_token_on_the_fused_path():
    torch.manual_seed(0)
    ref = build_model("mvit_tiny").double().eval()
    fused = build_model("mvit_tiny", fused=True).double().eval()
    fused.load_state_dict(ref.state_dict())
    seen = []
    for model in (ref, fused):
        model.blocks[-1].register_forward_hook(lambda mod, args, out: seen.append(out[0].shape[1]))
    x = _video().double()
    torch.testing.assert_close(fused(x), ref(x), atol=1e-10, rtol=1e-10)
    assert seen == [1, 1 + 4 * 2 * 2]  # the fused model's class token, the reference's every token (4x2x2 grid)
    seen.clear()
    logits = ref(x, cls_only=True)  # asked of the reference
    assert seen == [1]
    torch.testing.assert_close(logits, fused(x), atol=1e-10, rtol=1e-10)
    features, thw = fused.forward_features(x)  # all tokens unless asked
    assert features.shape[1] == 1 + 4 * 2 * 2 and thw == (4, 2, 2)
    nocls = build_model("mvit_tiny", cls_embed=False, fused=True).eval()
    assert nocls(_video()).shape == (2, 4)  # mean pooling reads every token: the whole last block
    with pytest.raises(ValueError, match="cls_only needs a class token; mvit_tiny has none"):
        nocls.forward_features(_video(), cls_only=True)
    with pytest.raises(TypeError, match="cls_only must be a bool, got str 'no'"):  # was read as True
        fused(x, cls_only="no")


@pytest.mark.parametrize("overrides", [dict(), V2_TINY], ids=["v1", "v2"])
def test_reference_class_token_path_has_a_double_backward(overrides):
    # The reference path promises every order (README). Before, cls_only=True ran the class row's
    # attention through SDPA, whose CPU kernel has no double backward: a gradient penalty failed
    # ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented").
    torch.manual_seed(0)
    model = build_model("mvit_tiny", drop_path_rate=0.0, **overrides).double()
    x = _video(b=1).double()
    penalties = []
    for cls_only in (False, True):
        leaf = x.clone().requires_grad_()
        grad_x, = torch.autograd.grad(model(leaf, cls_only=cls_only).square().sum(), leaf, create_graph=True)
        penalties.append(torch.autograd.grad(grad_x.square().sum(), model.blocks[-1].attn.qkv.weight)[0])
    torch.testing.assert_close(penalties[1], penalties[0], atol=1e-10, rtol=1e-10)


def test_cls_only_skips_the_last_blocks_other_tokens_flops():
    """MViT-B 16x4's last block: 392 grid tokens, 393 keys, 768 channels, MLP 3072: the class
    token alone saves their projection and MLP, and their attention rows (q k^T and p v)."""
    from mvit.flops import count_model

    cfg = get_preset("mvit_b_16x4")
    whole, cls = (count_model(cfg, cls_only=c).gflops for c in (False, True))
    saved = 392 * (768 * 768 + 768 * 3072 + 3072 * 768) + 2 * 392 * 393 * 768
    assert whole - cls == pytest.approx(saved / 1e9, rel=1e-9)
    assert count_model(cfg).gflops == whole  # the reference's default: every token


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_fused_flops_on_cpu_tensors_are_the_meta_count(v2):
    # FlopCounterMode had no formula for CPU SDPA (the fused path's attention on CPU): the fused
    # count on CPU tensors was 15% short of the same model's on meta (where SDPA runs as matmuls).
    # Its backward is counted as torch counts the CUDA flash backward (which recomputes q k^T), so
    # a training step's count is compared forward only.
    from torch.utils.flop_counter import FlopCounterMode

    from mvit.flops import count_model

    cfg = get_preset("mvit_tiny").replace(**(V2_TINY if v2 else {}))
    assert count_model(cfg, fused=True, device="cpu").gflops == count_model(cfg, fused=True).gflops
    forward = []
    for device in ("meta", "cpu"):
        with torch.device(device):
            model = build_model(cfg, fused=True, drop_path_rate=0.0)  # train mode, with gradients
        with FlopCounterMode(display=False) as counter:
            loss = model(torch.randn(2, 3, 8, 32, 32, device=device)).sum()
        forward.append(counter.get_total_flops())
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        if device == "cpu":
            counts = counter.get_flop_counts()["Global"]
            assert counts[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] > 0
    assert forward[0] == forward[1] > 0


def test_flop_counts_refuse_input_sizes_the_model_cannot_read():
    from mvit.flops import count_model

    # An image model counted one frame under a header of 16.
    with pytest.raises(ValueError, match="mvitv2_s_image is an image model, T must be 1, got 16"):
        count_model(get_preset("mvitv2_s_image"), input_size=(16, 224, 224))
    # A conv error inside the count, a traceback from `mvit flops`.
    with pytest.raises(ValueError, match=r"input_size \(8, 0, 0\) is too small for mvit_tiny's patch embedding"):
        count_model(get_preset("mvit_tiny"), input_size=(8, 0, 0))
