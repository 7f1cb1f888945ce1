"""Checkpoint converters against the source models (torchvision, timm, pytorchvideo) and hand-built
layouts (pySlowFast). Tolerance: fp32 max abs difference <= 1e-5 on the logits."""

import pytest
import timm
import torch
import torchvision
from pytorchvideo.models.hub import vision_transformers as ptv
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

from mvit import build_model, get_preset
from mvit.convert import (
    CheckpointMismatchError,
    check_state_dict,
    convert_torchvision,
    from_pretrained,
    pytorchvideo_config,
    timm_config,
    torchvision_config,
)
from mvit.flops import count_model

ATOL = 1e-5


@pytest.mark.parametrize(
    "builder, num_classes",
    [(torchvision.models.video.mvit_v1_b, 400), (torchvision.models.video.mvit_v2_s, 11)],
)
def test_torchvision_weights_give_the_same_outputs(builder, num_classes):
    torch.manual_seed(0)
    source = builder(num_classes=num_classes).eval()
    model = from_pretrained(source.state_dict(), source="torchvision").eval()
    assert model.cfg.num_classes == num_classes
    x = torch.randn(1, 3, 16, 224, 224)
    with torch.no_grad():
        expected, got = source(x), model(x)
    assert (expected - got).abs().max().item() <= ATOL
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in source.parameters())


def test_torchvision_checkpoint_file_and_wrong_preset(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.video.mvit_v2_s(num_classes=5)
    path = tmp_path / "tv.pth"
    torch.save(source.state_dict(), path)
    model = from_pretrained(path, source="torchvision")
    assert model.cfg.name == "mvitv2_s_16x4"
    with pytest.raises(CheckpointMismatchError) as info:
        from_pretrained(path, source="torchvision", preset="mvit_b_16x4")
    message = str(info.value)
    assert "missing keys" in message and "pos_embed_spatial" in message
    assert "unexpected keys" in message and "rel_pos_h" in message
    assert "mis-shaped keys" in message and "head.projection.weight" in message


def _to_pyslowfast_layout(model, separate_qkv=False, drop_kv_blocks=()):
    """Write a state_dict by hand in pySlowFast's key layout (model_state nesting, norm_q/k/v
    beside pool_q/k/v, head.projection), as its model zoo files hold them."""
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if len(parts) == 6 and parts[2] == "attn" and parts[3].startswith("pool_") and parts[4] == "norm":
            # blocks.i.attn.pool_q.norm.weight -> blocks.i.attn.norm_q.weight
            key = f"blocks.{parts[1]}.attn.norm_{parts[3][-1]}.{parts[5]}"
        if separate_qkv and key.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            prefix, part = key.rsplit(".qkv.", 1)
            for name, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}.{name}.{part}"] = chunk.clone()
            continue
        out[key] = value.clone()
    for b in drop_kv_blocks:
        for key in [k for k in out if k.startswith(f"blocks.{b}.attn.") and ("_k." in k or "_v." in k)]:
            del out[key]
    return {"model_state": {f"module.{k}": v for k, v in out.items()}, "epoch": 3}


@pytest.mark.parametrize("separate_qkv", [False, True])
def test_pyslowfast_layout_loads_into_the_same_model(separate_qkv):
    torch.manual_seed(2)
    source = build_model("mvit_tiny", num_classes=6).eval()
    checkpoint = _to_pyslowfast_layout(source, separate_qkv=separate_qkv)
    assert "blocks.0.attn.norm_k.weight" in {k[len("module."):] for k in checkpoint["model_state"]}
    model = from_pretrained(checkpoint, source="pyslowfast", preset="mvit_tiny").eval()
    assert model.cfg.num_classes == 6
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        assert (source(x) - model(x)).abs().max().item() <= ATOL


