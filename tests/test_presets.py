"""Every preset against the papers' parameter and FLOP counts.

torchvision's counts are matched exactly where it has the model; the papers' rounded figures
within 1% otherwise. Counting runs on the meta device, so this file is fast.
"""

import pytest

from mvit.config import round_width
from mvit.flops import count_model
from mvit.presets import PAPER_FIGURES, PRESETS, get_preset


@pytest.fixture(scope="module")
def counts():
    return {name: count_model(get_preset(name)) for name in PRESETS}


def test_torchvision_models_match_exactly(counts):
    for name in ("mvit_b_16x4", "mvitv2_s_16x4"):
        fig = PAPER_FIGURES[name]
        assert counts[name].params == fig.exact_params
        assert round(counts[name].gflops, 3) == fig.exact_gflops


# Presets whose parameters are known to differ from the paper's, and why.
PARAMS_APART = {
    "mvitv2_l_40x3": "the paper counts MViTv2-L 40x3 with channels grown in the MLP; the release grows them in "
                     "attention: 213.4 vs 217.6 M",
}


def _apart(names, why):
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=why[n])) if n in why else n for n in names]


@pytest.mark.parametrize("name", _apart(sorted(PAPER_FIGURES), PARAMS_APART))
def test_params_within_one_percent_of_paper(counts, name):
    fig = PAPER_FIGURES[name]
    params_m = counts[name].params / 1e6
    assert abs(params_m - fig.params_m) <= 0.01 * fig.params_m, f"{name}: {params_m:.3f} M vs {fig.params_m} M"


# Presets whose GFLOPs are known to differ from the paper's, and why.
GFLOPS_APART = {
    "mvit_s_16x4": "no public config reproduces the paper's MViT-S K/V schedule: 29.9 vs 32.9 GFLOPs",
    # The released IN-1K MViTv2-L (facebookresearch/mvit, timm mvitv2_large) has exactly the
    # paper's 218 M parameters, and 43.71 GFLOPs counted here and in timm's model alike; 42.1 is
    # what its class-token variant with channels grown in attention has (42.0, at 213.6 M).
    "mvitv2_l_image": "the paper's MViTv2-L GFLOPs are not the released model's: 43.71 vs 42.1",
}


@pytest.mark.parametrize("name", _apart(sorted(PAPER_FIGURES), GFLOPS_APART))
def test_gflops_within_one_percent_of_paper(counts, name):
    fig = PAPER_FIGURES[name]
    assert abs(counts[name].gflops - fig.gflops) <= 0.01 * fig.gflops, f"{name}: {counts[name].gflops:.2f} vs {fig.gflops}"


def test_mvit_b_block_table_matches_design():
    """The papers' layout: dims, heads, Q strides and adaptive K/V strides of MViT-B 16x4."""
    specs = get_preset("mvit_b_16x4").block_specs()
    assert [(s.dim_in, s.dim_out, s.num_heads) for s in specs[:4]] == [
        (96, 192, 1),
        (192, 192, 2),
        (192, 384, 2),
        (384, 384, 4),
    ]
    assert [(s.dim_in, s.dim_out, s.num_heads) for s in specs[13:]] == [(384, 768, 4), (768, 768, 8), (768, 768, 8)]
    assert [i for i, s in enumerate(specs) if s.pool_skip] == [1, 3, 14]
    assert all(s.stride_q == (1, 2, 2) and s.kernel_q == (3, 3, 3) for s in specs if s.pool_skip)
    kv = [s.stride_kv for s in specs]
    assert kv[0] == (1, 8, 8) and kv[1] == kv[2] == (1, 4, 4)
    assert all(k == (1, 2, 2) for k in kv[3:14]) and kv[14] == kv[15] == (1, 1, 1)
    assert all(s.pool_kv for s in specs)  # stride 1 still pools (conv + LN) with kernel 3
    assert specs[1].kernel_skip == (1, 3, 3) and specs[1].padding_skip == (0, 1, 1)
    assert specs[-1].drop_path == pytest.approx(0.2) and specs[0].drop_path == 0.0


def test_mvitv2_l_grows_channels_in_the_mlp_of_each_stage_s_last_block():
    """configs/test/MVITv2_L_test.yaml: DIM_MUL_IN_ATT False, so blocks 1, 7 and 43 (before the
    transitions at 2, 8, 44) widen the stream in their MLP, and attention keeps its input width."""
    specs = get_preset("mvitv2_l_image").block_specs()
    grows = [i for i, s in enumerate(specs) if s.dim_in != s.dim_out]
    assert grows == [1, 7, 43]
    assert [(specs[i].dim_in, specs[i].attn_dim, specs[i].dim_out) for i in grows] == [
        (144, 144, 288), (288, 288, 576), (576, 576, 1152)
    ]
    assert [i for i, s in enumerate(specs) if s.stride_q == (1, 2, 2)] == [2, 8, 44]
    assert [specs[i].num_heads for i in (0, 2, 8, 44)] == [2, 4, 8, 16]


