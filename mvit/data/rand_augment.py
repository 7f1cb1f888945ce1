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


def shear_x(clip, factor: float, fill):
    return _affine(clip, (1, factor, 0, 0, 1, 0), fill)


def shear_y(clip, factor: float, fill):
    return _affine(clip, (1, 0, 0, factor, 1, 0), fill)


def translate_x_rel(clip, pct: float, fill):
    return _affine(clip, (1, 0, pct * clip.shape[-1], 0, 1, 0), fill)


def translate_y_rel(clip, pct: float, fill):
    return _affine(clip, (1, 0, 0, 0, 1, pct * clip.shape[-2]), fill)


def _lut(clip: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table.to(torch.uint8)[clip.long()]


def solarize(clip, thresh: int, fill=None):
    """PIL ``ImageOps.solarize``: invert every value >= ``thresh``."""
    i = torch.arange(256)
    return _lut(clip, torch.where(i < thresh, i, 255 - i))


def solarize_add(clip, add: int, fill=None, thresh: int = 128):
    """timm's: add ``add`` (saturating) to every value below ``thresh``."""
    i = torch.arange(256)
    return _lut(clip, torch.where(i < thresh, (i + add).clamp(max=255), i))


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

        fn = {"color": TF.adjust_saturation, "contrast": TF.adjust_contrast,
              "brightness": TF.adjust_brightness, "sharpness": TF.adjust_sharpness}[name]
        return fn(clip, factor)

    op.__name__ = name
    return op


color, contrast, brightness, sharpness = (_enhance(n) for n in ("color", "contrast", "brightness", "sharpness"))


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


def apply_op(clip: torch.Tensor, name: str, magnitude: float, fill: Sequence[int] = VIDEO_FILL,
             gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """One op at one magnitude (0..10), as timm's ``AugmentOp`` with prob 1 and no noise."""
    op, level = OPS[name]
    if level is None:
        return op(clip, fill=fill)
    return op(clip, level(magnitude, gen), fill=fill)


def rand_augment(clip: torch.Tensor, spec: RandAugmentSpec, gen: Optional[torch.Generator] = None,
                 fill: Sequence[int] = VIDEO_FILL) -> torch.Tensor:
    """RandAugment of a uint8 (T, C, H, W) clip (T = 1 for an image), all randomness from ``gen``."""
    if clip.dtype != torch.uint8 or clip.dim() != 4:
        raise ValueError(f"rand_augment needs a uint8 (T, C, H, W) clip, got {clip.dtype} {tuple(clip.shape)}")
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