def test_old_pyslowfast_checkpoints_without_kv_pooling_in_the_last_blocks():
    """SlowFast#456: stride-1 blocks of old checkpoints have no K/V pooling at all."""
    torch.manual_seed(3)
    last = (2, 3)  # mvit_tiny's blocks whose K/V stride has shrunk to 1
    source = build_model("mvit_tiny", no_kv_pool_blocks=last).eval()
    assert all(source.blocks[b].attn.pool_k is None for b in last)
    checkpoint = _to_pyslowfast_layout(source)
    model = from_pretrained(checkpoint, source="pyslowfast", preset="mvit_tiny").eval()
    assert model.cfg.no_kv_pool_blocks == last
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        assert (source(x) - model(x)).abs().max().item() <= ATOL


def test_a_preset_of_another_depth_names_the_presets_that_fit():
    checkpoint = _to_pyslowfast_layout(build_model("mvit_tiny", depth=24, dim_mul=((2, 2.0),), head_mul=((2, 2.0),),
                                                   pool_q_stride=((2, 1, 2, 2),)))
    with pytest.raises(CheckpointMismatchError, match=r"^the checkpoint has 24 blocks, preset mvit_b_32x3 has 16: "
                                                      r"try mvit_b24_32x3 or mvitv2_b_32x3$"):
        from_pretrained(checkpoint, source="pyslowfast", preset="mvit_b_32x3")


def test_missing_kv_pooling_of_a_strided_block_is_an_error_not_another_architecture():
    # Only stride-1 blocks can be SlowFast#456's; mvit_tiny's block 0 has K/V stride (1, 2, 2).
    # Its missing pool_k/pool_v loaded as a block without K/V pooling, outputs 0.05 off, silently.
    source = build_model("mvit_tiny")
    assert source.blocks[0].spec.stride_kv != (1, 1, 1)
    checkpoint = _to_pyslowfast_layout(source, drop_kv_blocks=(0,))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(6\): blocks\.0\.attn\.pool_k"):
        from_pretrained(checkpoint, source="pyslowfast", preset="mvit_tiny")


def test_checkpoints_of_mvit_train_load_with_their_config(tmp_path):
    # `mvit train` stores the config as "model_config"; from_pretrained only read "config".
    torch.manual_seed(5)
    source = build_model("mvit_tiny", num_classes=3).eval()
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": source.state_dict(), "model_config": source.cfg, "epoch": 1}, path)
    model = from_pretrained(path).eval()
    assert model.cfg == source.cfg
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), atol=0, rtol=0)


