"""RandAugment as the MViT papers trained with it: timm's variant, which pySlowFast (Kinetics,
``rand-m7-n4-mstd0.5-inc1``) and facebookresearch/mvit (ImageNet, ``rand-m9-n6-mstd0.5-inc1``)
both use, here on uint8 clips (T, C, H, W) with one draw per clip: every frame gets the same ops
at the same levels, as pySlowFast applies each op to a clip's frame list.

timm's semantics, which differ from torchvision's ``RandAugment``:
- the magnitude is out of 10 (torchvision's: out of 30 bins), optionally jittered per op by a
  normal draw of std ``mstd`` and clipped to [0, 10];
- each of the ``n`` ops (drawn with replacement) applies with probability 0.5;
- the op set has no identity, and ``inc1`` takes the variants whose strength grows with the
  magnitude (posterize, solarize and the enhancements); signed levels take a random sign;
- geometric ops map pixel centres as PIL's affine transform does, resample bicubically (both
  papers' ``AUG.INTERPOLATION``) and fill uncovered pixels with a constant colour (pySlowFast:
  128 grey; facebookresearch/mvit through timm: the ImageNet mean).

The ops follow PIL's definitions (timm applies them to PIL images); ``tests/test_rand_augment.py``
compares each with timm's on random images: lookups equal; the enhancements, which blend in float
like torchvision's, within a level; the geometric ops, resampled with torch's bicubic (a = -0.75
where PIL's uses -0.5), under a level on average and a few levels at the sharpest edges.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

#: timm's ``_LEVEL_DENOM``: magnitudes run 0..10.
MAX_LEVEL = 10.0
#: pySlowFast's fill for geometric ops (its ``_FILL``).
VIDEO_FILL = (128, 128, 128)

_SECTION = re.compile(r"^(mstd|inc|m|n)(\d+(?:\.\d*)?)$")


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed ``rand-m<M>-n<N>[-mstd<S>][-inc<0|1>]`` string (timm's format)."""

    magnitude: float = MAX_LEVEL
    num_ops: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False
    prob: float = 0.5  # timm's per-op probability, fixed by its RandAugment

    def __str__(self) -> str:
        std = f"-mstd{self.magnitude_std:g}" if self.magnitude_std else ""
        return f"rand-m{self.magnitude:g}-n{self.num_ops}{std}-inc{int(self.increasing)}"


def parse(spec: Optional[str], option: str = "--rand-augment") -> Optional[RandAugmentSpec]:
    """timm's config string -> :class:`RandAugmentSpec`; 'none' / '' / None -> None.

    Anything timm would read differently or not at all is an error naming ``option``: a typo
    must not silently become some default strength."""
    if spec is None or spec.strip().lower() in ("", "none", "off", "0"):
        return None
    text = spec.strip().lower()
    hint = (f"{option} takes timm's form, e.g. 'rand-m7-n4-mstd0.5-inc1' (magnitude 7 of 10, 4 ops, magnitude "
            f"noise std 0.5, the increasing ops) or 'none'")
    parts = text.split("-")
    if parts[0] != "rand":
        raise ValueError(f"{hint}; got {spec!r}")
    fields: dict[str, str] = {}
    for part in parts[1:]:
        m = _SECTION.match(part)
        if not m:
            raise ValueError(f"{hint}; got {spec!r} (cannot read {part!r}; the sections are m, n, mstd and inc)")
        if m.group(1) in fields:
            raise ValueError(f"{hint}; got {spec!r} ({m.group(1)} given twice)")
        fields[m.group(1)] = m.group(2)
    out = RandAugmentSpec(
        magnitude=float(fields.get("m", MAX_LEVEL)),
        num_ops=int(float(fields.get("n", 2))),
        magnitude_std=float(fields.get("mstd", 0.0)),
        increasing=bool(int(float(fields.get("inc", 0)))),
    )
    if out.magnitude > MAX_LEVEL:
        # timm clips levels to 10: m12 would silently mean m10
        raise ValueError(f"{option}: the magnitude is 0..{MAX_LEVEL:g}, got {spec!r}")
    if out.num_ops < 1 or "." in fields.get("n", ""):
        raise ValueError(f"{option} needs a whole number of ops n >= 1 ('none' turns it off), got {spec!r}")
    if fields.get("inc", "0") not in ("0", "1"):
        raise ValueError(f"{option}: inc is 0 or 1, got {spec!r}")
    return out


