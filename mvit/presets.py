"""The published models, written in the reference repositories' stage grammar.

Each preset cites where its settings come from. ``PAPER_FIGURES`` holds the papers' (and, where
it has the model, torchvision's) parameter and GFLOP counts: multiply-adds, one view, at the
preset's input size. ``tests/test_presets.py`` checks every preset against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .config import IMAGENET_MEAN, IMAGENET_STD, MViTConfig


def _q_stride_every_block(depth: int, pooled: dict[int, tuple[int, int, int]]):
    """MViTv2 lists every block in POOL_Q_STRIDE (stride 1 where not pooling), so Q is pooled
    (a stride-1 conv + LayerNorm) at every block."""
    return tuple((i, *pooled.get(i, (1, 1, 1))) for i in range(depth))


_V1_VIDEO = MViTConfig(
    # pySlowFast configs/Kinetics/MVIT_B_16x4_CONV.yaml; torchvision mvit_v1_b.
    name="mvit_b_16x4",
    num_classes=400,
    input_size=(16, 224, 224),
    abs_pos="separate",
    drop_path_rate=0.2,
    head_dropout=0.5,
)

_V2_VIDEO = MViTConfig(
    # pySlowFast configs/Kinetics/MVITv2_S_16x4.yaml; torchvision mvit_v2_s.
    name="mvitv2_s_16x4",
    num_classes=400,
    input_size=(16, 224, 224),
    pool_q_stride=_q_stride_every_block(16, {1: (1, 2, 2), 3: (1, 2, 2), 14: (1, 2, 2)}),
    abs_pos="none",
    rel_pos_spatial=True,
    rel_pos_temporal=True,
    residual_pooling=True,
    dim_mul_in_att=True,
    drop_path_rate=0.2,
    head_dropout=0.5,
)

_V2_IMAGE = MViTConfig(
    # facebookresearch/mvit config/defaults.py: 2-D patches, conv pooling of Q at every block,
    # adaptive K/V strides from 4x4, spatial rel-pos, residual pooling, mean-pooled head.
    name="mvitv2_s_image",
    num_classes=1000,
    input_size=(1, 224, 224),
    patch_kernel=(1, 7, 7),
    patch_stride=(1, 4, 4),
    patch_padding=(0, 3, 3),
    patch_2d=True,
    pool_kvq_kernel=(1, 3, 3),
    pool_kv_stride_adaptive=(1, 4, 4),
    cls_embed=False,
    abs_pos="none",
    rel_pos_spatial=True,
    residual_pooling=True,
    dim_mul_in_att=True,
    drop_path_rate=0.1,
    head_dropout=0.0,
)


def mvitv2_image(name: str, depths: tuple[int, ...], **fields) -> MViTConfig:
    """An image MViTv2 from its blocks per stage (facebookresearch/mvit and timm describe the
    family this way): channels and heads double, and Q is pooled 2x2, at the first block of every
    stage after the first. ``fields`` set the rest (embed_dim, num_heads, cls_embed, ...)."""
    starts = [sum(depths[:i]) for i in range(1, len(depths))]
    depth = sum(depths)
    return _V2_IMAGE.replace(
        name=name,
        depth=depth,
        dim_mul=tuple((i, 2.0) for i in starts),
        head_mul=tuple((i, 2.0) for i in starts),
        pool_q_stride=_q_stride_every_block(depth, {i: (1, 2, 2) for i in starts}),
        **fields,
    )


_B24_MUL = ((2, 2.0), (5, 2.0), (21, 2.0))
_L_MUL = ((2, 2.0), (8, 2.0), (44, 2.0))

PRESETS: dict[str, MViTConfig] = {
    "mvit_b_16x4": _V1_VIDEO,
    "mvit_b_32x3": _V1_VIDEO.replace(name="mvit_b_32x3", input_size=(32, 224, 224), sampling_rate=3,
                                     drop_path_rate=0.3),
    "mvit_b_64x3": _V1_VIDEO.replace(name="mvit_b_64x3", input_size=(64, 224, 224), sampling_rate=3,
                                     drop_path_rate=0.3),
    # pySlowFast configs/Kinetics/MVIT_B_32x3_CONV.yaml (DEPTH 24): MViT-B-24, Kinetics-600.
    "mvit_b24_32x3": _V1_VIDEO.replace(
        name="mvit_b24_32x3",
        num_classes=600,
        input_size=(32, 224, 224),
        sampling_rate=3,
        depth=24,
        dim_mul=_B24_MUL,
        head_mul=_B24_MUL,
        pool_q_stride=((2, 1, 2, 2), (5, 1, 2, 2), (21, 1, 2, 2)),
        drop_path_rate=0.3,
    ),
    # MViT paper, Table 3: MViT-S has a coarser 3x8x8 patchification (8x28x28 tokens), width
    # 128 and three stages (3, 7, 6 blocks); transitions at blocks 3 and 10. K/V are pooled to
    # the same 7x7 grid per frame as in MViT-B (stride 4 on the 28x28 grid). This matches the
    # paper's parameter count (26.04 M vs 26.1 M) but not its FLOPs (29.9 G vs 32.9 G): no public
    # config gives the exact K/V schedule of the paper's MViT-S (see tests/test_presets.py).
    "mvit_s_16x4": _V1_VIDEO.replace(
        name="mvit_s_16x4",
        patch_kernel=(3, 8, 8),
        patch_stride=(2, 8, 8),
        patch_padding=(1, 3, 3),
        embed_dim=128,
        dim_mul=((3, 2.0), (10, 2.0)),
        head_mul=((3, 2.0), (10, 2.0)),
        pool_q_stride=((3, 1, 2, 2), (10, 1, 2, 2)),
        pool_kv_stride_adaptive=(1, 4, 4),
    ),
    # pySlowFast configs/ImageNet/MVIT_B_16_CONV.yaml: MViT-B-16 on ImageNet-1K.
    "mvit_b16_image": _V1_VIDEO.replace(
        name="mvit_b16_image",
        num_classes=1000,
        input_size=(1, 224, 224),
        patch_kernel=(1, 7, 7),
        patch_stride=(1, 4, 4),
        patch_padding=(0, 3, 3),
        patch_2d=True,
        pool_kvq_kernel=(1, 3, 3),
        pool_kv_stride_adaptive=(1, 4, 4),
        abs_pos="joint",
        drop_path_rate=0.1,
        head_dropout=0.0,
    ),
    "mvitv2_s_16x4": _V2_VIDEO,
    # pySlowFast configs/Kinetics/MVITv2_B_32x3.yaml.
    "mvitv2_b_32x3": _V2_VIDEO.replace(
        name="mvitv2_b_32x3",
        input_size=(32, 224, 224),
        sampling_rate=3,
        depth=24,
        dim_mul=_B24_MUL,
        head_mul=_B24_MUL,
        pool_q_stride=_q_stride_every_block(24, {2: (1, 2, 2), 5: (1, 2, 2), 21: (1, 2, 2)}),
        drop_path_rate=0.3,
    ),
    # pySlowFast configs/Kinetics/MVITv2_L_40x3_test.yaml: the released Kinetics-400 MViTv2-L, 40
    # frames at 312x312, fine-tuned from ImageNet-21K weights and normalized with ImageNet's mean
    # and std (mmaction2's port of the weights uses Kinetics' and reports 85.4 top-1 to the paper's
    # 86.1). Channels grow in attention (DIM_MUL_IN_ATT), as in timm's mvitv2_large_cls: 213.4 M
    # parameters, mmaction2's 213 M for the same weights.
    "mvitv2_l_40x3": _V2_VIDEO.replace(
        name="mvitv2_l_40x3",
        input_size=(40, 312, 312),
        sampling_rate=3,
        depth=48,
        embed_dim=144,
        num_heads=2,
        dim_mul=_L_MUL,
        head_mul=_L_MUL,
        pool_q_stride=_q_stride_every_block(48, {i: (1, 2, 2) for i, _ in _L_MUL}),
        drop_path_rate=0.75,
        input_mean=IMAGENET_MEAN,
        input_std=IMAGENET_STD,
    ),
    # facebookresearch/mvit configs/MVITv2_{T,S,B}.yaml and configs/test/MVITv2_L_test.yaml
    # (the L model expands channels in the MLP, not in attention); timm mvitv2_{tiny,...,large}.
    "mvitv2_t_image": mvitv2_image("mvitv2_t_image", (1, 2, 5, 2), drop_path_rate=0.1),
    "mvitv2_s_image": mvitv2_image("mvitv2_s_image", (1, 2, 11, 2), drop_path_rate=0.1),
    "mvitv2_b_image": mvitv2_image("mvitv2_b_image", (2, 3, 16, 3), drop_path_rate=0.3),
    "mvitv2_l_image": mvitv2_image(
        "mvitv2_l_image", (2, 6, 36, 4), embed_dim=144, num_heads=2, dim_mul_in_att=False, drop_path_rate=0.5
    ),
    # MViTv2-H, released only as ImageNet-21K weights (timm mvitv2_huge_cls): a class token, which
    # the residual pooling connection adds to as well (facebookresearch/mvit, timm), and channels
    # grown in attention. Its drop path rate is not published; 0.5 is MViTv2-L's.
    "mvitv2_h_image": mvitv2_image(
        "mvitv2_h_image", (4, 8, 60, 8), embed_dim=192, num_heads=3, cls_embed=True, residual_pooling_cls=True,
        drop_path_rate=0.5,
    ),
    # Not a paper model: small enough to train on two CPU cores in minutes (the built-in task),
    # yet every MViT mechanism is present (Q pooling twice, adaptive K/V strides, skip pooling,
    # channel expansion, class token, separate space-time position embeddings).
    "mvit_tiny": MViTConfig(
        name="mvit_tiny",
        num_classes=4,
        input_size=(8, 32, 32),
        patch_kernel=(3, 5, 5),
        patch_stride=(2, 4, 4),
        patch_padding=(1, 2, 2),
        embed_dim=32,
        num_heads=1,
        depth=4,
        dim_mul=((1, 2.0), (3, 2.0)),
        head_mul=((1, 2.0), (3, 2.0)),
        pool_q_stride=((1, 1, 2, 2), (3, 1, 2, 2)),
        pool_kv_stride_adaptive=(1, 2, 2),
        drop_path_rate=0.1,
        head_dropout=0.0,
    ),
}


@dataclass(frozen=True)
class PaperFigures:
    gflops: float  # multiply-adds, one view
    params_m: float
    source: str
    exact_params: Optional[int] = None  # torchvision's count, where it has the model
    exact_gflops: Optional[float] = None


PAPER_FIGURES: dict[str, PaperFigures] = {
    "mvit_s_16x4": PaperFigures(32.9, 26.1, "MViT paper, Table 3 (K400)"),
    "mvit_b_16x4": PaperFigures(70.5, 36.6, "MViT paper, Table 3 (K400); torchvision mvit_v1_b", 36_610_672, 70.599),
    "mvit_b_32x3": PaperFigures(170.0, 36.6, "MViT paper, Table 3 (K400)"),
    "mvit_b_64x3": PaperFigures(455.0, 36.6, "MViT paper, Table 3 (K400)"),
    "mvit_b24_32x3": PaperFigures(236.0, 52.9, "MViT paper, Table 4 (K600)"),
    "mvit_b16_image": PaperFigures(7.8, 37.0, "MViT paper, Table 10 (IN-1K)"),
    "mvitv2_s_16x4": PaperFigures(64.0, 34.5, "MViTv2 paper, Table 5 (K400); torchvision mvit_v2_s", 34_537_744, 64.224),
    "mvitv2_b_32x3": PaperFigures(225.0, 51.2, "MViTv2 paper, Table 5 (K400)"),
    # The paper's 217.6 M is the count with channels grown in the MLP (217.7 M; 2900 GFLOPs); the
    # released config and checkpoint grow them in attention (tests/test_presets.py).
    "mvitv2_l_40x3": PaperFigures(2828.0, 217.6, "MViTv2 paper, Table 5 (K400, 312 px)"),
    "mvitv2_t_image": PaperFigures(4.7, 24.0, "MViTv2 paper, Table 2 (IN-1K)"),
    "mvitv2_s_image": PaperFigures(7.0, 35.0, "MViTv2 paper, Table 2 (IN-1K)"),
    # The paper rounds 51.5 M up to 52; timm's model card for the authors' weights gives 51.5 M.
    "mvitv2_b_image": PaperFigures(10.2, 51.5, "MViTv2 paper, Table 2 (IN-1K: 52 M); timm mvitv2_base: 51.5 M"),
    # The released model has the paper's parameters but 43.71 GFLOPs, in timm's count too; the
    # paper's 42.1 fits the class-token variant with channels grown in attention (tests/test_presets.py).
    "mvitv2_l_image": PaperFigures(42.1, 218.0, "MViTv2 paper, Table 2 (IN-1K); timm mvitv2_large: 217.99 M, 43.71 G"),
    "mvitv2_h_image": PaperFigures(120.6, 667.0, "MViTv2 paper, Table 3 (IN-21K); timm mvitv2_huge_cls"),
}

#: (clips, crops) of the papers' test views where they are not Kinetics' usual 5 x 1: MViTv2-L's
#: "x3x5" (MViTv2 paper, Table 5; TEST.NUM_SPATIAL_CROPS 3 in its config).
PAPER_TEST_VIEWS: dict[str, tuple[int, int]] = {"mvitv2_l_40x3": (5, 3)}


def get_preset(name: str) -> MViTConfig:
    if not isinstance(name, str):
        raise TypeError(f"preset name must be a str, got {type(name).__name__} {name!r}")
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None