def test_pyslowfast_errors_list_every_bad_key():
    source = build_model("mvit_tiny")
    checkpoint = _to_pyslowfast_layout(source)
    state = checkpoint["model_state"]
    del state["module.norm.weight"]
    state["module.extra.weight"] = torch.zeros(1)
    state["module.blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatchError) as info:
        from_pretrained(checkpoint, source="pyslowfast", preset="mvit_tiny")
    message = str(info.value)
    assert "missing keys (1): norm.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "blocks.0.mlp.fc1.weight: checkpoint (3, 3)" in message


def test_values_that_are_no_weights_are_listed_and_non_finite_ones_warned():
    # load_state_dict cast an integer tensor silently, copied nothing useful from meta tensors
    # ("Cannot copy out of meta tensor" among torch's lines) and failed on a number with an
    # AttributeError; NaN weights loaded without a word and gave NaN logits.
    source = build_model("mvit_tiny")
    state = dict(source.state_dict())
    state["head.projection.weight"] = state["head.projection.weight"].long()
    state["norm.weight"] = state["norm.weight"].to("meta")
    state["norm.bias"] = 0.0
    checkpoint = {"model": state, "model_config": source.cfg}
    with pytest.raises(CheckpointMismatchError) as info:
        from_pretrained(checkpoint)
    message = str(info.value)
    assert "missing keys (1): norm.bias" in message, message  # a checkpoint's non-tensors are not read
    assert ("mis-typed keys (2): norm.weight: meta tensor, head.projection.weight: checkpoint torch.int64 vs "
            "model torch.float32") in message, message
    with pytest.raises(CheckpointMismatchError, match=r"mis-typed keys \(3\): norm.bias: float, norm.weight: meta"):
        check_state_dict(source, state, "the")  # given directly, they are named
    state = dict(source.state_dict())
    state["cls_token"] = state["cls_token"].clone()
    state["cls_token"][0, 0, 3] = float("nan")
    with pytest.warns(UserWarning, match=r"mvit_kernels checkpoint: 1 tensor\(s\) hold NaN or inf values: cls_token$"):
        from_pretrained({"model": state, "model_config": source.cfg})


@pytest.mark.parametrize("convert, state, match", [
    # ZeroDivisionError, IndexError, a 50-token table read as a 7x7 grid: none named the key
    (timm_config, {"stages.0.blocks.0.attn.pool_q.weight": torch.randn(0, 1, 3, 3),
                   "patch_embed.proj.weight": torch.randn(96, 3, 7, 7)},
     r"not a timm MViTv2 state_dict: stages.0.blocks.0.attn.pool_q.weight has shape \(0, 1, 3, 3\), expected 4 "
     r"non-empty dimensions"),
    (timm_config, {"stages.0.blocks.0.attn.pool_q.weight": torch.randn(96, 1, 3, 3),
                   "patch_embed.proj.weight": torch.randn(96, 3, 7, 7), "pos_embed": torch.randn(5)},
     r"pos_embed has shape \(5,\), expected 3 non-empty dimensions"),
    (convert_torchvision, {"pos_encoding.class_token": torch.tensor(1.0)},
     r"not a torchvision MViT state_dict: pos_encoding.class_token has shape \(\), expected \(C,\) or \(L, C\)"),
    (torchvision_config, {"pos_encoding.spatial_pos": torch.randn(50, 96), "pos_encoding.temporal_pos": torch.randn(8, 96)},
     r"a position table of 50 tokens is not a square grid"),
])
def test_malformed_tensors_are_named(convert, state, match):
    with pytest.raises(CheckpointMismatchError, match=match):
        convert(state)


def test_pyslowfast_needs_a_preset_and_sources_are_checked(tmp_path):
    with pytest.raises(ValueError, match="needs preset"):
        from_pretrained({}, source="pyslowfast")
    with pytest.raises(ValueError, match="source must be one of"):
        from_pretrained({}, source="detectron2")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        from_pretrained(tmp_path / "nope.pyth", source="pyslowfast", preset="mvit_tiny")
    # AttributeError: 'int' object has no attribute 'block_specs'
    with pytest.raises(TypeError, match=r"preset must be a preset name, an MViTConfig or None, got 3"):
        from_pretrained({}, source="pyslowfast", preset=3)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", b"PK\x03\x04 torn zip"], ids=["empty", "text", "torn"])
def test_a_file_that_is_no_checkpoint_is_named(tmp_path, content):
    # An empty file raised EOFError with no message, a text file KeyError: 101: neither named it.
    path = tmp_path / "weights.pyth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{path} cannot be read as a checkpoint \("):
        from_pretrained(path, source="pyslowfast", preset="mvit_tiny")
    torch.save([torch.ones(1)], path)
    with pytest.raises(ValueError, match=rf"{path} holds a list, not a state_dict or a checkpoint dict"):
        from_pretrained(path, source="torchvision")