# --- the ops, on uint8 (T, C, H, W) -----------------------------------------------------------


def _affine(clip: torch.Tensor, coeffs: Sequence[float], fill: Sequence[int]) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, coeffs)``: output pixel centre (x, y) reads the input
    at (a x + b y + c, d x + e y + f); where that lies outside the image, ``fill``."""
    _, c, h, w = clip.shape
    a, b, cc, d, e, f = coeffs
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                            indexing="ij")
    xin, yin = a * xs + b * ys + cc, d * xs + e * ys + f
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    # align_corners=False: -1 and 1 are the outer edges of the first and last pixels
    grid = torch.stack([xin / w * 2 - 1, yin / h * 2 - 1], dim=-1).float()
    out = F.grid_sample(clip.float(), grid.expand(clip.shape[0], h, w, 2), mode="bicubic",
                        padding_mode="border", align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    fill_t = torch.tensor(fill, dtype=torch.uint8).view(1, c, 1, 1)
    return torch.where(inside, out, fill_t)


def rotate(clip, degrees: float, fill):
    """PIL ``Image.rotate(degrees)``: counter-clockwise about the image centre, same size."""
    _, _, h, w = clip.shape
    rad = -math.radians(degrees)
    cos, sin = round(math.cos(rad), 15), round(math.sin(rad), 15)
    cx, cy = w / 2, h / 2
    return _affine(clip, (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy), fill)


def _cubic_weights(t: torch.Tensor, a: float = -0.75) -> list[torch.Tensor]:
    """torch's bicubic weights (its grid_sample's, a = -0.75) of the taps at offsets -1, 0, 1, 2
    from floor(u), for fractional parts ``t`` = u - floor(u)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _shift_lines(clip: torch.Tensor, shifts: torch.Tensor, axis: int, fill: Sequence[int]) -> torch.Tensor:
    """The translations and shears: each line along ``axis`` (-1: rows, -2: columns) reads the
    input shifted by its own ``shifts[line]`` pixels, as :func:`_affine` would (pixel i reads
    position i + shift, bicubic taps clamped to the border, ``fill`` where i + shift + 0.5 falls
    outside the line) but with 4 taps along one axis instead of 16 over two: the same numbers up
    to float rounding, a third of the time."""
    x = clip if axis == -1 else clip.transpose(-1, -2)
    n = x.shape[-1]
    pos = torch.arange(n, dtype=torch.float64)[None, :] + shifts.to(torch.float64)[:, None]  # (lines, n)
    base = pos.floor()
    inside = (pos + 0.5 >= 0) & (pos + 0.5 < n)
    out = torch.zeros(x.shape, dtype=torch.float32)
    for k, w in zip((-1, 0, 1, 2), _cubic_weights(pos - base)):
        idx = (base + k).clamp_(0, n - 1).long().expand(x.shape)
        out.add_(x.gather(-1, idx).float().mul_(w.float()))
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    fill_t = torch.tensor(fill, dtype=torch.uint8).view(1, -1, 1, 1)
    out = torch.where(inside, out, fill_t)
    return out if axis == -1 else out.transpose(-1, -2).contiguous()


def _centres(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float64) + 0.5


def shear_x(clip, factor: float, fill):
    """PIL's affine (1, factor, 0, 0, 1, 0): row y shifts by factor * (y + 0.5)."""
    return _shift_lines(clip, factor * _centres(clip.shape[-2]), -1, fill)


def shear_y(clip, factor: float, fill):
    """PIL's affine (1, 0, 0, factor, 1, 0): column x shifts by factor * (x + 0.5)."""
    return _shift_lines(clip, factor * _centres(clip.shape[-1]), -2, fill)


