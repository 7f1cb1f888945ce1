"""--finetune: checkpoints of this project, pySlowFast's layout (model_state, module., norm_q,
separate q/k/v) and another input size load into the new model; a file that fits nothing is an error."""

import pytest
import torch

from mvit import build_model
from mvit.cli import main
from mvit.train import _load_finetune

# the model kinds whose position tables differ: separate and joint absolute embeddings, MViTv2's rel-pos tables
VARIANTS = {
    "separate": {},
    "joint": {"abs_pos": "joint"},
    "rel_pos": {"abs_pos": "none", "rel_pos_spatial": True, "rel_pos_temporal": True, "residual_pooling": True,
                "dim_mul_in_att": True},
}


def _random_model(seed, **overrides):
    torch.manual_seed(seed)
    model = build_model("mvit_tiny", **overrides)
    with torch.no_grad():
        for p in model.parameters():  # every table non-zero (rel-pos tables start at zero)
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _pyslowfast_layout(model) -> dict:
    """The key layout of pySlowFast's model zoo files: norm_q/k/v, separate q/k/v, module., model_state."""
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if len(parts) == 6 and parts[3].startswith("pool_") and parts[4] == "norm":
            key = f"blocks.{parts[1]}.attn.norm_{parts[3][-1]}.{parts[5]}"
        if key.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            prefix, part = key.rsplit(".qkv.", 1)
            for name, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"module.{prefix}.{name}.{part}"] = chunk.clone()
            continue
        out[f"module.{key}"] = value.clone()
    return {"model_state": out, "epoch": 30}