def test_image_repository_layout_with_2d_convs():
    """facebookresearch/mvit stores Conv2d pooling weights (d, 1, kH, kW)."""
    torch.manual_seed(4)
    source = build_model("mvitv2_t_image", num_classes=3, input_size=(1, 64, 64)).eval()
    checkpoint = _to_pyslowfast_layout(source)
    state = checkpoint["model_state"]
    for key in [k for k in state if k.endswith(("pool_q.weight", "pool_k.weight", "pool_v.weight"))]:
        state[key] = state[key].squeeze(2)
    model = from_pretrained(checkpoint, source="mvit", preset="mvitv2_t_image", input_size=(1, 64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (source(x) - model(x)).abs().max().item() <= ATOL


def test_convert_torchvision_reshapes_position_tables():
    source = torchvision.models.video.mvit_v1_b()
    state = convert_torchvision(source.state_dict())
    assert state["cls_token"].shape == (1, 1, 96)
    assert state["pos_embed_spatial"].shape == (1, 56 * 56, 96)
    assert state["pos_embed_temporal"].shape == (1, 8, 96)
    assert state["head.projection.weight"].shape == (400, 768)


# --- timm: an independent implementation of the image MViTv2 models -------------------------------


def _randomize(model):
    """Every parameter random (LayerNorm scales around 1), so that no term of the forward is
    left out of the comparison by a zero or identity initialization."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if ("norm" in name and name.endswith("weight")) else 0.0))
    return model.eval()


_TIMM_SMALL = dict(depths=(1, 2, 1, 1), embed_dim=32, num_heads=2)


@pytest.mark.parametrize(
    "make, size, name",
    [
        # The registered model at its real size: the preset is recognized from the weights.
        (lambda: timm.create_model("mvitv2_tiny"), 224, "mvitv2_t_image"),
        # Small stand-ins for the others: class token (timm's *_cls, the authors' IN-21K models),
        # channels grown in the MLP (MViTv2-L), absolute position embeddings, other class counts.
        (lambda: MultiScaleVit(MultiScaleVitCfg(**_TIMM_SMALL, use_cls_token=True), img_size=64, num_classes=7),
         64, "mvitv2_image_1-2-1-1"),
        (lambda: MultiScaleVit(MultiScaleVitCfg(**_TIMM_SMALL, expand_attn=False), img_size=64, num_classes=5),
         64, "mvitv2_image_1-2-1-1"),
        (lambda: MultiScaleVit(MultiScaleVitCfg(**_TIMM_SMALL, expand_attn=False, use_cls_token=True,
                                                use_abs_pos=True), img_size=64, num_classes=3),
         64, "mvitv2_image_1-2-1-1"),
    ],
    ids=["mvitv2_tiny", "cls_token", "mlp_grows_channels", "cls_abs_pos_mlp_grows"],
)
@pytest.mark.parametrize("fused", [False, True])
def test_timm_mvitv2_gives_the_same_outputs(make, size, name, fused):
    torch.manual_seed(5)
    source = _randomize(make())
    model = from_pretrained(source.state_dict(), source="timm", fused=fused).eval()
    assert model.cfg.name == name
    assert model.cfg.num_classes == source.num_classes
    assert model.cfg.input_size == (1, size, size)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in source.parameters())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, got = source(x), model(x)
    assert (expected - got).abs().max().item() <= ATOL


@pytest.mark.parametrize(
    "timm_name, preset",
    [("mvitv2_tiny", "mvitv2_t_image"), ("mvitv2_small", "mvitv2_s_image"), ("mvitv2_base", "mvitv2_b_image"),
     ("mvitv2_large", "mvitv2_l_image"), ("mvitv2_base_cls", None), ("mvitv2_huge_cls", "mvitv2_h_image")],
)
def test_timm_architectures_are_read_from_the_weights(timm_name, preset):
    """Every registered timm MViTv2 (weights on the meta device: shapes only) maps to a config
    with exactly its parameters; the IN-1K ones and MViTv2-H (its IN-21K head) are this project's presets."""
    source = timm.create_model(timm_name, device="meta")
    cfg = timm_config(source.state_dict())
    if preset is not None:
        assert cfg == get_preset(preset).replace(num_classes=source.num_classes)
    else:
        assert cfg.cls_embed and cfg.name.startswith("mvitv2_image_")
    assert count_model(cfg).params == sum(p.numel() for p in source.parameters())


def test_timm_safetensors_file_preset_override_and_errors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(6)
    source = _randomize(MultiScaleVit(MultiScaleVitCfg(**_TIMM_SMALL), img_size=64, num_classes=4))
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    model = from_pretrained(path, source="timm").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (source(x) - model(x)).abs().max().item() <= ATOL
    # A preset names another architecture: every mismatch is listed, nothing loads silently.
    with pytest.raises(CheckpointMismatchError, match="mis-shaped keys.*patch_embed.proj.weight"):
        from_pretrained(path, source="timm", preset="mvitv2_t_image")
    with pytest.raises(CheckpointMismatchError, match="not a timm MViTv2 state_dict"):
        from_pretrained(torchvision.models.video.mvit_v1_b().state_dict(), source="timm")


def test_mvit_repository_checkpoint_with_a_class_token():
    """facebookresearch/mvit's IN-21K models have a class token, which its residual pooling
    connection includes (as timm's port does; pySlowFast leaves it out): the token is read from the
    checkpoint, the preset names the rest."""
    torch.manual_seed(7)
    source = _randomize(MultiScaleVit(MultiScaleVitCfg(**_TIMM_SMALL, use_cls_token=True), img_size=64, num_classes=6))
    ours = from_pretrained(source.state_dict(), source="timm")
    checkpoint = _to_pyslowfast_layout(ours)
    state = checkpoint["model_state"]
    for key in [k for k in state if k.endswith(("pool_q.weight", "pool_k.weight", "pool_v.weight"))]:
        state[key] = state[key].squeeze(2)  # the image repository's Conv2d pooling
    preset = ours.cfg.replace(cls_embed=False, residual_pooling_cls=False, num_classes=1000)
    model = from_pretrained(checkpoint, source="mvit", preset=preset).eval()
    assert model.cfg.cls_embed and model.cfg.residual_pooling_cls and model.cfg.num_classes == 6
    # timm's own file with a preset naming the architecture: timm's rule for the class row still.
    named = from_pretrained(source.state_dict(), source="timm", preset=preset.replace(cls_embed=True)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (source(x) - model(x)).abs().max().item() <= ATOL
        assert (source(x) - named(x)).abs().max().item() <= ATOL
    # A class-token model without residual pooling (MViT v1) keeps the connection off.
    v1 = build_model("mvit_b16_image", num_classes=3, input_size=(1, 64, 64))
    loaded = from_pretrained(_to_pyslowfast_layout(v1), source="mvit", preset="mvit_b16_image", input_size=(1, 64, 64))
    assert loaded.cfg.cls_embed and not loaded.cfg.residual_pooling_cls


@pytest.mark.parametrize("expand_attn", [True, False], ids=["in-attention", "in-the-mlp"])
def test_mvit_repository_checkpoints_say_where_channels_grow(expand_attn):
    """facebookresearch/mvit releases MViTv2-L twice: IN-1K growing channels in the MLP (the
    mvitv2_l_image preset), IN-21K in attention (timm's mvitv2_large_cls). The shortcut
    projections' blocks say which; the preset names the rest."""
    torch.manual_seed(8)
    source = _randomize(MultiScaleVit(MultiScaleVitCfg(**_TIMM_SMALL, use_cls_token=True, expand_attn=expand_attn),
                                      img_size=64, num_classes=6))
    ours = from_pretrained(source.state_dict(), source="timm")
    assert ours.cfg.dim_mul_in_att == expand_attn
    checkpoint = _to_pyslowfast_layout(ours)
    state = checkpoint["model_state"]
    for key in [k for k in state if k.endswith(("pool_q.weight", "pool_k.weight", "pool_v.weight"))]:
        state[key] = state[key].squeeze(2)
    preset = ours.cfg.replace(dim_mul_in_att=not expand_attn)  # the other release's architecture
    model = from_pretrained(checkpoint, source="mvit", preset=preset).eval()
    assert model.cfg.dim_mul_in_att == expand_attn
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (source(x) - model(x)).abs().max().item() <= ATOL


@pytest.mark.parametrize(
    "cfg", [dict(), dict(use_cls_token=True), dict(expand_attn=False), dict(expand_attn=False, use_cls_token=True,
                                                                          use_abs_pos=True)],
    ids=["plain", "cls_token", "mlp_grows_channels", "cls_abs_pos_mlp_grows"])
def test_the_hand_built_repository_layout_is_the_one_timm_reads(cfg):
    """The tests above write facebookresearch/mvit's key layout by hand (_to_pyslowfast_layout).
    timm ships its own converter for the authors' files (checkpoint_filter_fn): it must load that
    hand-built file into timm's model strictly and give the source's outputs, so the layout the
    converter is tested on is not only this project's reading of the authors' code."""
    from timm.models.mvitv2 import checkpoint_filter_fn

    def make():
        return MultiScaleVit(MultiScaleVitCfg(**_TIMM_SMALL, **cfg), img_size=64, num_classes=5).eval()

    torch.manual_seed(9)
    source = _randomize(make())
    ours = from_pretrained(source.state_dict(), source="timm").eval()
    # As the authors' files hold it: no DDP "module." prefix, Conv2d pooling weights.
    state = {k.removeprefix("module."): v for k, v in _to_pyslowfast_layout(ours)["model_state"].items()}
    for key in [k for k in state if k.endswith(("pool_q.weight", "pool_k.weight", "pool_v.weight"))]:
        state[key] = state[key].squeeze(2)
    timm_model = make()
    timm_model.load_state_dict(checkpoint_filter_fn({"model_state": dict(state)}, timm_model), strict=True)
    loaded = from_pretrained({"model_state": state}, source="mvit", preset=ours.cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source(x)
        assert torch.equal(timm_model(x), expected)
        assert (loaded(x) - expected).abs().max().item() <= ATOL


# --- pytorchvideo: its MViT-B models (Kinetics 16x4 and 32x3, ImageNet) ---------------------------


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: ptv.mvit_base_16x4(spatial_size=64, temporal_size=8, head_num_classes=7), torch.randn(2, 3, 8, 64, 64)),
        # Its image model keeps separate position tables over one frame: one joint table here.
        (lambda: ptv.mvit_base_16(spatial_size=64, head_num_classes=5), torch.randn(2, 3, 64, 64)),
    ],
    ids=["mvit_base_16x4", "mvit_base_16"],
)
@pytest.mark.parametrize("fused", [False, True])
def test_pytorchvideo_weights_give_the_same_outputs(make, x, fused):
    """pytorchvideo's MViT differs from pySlowFast's in one place: the LayerNorms after pooling
    use eps 1e-5 (torch's default), the others 1e-6. With 1e-6 there the logits here are 2e-4 apart."""
    torch.manual_seed(8)
    source = _randomize(make())
    model = from_pretrained(source.state_dict(), source="pytorchvideo", fused=fused).eval()
    assert model.cfg.pool_norm_eps == 1e-5 and model.cfg.num_classes == source.head.proj.out_features
    with torch.no_grad():
        expected, got = source(x), model(x)
    assert (expected - got).abs().max().item() <= ATOL


@pytest.mark.parametrize(
    "make, preset, folded",
    [(ptv.mvit_base_16x4, "mvit_b_16x4", 0), (ptv.mvit_base_32x3, "mvit_b_32x3", 0),
     (lambda: ptv.mvit_base_16(head_num_classes=1000), "mvit_b16_image", 96)],
)
def test_pytorchvideo_models_are_presets(make, preset, folded):
    """The model zoo's three MViTs are presets here, with their parameter counts (the image model's
    class and one-frame temporal position rows, 2 x 96, fold into one joint class row)."""
    source = make()
    cfg = pytorchvideo_config(source.state_dict())
    assert cfg == get_preset(preset).replace(pool_norm_eps=1e-5)
    assert count_model(cfg).params == sum(p.numel() for p in source.parameters()) - folded


def test_pytorchvideo_preset_override_and_errors():
    torch.manual_seed(9)
    source = _randomize(ptv.mvit_base_16x4(spatial_size=64, temporal_size=8, head_num_classes=3))
    model = from_pretrained(source.state_dict(), source="pytorchvideo", preset="mvit_b_16x4",
                            input_size=(8, 64, 64)).eval()
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        assert (source(x) - model(x)).abs().max().item() <= ATOL
    with pytest.raises(CheckpointMismatchError, match="unexpected keys.*pos_embed_spatial"):
        from_pretrained(source.state_dict(), source="pytorchvideo", preset="mvitv2_s_16x4")
    with pytest.raises(CheckpointMismatchError, match="not a pytorchvideo MViT state_dict"):
        from_pretrained(torchvision.models.video.mvit_v1_b().state_dict(), source="pytorchvideo")