def translate_x_rel(clip, pct: float, fill):
    """PIL's affine (1, 0, pct * W, 0, 1, 0)."""
    return _shift_lines(clip, torch.full((clip.shape[-2],), pct * clip.shape[-1]), -1, fill)


def translate_y_rel(clip, pct: float, fill):
    """PIL's affine (1, 0, 0, 0, 1, pct * H)."""
    return _shift_lines(clip, torch.full((clip.shape[-1],), pct * clip.shape[-2]), -2, fill)


def solarize(clip, thresh: int, fill=None):
    """PIL ``ImageOps.solarize``: invert every value >= ``thresh``."""
    if thresh > 255:  # a uint8 comparison with 256 would wrap
        return clip
    return torch.where(clip >= max(thresh, 0), 255 - clip, clip)


def solarize_add(clip, add: int, fill=None, thresh: int = 128):
    """timm's: add ``add`` (saturating) to every value below ``thresh``."""
    below = clip < thresh if thresh <= 255 else torch.ones_like(clip, dtype=torch.bool)
    return torch.where(below, (clip.to(torch.int16) + add).clamp_(max=255).to(torch.uint8), clip)


def posterize(clip, bits: int, fill=None):
    """PIL ``ImageOps.posterize``: keep the ``bits`` high bits (timm: unchanged from 8 bits on)."""
    if bits >= 8:
        return clip
    return clip & (~(2 ** (8 - bits) - 1) & 0xFF)


def auto_contrast(clip, fill=None):
    from torchvision.transforms.v2 import functional as TF

    return TF.autocontrast(clip)


def equalize(clip, fill=None):
    from torchvision.transforms.v2 import functional as TF

    return TF.equalize(clip)


def invert(clip, fill=None):
    return 255 - clip


def _enhance(name: str) -> Callable:
    """PIL's ``ImageEnhance`` ops as torchvision implements them for tensors."""

    def op(clip, factor: float, fill=None):
        from torchvision.transforms.v2 import functional as TF

        fn = {"color": TF.adjust_saturation, "contrast": TF.adjust_contrast, "brightness": TF.adjust_brightness}[name]
        return fn(clip, factor)

    op.__name__ = name
    return op


color, contrast, brightness = (_enhance(n) for n in ("color", "contrast", "brightness"))


def sharpness(clip, factor: float, fill=None):
    """PIL's ``ImageEnhance.Sharpness`` as torchvision's ``adjust_sharpness``: a blend with the
    image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 (rounded; border pixels kept), the
    3x3 sum taken as two 3-tap sums, not a float convolution."""
    if clip.shape[-1] <= 2 or clip.shape[-2] <= 2:
        return clip
    x = clip.to(torch.int32)
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    out = clip.float()
    centre = out[..., 1:-1, 1:-1]
    smooth = (box + 4 * x[..., 1:-1, 1:-1]).float().div_(13.0).round_()
    # torchvision's blend, x + (1 - factor) (smooth - x) in float, clamped and truncated
    centre.add_(smooth.sub_(centre), alpha=1.0 - factor)
    return out.clamp_(0, 255).to(torch.uint8)


# --- magnitude -> op arguments (timm's level functions) -----------------------------------------


def _signed(value: float, gen: Optional[torch.Generator]) -> float:
    return -value if float(torch.rand((), generator=gen)) > 0.5 else value


def _level_rotate(m, gen):
    return _signed(m / MAX_LEVEL * 30.0, gen)


def _level_enhance(m, gen):
    return m / MAX_LEVEL * 1.8 + 0.1


def _level_enhance_increasing(m, gen):
    return 1.0 + _signed(m / MAX_LEVEL * 0.9, gen)


def _level_shear(m, gen):
    return _signed(m / MAX_LEVEL * 0.3, gen)


def _level_translate_rel(m, gen):
    return _signed(m / MAX_LEVEL * 0.45, gen)


def _level_posterize(m, gen):
    return int(m / MAX_LEVEL * 4)


