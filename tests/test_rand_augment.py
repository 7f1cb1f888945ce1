"""RandAugment against timm's, the implementation pySlowFast and facebookresearch/mvit train with:
every op on random images next to timm's PIL op, the level functions, the op sets, the parser."""

import numpy as np
import pytest
import torch

from mvit.data import rand_augment as ra

aa = pytest.importorskip("timm.data.auto_augment")
from PIL import Image  # noqa: E402


def _image(h=48, w=64, seed=0) -> torch.Tensor:
    """A smooth random picture plus noise, (1, 3, H, W) uint8: edges and gradients for every op."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g) * 255, size=(h, w), mode="bicubic",
                                             align_corners=False)
    return (smooth + torch.randn(1, 3, h, w, generator=g) * 8).clamp(0, 255).round().to(torch.uint8)


def _timm(name: str, img: torch.Tensor, args: tuple, fill) -> torch.Tensor:
    pil = Image.fromarray(img[0].permute(1, 2, 0).numpy())
    out = aa.NAME_TO_OP[name](pil, *args, fillcolor=fill, resample=Image.BICUBIC)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)[None]


# Tolerances (uint8 levels): table lookups are exact; enhancements blend in float (torchvision)
# where PIL rounds (contrast: PIL rounds the mean grey too), 1 level; the geometric ops resample
# bicubically with a = -0.75 where PIL uses -0.5: a mean of 1 level, a few levels on the sharpest edges.
EXACT, BLEND, GEOMETRY = (0, 0.0), (1, 0.7), (6, 1.0)
CASES = [
    ("AutoContrast", None, EXACT), ("Equalize", None, EXACT), ("Invert", None, EXACT),
    ("Posterize", 1, EXACT), ("Posterize", 3, EXACT), ("Posterize", 8, EXACT),
    ("Solarize", 0, EXACT), ("Solarize", 97, EXACT), ("Solarize", 256, EXACT), ("SolarizeAdd", 66, EXACT),
    ("Color", 0.3, BLEND), ("Color", 1.7, BLEND), ("Contrast", 0.2, BLEND), ("Contrast", 1.8, BLEND),
    ("Brightness", 0.4, BLEND), ("Brightness", 1.6, BLEND), ("Sharpness", 0.1, BLEND), ("Sharpness", 1.9, BLEND),
    ("Rotate", 17.0, GEOMETRY), ("Rotate", -25.0, GEOMETRY), ("ShearX", 0.2, GEOMETRY), ("ShearX", -0.27, GEOMETRY),
    ("ShearY", 0.15, GEOMETRY), ("ShearY", -0.3, GEOMETRY), ("TranslateXRel", 0.3, GEOMETRY),
    ("TranslateXRel", -0.2, GEOMETRY), ("TranslateYRel", 0.4, GEOMETRY), ("TranslateYRel", -0.45, GEOMETRY),
]


@pytest.mark.parametrize("name,arg,tol", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@pytest.mark.parametrize("fill", [ra.VIDEO_FILL, (124, 116, 104)])
def test_op_matches_timm(name, arg, tol, fill):
    img = _image(seed=len(name))
    args = () if arg is None else (arg,)
    ours = ra.OPS[name][0](img, *args, fill=fill)
    ref = _timm(name, img, args, fill)
    assert ours.dtype == torch.uint8 and ours.shape == img.shape
    diff = (ours.int() - ref.int()).abs()
    worst, mean = int(diff.max()), float(diff.float().mean())
    assert worst <= tol[0] and mean <= tol[1], (worst, mean)


def test_posterize_to_no_bits_is_black():
    # PosterizeIncreasing at magnitude 10 keeps 0 bits: old Pillow (pySlowFast's) gave black; Pillow 13 refuses
    assert ra.OPS["PosterizeIncreasing"][1](10.0, None) == 0
    assert ra.posterize(_image(), 0).eq(0).all()


@pytest.mark.parametrize("name", sorted(n for n, (_, level) in ra.OPS.items() if level is not None))
def test_level_functions_match_timm(name):
    gen = torch.Generator().manual_seed(0)
    for magnitude in (0.0, 2.5, 5.0, 7.3, 9.0, 10.0):
        ours = ra.OPS[name][1](magnitude, gen)
        theirs = aa.LEVEL_TO_ARG[name](magnitude, dict(aa._HPARAMS_DEFAULT))[0]
        if name.endswith("Increasing") and name[:-10] in ("Color", "Contrast", "Brightness", "Sharpness"):
            ours, theirs = abs(ours - 1.0), abs(theirs - 1.0)  # a random side of 1
        elif name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
            ours, theirs = abs(ours), abs(theirs)  # a random sign
        assert ours == pytest.approx(theirs), (magnitude, ours, theirs)


def test_op_sets_are_timms():
    assert ra.RAND_OPS == tuple(aa._RAND_TRANSFORMS)
    assert ra.RAND_INCREASING_OPS == tuple(aa._RAND_INCREASING_TRANSFORMS)


def test_signs_are_drawn_both_ways():
    gen = torch.Generator().manual_seed(0)
    signs = {ra.OPS["Rotate"][1](5.0, gen) > 0 for _ in range(40)}
    assert signs == {True, False}


def test_parse():
    spec = ra.parse("rand-m7-n4-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_ops, spec.magnitude_std, spec.increasing) == (7.0, 4, 0.5, True)
    assert str(spec) == "rand-m7-n4-mstd0.5-inc1" and ra.parse(str(spec)) == spec
    assert ra.parse("rand-m9-n6-mstd0.5-inc1") == ra.RandAugmentSpec(9.0, 6, 0.5, True)
    assert ra.parse("rand-n3") == ra.RandAugmentSpec(10.0, 3, 0.0, False)  # timm's defaults: m10, n2, no noise
    assert ra.parse("RAND-M7-N4") == ra.RandAugmentSpec(7.0, 4)
    for off in (None, "", "none", "None", "off", "0"):
        assert ra.parse(off) is None


@pytest.mark.parametrize("spec,match", [
    ("m7-n4", "takes timm's form"),  # the former torchvision spelling: now an error, not silently another strength
    ("rand-m7-n4-w0", "cannot read 'w0'"),  # weighted op choice: not supported
    ("rand-m7-n4-m9", "m given twice"),
    ("rand-mx-n2", "cannot read 'mx'"),
    ("rand_m7_n4", "takes timm's form"),
    ("rand-m11-n2", "the magnitude is 0..10"),
    ("rand-m7-n0", "n >= 1"),
    ("rand-m7-n2.5", "whole number of ops"),
    ("rand-m7-n2-inc2", "inc is 0 or 1"),
])
def test_parse_rejects(spec, match):
    with pytest.raises(ValueError, match=match) as err:
        ra.parse(spec)
    assert "--rand-augment" in str(err.value)


def test_rand_augment_draws_from_its_generator_only():
    clip = _image(24, 32).expand(4, -1, -1, -1).contiguous()
    spec = ra.parse("rand-m9-n6-mstd0.5-inc1")
    torch.manual_seed(0)
    a = ra.rand_augment(clip, spec, torch.Generator().manual_seed(5))
    torch.manual_seed(1)
    b = ra.rand_augment(clip, spec, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, clip)
    outs = {ra.rand_augment(clip, spec, torch.Generator().manual_seed(s)).float().mean().item() for s in range(6)}
    assert len(outs) > 3  # different seeds, different augmentations


def test_every_op_at_every_magnitude_keeps_the_clip_shape_and_range():
    clip = _image(17, 23).expand(2, -1, -1, -1).contiguous()  # odd sizes
    gen = torch.Generator().manual_seed(0)
    for name in ra.OPS:
        for magnitude in (0.0, 5.0, 10.0):
            out = ra.apply_op(clip, name, magnitude, gen=gen)
            assert out.shape == clip.shape and out.dtype == torch.uint8, name
            assert torch.equal(out[0], out[1]), name  # the same op on every frame


def test_rand_augment_and_its_ops_reject_float_clips_and_unknown_ops():
    with pytest.raises(ValueError, match="rand_augment needs a uint8 \\(T, C, H, W\\) clip, got torch.float32"):
        ra.rand_augment(torch.rand(2, 3, 8, 8), ra.parse("rand-m7-n2"))
    # one op alone read a [0, 1] float clip as 0..255 values and answered
    with pytest.raises(ValueError, match="apply_op needs a uint8 \\(T, C, H, W\\) clip, got torch.float32"):
        ra.apply_op(torch.rand(2, 3, 8, 8), "Solarize", 5)
    with pytest.raises(ValueError, match="unknown RandAugment op 'Blur'; choose one of: AutoContrast"):  # a KeyError
        ra.apply_op(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "Blur", 5)


def test_fast_paths_equal_the_general_ones():
    """Shears and translations shift lines with 4 taps instead of the 16 of a 2-D bicubic
    sample; sharpness sums 3x3 boxes separably: against the 2-D affine sampler and torchvision's
    adjust_sharpness (a float convolution), odd sizes, both fills."""
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(0)
    clip = torch.randint(0, 256, (3, 3, 37, 53), dtype=torch.uint8, generator=g)
    h, w = clip.shape[-2:]
    for fill in (ra.VIDEO_FILL, (124, 116, 104)):
        for fast, coeffs in [(ra.shear_x(clip, 0.23, fill), (1, 0.23, 0, 0, 1, 0)),
                             (ra.shear_y(clip, -0.17, fill), (1, 0, 0, -0.17, 1, 0)),
                             (ra.translate_x_rel(clip, 0.31, fill), (1, 0, 0.31 * w, 0, 1, 0)),
                             (ra.translate_y_rel(clip, -0.4, fill), (1, 0, 0, 0, 1, -0.4 * h))]:
            diff = (fast.int() - ra._affine(clip, coeffs, fill).int()).abs()
            assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= 10  # float rounding only
    for factor in (0.1, 0.55, 1.9):
        assert torch.equal(ra.sharpness(clip, factor), TF.adjust_sharpness(clip, factor))
    assert torch.equal(ra.sharpness(clip[..., :2, :], 0.3), clip[..., :2, :])  # nothing inside a border
