"""Mixup/CutMix target math, label smoothing, weight-decay groups, LR schedule."""

import math

import pytest
import torch

from mvit import build_model
from mvit.training.mixup import MixupCutmix, one_hot, soft_target_cross_entropy
from mvit.training.optim import WarmupCosine, build_optimizer, param_groups


def test_one_hot_smoothing():
    t = one_hot(torch.tensor([2, 0]), 4, smoothing=0.1)
    assert torch.allclose(t[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    assert torch.allclose(t.sum(1), torch.ones(2))


def test_mixup_targets_and_inputs():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    mix = MixupCutmix(4, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0)
    xm, target, lam, kind = mix(x, y)
    assert kind == "mixup" and 0 <= lam <= 1
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0))
    expected = lam * torch.eye(4)[y] + (1 - lam) * torch.eye(4)[y.flip(0)]
    assert torch.allclose(target, expected)


def test_cutmix_lambda_is_pasted_area():
    torch.manual_seed(1)
    x = torch.zeros(2, 3, 4, 10, 10)
    x[1] = 1.0
    mix = MixupCutmix(3, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
    for _ in range(10):
        xm, target, lam, kind = mix(x, torch.tensor([0, 2]))
        assert kind == "cutmix"
        pasted = xm[0].mean().item()  # sample 0 is zeros, the pasted box comes from sample 1 (ones)
        assert math.isclose(pasted, 1 - lam, abs_tol=1e-6)
        # the same box on every frame
        assert torch.equal(xm[0, :, 0], xm[0, :, 3])
        s = one_hot(torch.tensor([0, 2]), 3, 0.1)
        assert torch.allclose(target[0], lam * s[0] + (1 - lam) * s[1])


def test_switch_probability_picks_both():
    torch.manual_seed(2)
    mix = MixupCutmix(4, 0.8, 1.0, switch_prob=0.5)
    kinds = {mix(torch.randn(2, 3, 1, 8, 8), torch.tensor([0, 1]))[3] for _ in range(40)}
    assert kinds == {"mixup", "cutmix"}


def test_soft_target_ce_equals_ce_for_one_hot():
    logits = torch.randn(5, 7)
    y = torch.randint(0, 7, (5,))
    assert torch.allclose(soft_target_cross_entropy(logits, one_hot(y, 7)), torch.nn.functional.cross_entropy(logits, y))
    assert torch.allclose(soft_target_cross_entropy(logits, one_hot(y, 7, 0.1)),
                          torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1), atol=1e-6)


def test_weight_decay_exemptions():
    model = build_model("mvit_tiny")
    groups = param_groups(model, 0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    exempt = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"cls_token", "pos_embed_spatial", "pos_embed_temporal"} <= exempt
    assert all(p.ndim > 1 for n, p in model.named_parameters() if n in decayed)
    assert "blocks.0.attn.qkv.bias" in exempt and "blocks.0.attn.qkv.weight" in decayed
    assert decayed | exempt == {n for n, _ in model.named_parameters()}



@pytest.mark.parametrize("preset", ["mvit_tiny", "mvitv2_s_16x4"])
def test_the_papers_configs_decay_position_tables_and_class_token(preset):
    """pySlowFast's MViT configs set MVIT.ZERO_DECAY_POS_CLS False: only 1-D parameters are exempt."""
    model = build_model(preset)
    groups = param_groups(model, 0.05, zero_decay_pos_cls=False)
    exempt = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert exempt == {n for n, p in model.named_parameters() if p.ndim <= 1}
    tables = model.no_weight_decay()
    assert "cls_token" in tables and any("pos" in n for n in tables)
    assert tables <= {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    assert tables <= {n for g in param_groups(model, 0.05) if g["weight_decay"] == 0 for n in g["names"]}


def test_layer_decay_scales():
    model = build_model("mvit_tiny")
    opt = build_optimizer(model, 1e-3, 0.05, layer_decay=0.5)
    depth = len(model.blocks)
    scale = {n: g["lr_scale"] for g, names in zip(opt.param_groups, opt.group_names) for n in names}
    assert scale["head.projection.weight"] == 1.0
    assert scale["patch_embed.proj.weight" if "patch_embed.proj.weight" in scale else "cls_token"] == 0.5 ** (depth + 1)
    assert scale["blocks.0.attn.qkv.weight"] == 0.5 ** depth


def test_warmup_cosine():
    s = WarmupCosine(peak_lr=1.0, total_steps=110, warmup_steps=10, start_lr=0.0, end_lr=0.0)
    assert s.lr_at(0) == 0.0 and s.lr_at(5) == pytest.approx(0.5) and s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.5) and s.lr_at(110) == pytest.approx(0.0)
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}], lr=1)
    s.apply(opt, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_sgd_is_pyslowfasts():
    model = build_model("mvit_tiny")
    opt = build_optimizer(model, 0.1, 1e-4, kind="sgd")
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 and g["nesterov"] and g["dampening"] == 0 for g in opt.param_groups)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 1e-4}
    with pytest.raises(ValueError, match="--optimizer must be one of"):
        build_optimizer(model, 0.1, 1e-4, kind="lamb")