@pytest.mark.parametrize("layout", ["mvit_train", "pyslowfast"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_another_input_size_computes_what_the_checkpoint_computes_there(tmp_path, layout, variant):
    # The README: inputs of other sizes work, position tables interpolated. Fine-tuning at another
    # size re-initialized every position table instead (another shape); from pySlowFast's layout,
    # every tensor (the model_state nesting was not unwrapped).
    source = _random_model(0, **VARIANTS[variant])
    path = str(tmp_path / "source.pt")
    torch.save({"model": source.state_dict(), "model_config": source.cfg} if layout == "mvit_train"
               else _pyslowfast_layout(source), path)
    target = _random_model(1, input_size=(16, 48, 48), **VARIANTS[variant])
    _load_finetune(target, path, verbose=False)
    x = torch.randn(2, 3, 16, 48, 48)
    with torch.no_grad():
        expected = source(x)  # the source model resizes its tables for this input
        assert (target(x) - expected).abs().max().item() < 1e-5


def test_finetune_from_pyslowfast_layout_on_the_command_line(tmp_path, capsys):
    source = _random_model(0, num_classes=6)
    path = str(tmp_path / "K400.pyth")
    torch.save(_pyslowfast_layout(source), path)
    out = tmp_path / "ft"
    assert main(["train", "--finetune", path, "--crop-size", "40", "--synthetic-size", "8", "0", "--batch-size", "8",
                 "--max-steps", "1", "--threads", "1", "--no-progress", "--output-dir", str(out)]) == 0
    err = capsys.readouterr().err
    n = len(source.state_dict())
    assert f"loaded {n - 2} of the model's {n} tensors, interpolated ['pos_embed_spatial']" in err, err
    assert "re-initialized ['head.projection.bias', 'head.projection.weight']" in err, err
    # the checkpoint's 6-class head is what the 4-class model left unused
    assert f"left unused 2 of the checkpoint's {n} tensors: ['head.projection.bias', 'head.projection.weight']" in err


def test_a_checkpoint_of_a_deeper_model_says_what_it_left_unused(tmp_path, capsys):
    # Matched by name, a 4-block model took a 6-block checkpoint's first blocks without a word
    # about blocks 4 and 5.
    source = _random_model(0, depth=6)
    path = str(tmp_path / "deep.pt")
    torch.save({"model": source.state_dict(), "model_config": source.cfg}, path)
    _load_finetune(_random_model(1), path, verbose=True)
    err = capsys.readouterr().err
    assert "left unused" in err and "blocks.4." in err, err
    assert f"the checkpoint's model is {source.cfg.name}, depth 6; this one" in err and "depth 4" in err, err


def test_a_checkpoint_that_fits_nothing_is_an_error(tmp_path, capsys):
    other = str(tmp_path / "other.pt")
    torch.save({"model": {"encoder.layer.0.weight": torch.zeros(3, 3)}}, other)
    log = tmp_path / "log.jsonl"
    log.write_text('{"kind": "train"}\n')
    for path, message in ((other, f"--finetune {other}: none of its 1 tensors fits mvit_tiny (such as "
                                  "encoder.layer.0.weight): is it a checkpoint of another model?"),
                          (str(log), f"--finetune {log} cannot be read as a checkpoint (UnpicklingError")):
        assert main(["train", "--finetune", path, "--synthetic-size", "8", "0", "--batch-size", "8", "--max-steps", "1",
                     "--no-progress", "--output-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_finetune_from_timm_safetensors_at_another_size(tmp_path):
    # timm publishes the authors' image MViTv2 weights as model.safetensors in its own layout
    # (stages.S.blocks.B, shortcut_proj_attn, head.fc).
    from safetensors.torch import save_file
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    from mvit.convert import from_pretrained

    torch.manual_seed(0)
    timm_model = MultiScaleVit(MultiScaleVitCfg(depths=(1, 2, 1, 1), embed_dim=32, num_heads=2), img_size=64,
                               num_classes=5)
    with torch.no_grad():
        for p in timm_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path / "model.safetensors")
    save_file(timm_model.state_dict(), path)
    source = from_pretrained(path, source="timm").eval()
    target = build_model(source.cfg.replace(input_size=(1, 96, 96)))
    _load_finetune(target, path, verbose=False)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert (target.eval()(x) - source(x)).abs().max().item() < 1e-5
    with pytest.raises(FileNotFoundError, match="--finetune checkpoint not found"):
        _load_finetune(target, str(tmp_path / "missing.safetensors"), verbose=False)


def test_finetune_from_pytorchvideo_layout(tmp_path):
    from pytorchvideo.models.hub.vision_transformers import mvit_base_16x4

    torch.manual_seed(1)
    source = mvit_base_16x4(spatial_size=64, temporal_size=8, head_num_classes=4).eval()
    path = str(tmp_path / "MVIT_B_16x4.pyth")
    torch.save({"model_state": source.state_dict()}, path)
    target = build_model("mvit_b_16x4", input_size=(8, 64, 64), num_classes=4, pool_norm_eps=1e-5)
    _load_finetune(target, path, verbose=False)
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        assert (target.eval()(x) - source(x)).abs().max().item() < 1e-5


def test_finetune_keeps_what_the_source_model_computed(tmp_path, capsys):
    """pytorchvideo's pooling norms use eps 1e-5: a model fine-tuned from its weights on the
    command line is built with that eps (it kept the preset's 1e-6, a different function)."""
    from pytorchvideo.models.hub.vision_transformers import mvit_base_16x4

    from mvit.training import checkpoint as ckpt

    torch.manual_seed(2)
    source = mvit_base_16x4(spatial_size=32, temporal_size=4, head_num_classes=4)
    path = str(tmp_path / "MVIT_B_16x4.pyth")
    torch.save({"model_state": source.state_dict()}, path)
    out = tmp_path / "ft"
    assert main(["train", "--preset", "mvit_b_16x4", "--finetune", path, "--num-frames", "4", "--crop-size", "32",
                 "--synthetic-size", "8", "0", "--batch-size", "8", "--max-steps", "1", "--threads", "1",
                 "--no-progress", "--output-dir", str(out)]) == 0
    assert "its model computed with {'pool_norm_eps': 1e-05}; so does this one" in capsys.readouterr().err
    [ck] = ckpt.list_checkpoints(str(out))
    assert ckpt.load(ck)["model_config"].pool_norm_eps == 1e-5


def test_finetune_semantics_by_layout():
    from mvit.presets import get_preset
    from mvit.train import _finetune_semantics

    v2_cls = get_preset("mvitv2_s_16x4")  # a class token and residual pooling
    assert v2_cls.cls_embed and v2_cls.residual_pooling and not v2_cls.residual_pooling_cls
    w = torch.zeros(1)
    timm_cls = {"stages.0.blocks.0.norm1.weight": w, "cls_token": w}
    assert _finetune_semantics(timm_cls, v2_cls) == {"residual_pooling_cls": True}
    assert _finetune_semantics({"stages.0.blocks.0.norm1.weight": w}, v2_cls) == {}  # timm without a class token
    assert _finetune_semantics(timm_cls, get_preset("mvitv2_s_image")) == {}  # no class row in this model
    assert _finetune_semantics({"model_state": {"patch_embed.patch_model.weight": w}}, v2_cls) == {"pool_norm_eps": 1e-5}
    own = {"model": {}, "model_config": v2_cls.replace(residual_pooling_cls=True, pool_norm_eps=1e-4)}
    assert _finetune_semantics(own, v2_cls) == {"residual_pooling_cls": True, "pool_norm_eps": 1e-4}
    assert _finetune_semantics({"model": {}, "model_config": v2_cls}, v2_cls) == {}
    # pySlowFast's and facebookresearch/mvit's layout is one: neither rule is guessed
    assert _finetune_semantics({"model_state": {"cls_token": w, "blocks.0.attn.qkv.weight": w}}, v2_cls) == {}


@pytest.mark.parametrize("layout", ["mvit_train", "facebookresearch_mvit"])
def test_image_weights_inflate_into_a_video_model(tmp_path, layout, capsys):
    """pySlowFast's inflation (MViTv2's Kinetics models from ImageNet weights): every 2-D kernel,
    or 3-D kernel of one frame, repeated over the video kernel's frames and divided by them."""
    image = build_model("mvitv2_t_image", input_size=(1, 64, 64), num_classes=7)
    with torch.no_grad():
        for p in image.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    src = image.state_dict()
    video_cfg = image.cfg.replace(patch_2d=False, input_size=(4, 64, 64), patch_kernel=(3, 7, 7),
                                  patch_stride=(2, 4, 4), patch_padding=(1, 3, 3), pool_kvq_kernel=(3, 3, 3),
                                  rel_pos_temporal=True, num_classes=5)
    target = build_model(video_cfg)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    path = str(tmp_path / "in1k.pyth")
    if layout == "mvit_train":
        torch.save({"model": src, "model_config": image.cfg}, path)
    else:  # Conv2d pooling kernels (d, 1, kH, kW), as facebookresearch/mvit's checkpoints hold them
        torch.save({"model_state": {k: v.squeeze(2) if ".pool_" in k and v.dim() == 5 else v for k, v in src.items()}},
                   path)
    _load_finetune(target, path, verbose=True)
    err = capsys.readouterr().err
    got = target.state_dict()
    convs = [k for k, v in got.items() if v.dim() == 5]
    assert "patch_embed.proj.weight" in convs and len(convs) == 1 + 3 * sum(".pool_q." in k for k in convs)
    assert f"inflated {len(convs)} image convolutions over time" in err, err
    for name in convs:
        w2d = src[name] if src[name].dim() == 5 else src[name].unsqueeze(2)
        torch.testing.assert_close(got[name], w2d.expand_as(got[name]) / 3, rtol=0, atol=0)
    assert torch.equal(got["blocks.3.attn.qkv.weight"], src["blocks.3.attn.qkv.weight"])
    assert torch.equal(got["blocks.0.attn.rel_pos_t"], fresh["blocks.0.attn.rel_pos_t"])  # video only: fresh
    assert torch.equal(got["head.projection.weight"], fresh["head.projection.weight"])  # 7 classes -> 5
    # A still clip: away from the first and last frames (zero padding) each inflated convolution
    # responds as the image's, so the patch embedding of the middle frame equals the image's.
    frame = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tokens_2d = image.patch_embed.proj(frame)
        tokens_3d = target.patch_embed.proj(frame.unsqueeze(2).expand(1, 3, 4, 64, 64))
    torch.testing.assert_close(tokens_3d[:, :, 1], tokens_2d, rtol=1e-5, atol=1e-5)


def test_finetune_from_a_run_folder_takes_its_newest_checkpoint(tmp_path, capsys):
    # eval and predict took a run folder; --finetune failed on it with "Is a directory"
    from mvit.training import checkpoint as ckpt

    run = tmp_path / "run"
    common = ["--synthetic-size", "16", "0", "--batch-size", "8", "--threads", "1", "--no-progress"]
    assert main(["train", *common, "--max-steps", "2", "--ckpt-every", "1", "--keep-ckpts", "5",
                 "--output-dir", str(run)]) == 0
    newest = ckpt.list_checkpoints(str(run))[0]
    assert ckpt.step_of(newest) == 2
    for name, source in (("from_folder", run), ("from_file", newest)):
        assert main(["train", *common, "--max-steps", "1", "--finetune", str(source),
                     "--output-dir", str(tmp_path / name)]) == 0
    [a], [b] = ckpt.list_checkpoints(str(tmp_path / "from_folder")), ckpt.list_checkpoints(str(tmp_path / "from_file"))
    a, b = ckpt.load(a), ckpt.load(b)
    assert a["args"]["finetune"] == b["args"]["finetune"] == newest  # the file it read, recorded
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    capsys.readouterr()
    assert main(["train", *common, "--finetune", str(tmp_path), "--output-dir", str(tmp_path / "none")]) == 2
    assert f"--finetune no readable checkpoint in {tmp_path}" in capsys.readouterr().err