def _level_posterize_increasing(m, gen):
    return 4 - int(m / MAX_LEVEL * 4)


def _level_solarize(m, gen):
    return int(m / MAX_LEVEL * 256)


def _level_solarize_increasing(m, gen):
    return 256 - int(m / MAX_LEVEL * 256)


def _level_solarize_add(m, gen):
    return int(m / MAX_LEVEL * 110)


#: name -> (op, level function or None); timm's names.
OPS: dict[str, tuple[Callable, Optional[Callable]]] = {
    "AutoContrast": (auto_contrast, None),
    "Equalize": (equalize, None),
    "Invert": (invert, None),
    "Rotate": (rotate, _level_rotate),
    "Posterize": (posterize, _level_posterize),
    "PosterizeIncreasing": (posterize, _level_posterize_increasing),
    "Solarize": (solarize, _level_solarize),
    "SolarizeIncreasing": (solarize, _level_solarize_increasing),
    "SolarizeAdd": (solarize_add, _level_solarize_add),
    "Color": (color, _level_enhance),
    "ColorIncreasing": (color, _level_enhance_increasing),
    "Contrast": (contrast, _level_enhance),
    "ContrastIncreasing": (contrast, _level_enhance_increasing),
    "Brightness": (brightness, _level_enhance),
    "BrightnessIncreasing": (brightness, _level_enhance_increasing),
    "Sharpness": (sharpness, _level_enhance),
    "SharpnessIncreasing": (sharpness, _level_enhance_increasing),
    "ShearX": (shear_x, _level_shear),
    "ShearY": (shear_y, _level_shear),
    "TranslateXRel": (translate_x_rel, _level_translate_rel),
    "TranslateYRel": (translate_y_rel, _level_translate_rel),
}
_COMMON = ("AutoContrast", "Equalize", "Invert", "Rotate")
_GEOMETRY = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
#: timm's ``_RAND_TRANSFORMS`` and ``_RAND_INCREASING_TRANSFORMS``, in its order.
RAND_OPS = _COMMON + (
    "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness") + _GEOMETRY
RAND_INCREASING_OPS = _COMMON + (
    "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing") + _GEOMETRY


def _check_clip(clip, caller: str) -> None:
    # the ops compute on 0..255 values: a float clip in [0, 1] came back wrong, silently
    if not isinstance(clip, torch.Tensor) or clip.dtype != torch.uint8 or clip.dim() != 4:
        got = f"{clip.dtype} {tuple(clip.shape)}" if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise ValueError(f"{caller} needs a uint8 (T, C, H, W) clip, got {got}")


def apply_op(clip: torch.Tensor, name: str, magnitude: float, fill: Sequence[int] = VIDEO_FILL,
             gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """One op at one magnitude (0..10), as timm's ``AugmentOp`` with prob 1 and no noise, on a
    uint8 (T, C, H, W) clip."""
    _check_clip(clip, "apply_op")
    if name not in OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; choose one of: {', '.join(OPS)}")
    op, level = OPS[name]
    if level is None:
        return op(clip, fill=fill)
    return op(clip, level(magnitude, gen), fill=fill)


def rand_augment(clip: torch.Tensor, spec: RandAugmentSpec, gen: Optional[torch.Generator] = None,
                 fill: Sequence[int] = VIDEO_FILL) -> torch.Tensor:
    """RandAugment of a uint8 (T, C, H, W) clip (T = 1 for an image), all randomness from ``gen``."""
    _check_clip(clip, "rand_augment")
    names = RAND_INCREASING_OPS if spec.increasing else RAND_OPS
    picks = torch.randint(len(names), (spec.num_ops,), generator=gen).tolist()  # with replacement, as timm
    for i in picks:
        if float(torch.rand((), generator=gen)) > spec.prob:
            continue
        magnitude = spec.magnitude
        if spec.magnitude_std > 0:
            magnitude += spec.magnitude_std * float(torch.randn((), generator=gen))
        clip = apply_op(clip, names[i], min(max(magnitude, 0.0), MAX_LEVEL), fill, gen)
    return clip