def test_mvitv2_l_40x3_follows_its_released_config():
    """configs/Kinetics/MVITv2_L_40x3_test.yaml: 48 blocks, transitions at 2, 8 and 44, channels
    grown in attention, 40 frames at 312 px sampled every 3, ImageNet's normalization; and the
    paper's figures: its parameters are the MLP-growth count, its GFLOPs the released model's."""
    cfg = get_preset("mvitv2_l_40x3")
    specs = cfg.block_specs()
    assert len(specs) == 48 and cfg.sampling_rate == 3 and cfg.input_size == (40, 312, 312)
    assert cfg.normalization(image=False) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    grows = [i for i, s in enumerate(specs) if s.dim_in != s.dim_out]
    assert grows == [2, 8, 44] and [i for i, s in enumerate(specs) if s.stride_q == (1, 2, 2)] == [2, 8, 44]
    assert [(specs[i].dim_in, specs[i].attn_dim, specs[i].num_heads) for i in (0, 2, 8, 44)] == [
        (144, 144, 2), (144, 288, 4), (288, 576, 8), (576, 1152, 16)
    ]
    assert [specs[i].stride_kv for i in (0, 2, 8, 44)] == [(1, 8, 8), (1, 4, 4), (1, 2, 2), (1, 1, 1)]
    # 312 px: a 20x78x78 grid, which q pooling takes to 39, 20 and 10, while the reference code sizes
    # the rel-pos tables from 78 // 2 // 2 = 19 (interpolated to the real grid at run time)
    assert cfg.patch_grid == (20, 78, 78)
    assert [specs[i].input_thw for i in (2, 8, 44)] == [(20, 78, 78), (20, 39, 39), (20, 19, 19)]
    assert [cfg.rel_pos_lengths(specs[i]) for i in (0, 2, 8, 44)] == [(155, 39), (77, 39), (37, 39), (37, 39)]
    mlp_growth = count_model(cfg.replace(dim_mul_in_att=False))
    assert abs(mlp_growth.params / 1e6 - PAPER_FIGURES["mvitv2_l_40x3"].params_m) < 0.2
    assert abs(mlp_growth.gflops - PAPER_FIGURES["mvitv2_l_40x3"].gflops) > 0.02 * PAPER_FIGURES["mvitv2_l_40x3"].gflops


def test_mvitv2_pools_q_at_every_block_with_dim_mul_in_attention():
    specs = get_preset("mvitv2_s_16x4").block_specs()
    assert all(s.pool_q for s in specs)
    assert (specs[1].dim_in, specs[1].dim_out, specs[1].attn_dim) == (96, 192, 192)
    assert (specs[0].dim_in, specs[0].dim_out) == (96, 96)


def test_round_width_follows_reference_rule():
    assert round_width(96, 2.0) == 192
    assert round_width(96, 1.0, divisor=8) == 96
    assert round_width(100, 1.0, divisor=64) == 128  # never more than 10% below the target
    assert round_width(96, 0) == 96


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'mvit_z'.*mvit_b_16x4"):
        get_preset("mvit_z")
    with pytest.raises(TypeError, match=r"preset name must be a str, got list \['mvit_tiny'\]"):  # was "unhashable type"
        get_preset(["mvit_tiny"])


def test_bad_config_fields_are_rejected():
    cfg = get_preset("mvit_tiny")
    with pytest.raises(ValueError, match="unknown MViTConfig field"):
        cfg.replace(not_a_field=1)
    with pytest.raises(ValueError, match="block index"):
        cfg.replace(dim_mul=((9, 2.0),)).block_specs()
    with pytest.raises(ValueError, match="not divisible"):
        cfg.replace(embed_dim=30, num_heads=4).block_specs()


def test_config_round_trips_through_dict():
    from mvit.config import MViTConfig

    for name in ("mvit_b_16x4", "mvitv2_b_image"):
        cfg = get_preset(name)
        assert MViTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TypeError, match="an MViTConfig is read from a mapping of its fields, got NoneType"):
        MViTConfig.from_dict(None)  # was "'NoneType' object is not iterable"
