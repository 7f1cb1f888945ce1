"""Clip transforms on (T, C, H, W) tensors; every random choice is made once per clip, so all
frames of a clip get the same scale, crop, flip, RandAugment ops and erased box.

Randomness comes from an explicit ``torch.Generator`` (or, for the torchvision RandAugment and
RandomErasing transforms, from the global RNG that the dataset seeds per sample), so a sample's
augmentation is a function of its sample seed alone.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch
import torch.nn.functional as F


def _randint(lo: int, hi: int, gen: Optional[torch.Generator]) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def short_side_scale(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (T, C, H, W) so that its shorter side is ``size`` (bilinear), keeping aspect ratio."""
    h, w = clip.shape[-2:]
    if min(h, w) == size:
        return clip
    if h <= w:
        new_h, new_w = size, int(math.floor(w * size / h))
    else:
        new_h, new_w = int(math.floor(h * size / w)), size
    dtype = clip.dtype
    out = F.interpolate(clip.float(), size=(new_h, new_w), mode="bilinear", align_corners=False)
    return out.round().clamp(0, 255).to(dtype) if dtype == torch.uint8 else out


def random_short_side_scale(clip: torch.Tensor, min_size: int, max_size: int, gen=None) -> torch.Tensor:
    return short_side_scale(clip, _randint(min_size, max_size, gen))


def random_crop(clip: torch.Tensor, size: int, gen=None) -> torch.Tensor:
    h, w = clip.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from {h}x{w}")
    y, x = _randint(0, h - size, gen), _randint(0, w - size, gen)
    return clip[..., y : y + size, x : x + size]


def random_flip(clip: torch.Tensor, prob: float = 0.5, gen=None) -> torch.Tensor:
    return clip.flip(-1) if float(torch.rand((), generator=gen)) < prob else clip


def uniform_crop(clip: torch.Tensor, size: int, spatial_idx: int) -> torch.Tensor:
    """pySlowFast ``uniform_crop``: crop 0/1/2 = left/centre/right (top/centre/bottom when the
    frame is taller than wide) along the longer side, centred along the shorter."""
    h, w = clip.shape[-2:]
    y, x = (h - size) // 2, (w - size) // 2
    if spatial_idx != 1:
        if h > w:
            y = 0 if spatial_idx == 0 else h - size
        else:
            x = 0 if spatial_idx == 0 else w - size
    return clip[..., y : y + size, x : x + size]


# torchvision's RandAugment splits each op's range into 31 bins: magnitudes 0..30
RAND_AUGMENT_MAX_MAGNITUDE = 30
_RAND_AUGMENT = re.compile(r"^m(\d+)-n(\d+)$")


def parse_rand_augment(spec: Optional[str]) -> Optional[tuple[int, int]]:
    """'m7-n4' -> (magnitude 7, ops 4); 'none' / '' / None -> None. Anything else is an error
    (a typo must not silently become some default strength)."""
    if not spec or spec.lower() in ("none", "off", "0"):
        return None
    m = _RAND_AUGMENT.match(spec.strip().lower())
    if not m:
        raise ValueError(f"--rand-augment must look like 'm7-n4' (magnitude 7, 4 ops) or 'none', got {spec!r}")
    magnitude, ops = int(m.group(1)), int(m.group(2))
    if magnitude > RAND_AUGMENT_MAX_MAGNITUDE:
        raise ValueError(f"--rand-augment magnitude must be 0..{RAND_AUGMENT_MAX_MAGNITUDE} "
                         f"(torchvision's RandAugment bins), got {spec!r}")
    if ops < 1:
        raise ValueError(f"--rand-augment needs at least one op (n >= 1; 'none' turns it off), got {spec!r}")
    return magnitude, ops


def rand_augment(clip_uint8: torch.Tensor, magnitude: int, num_ops: int) -> torch.Tensor:
    """torchvision RandAugment on (T, C, H, W) uint8: one draw of ops for the whole clip."""
    from torchvision.transforms import v2

    return v2.RandAugment(num_ops=num_ops, magnitude=magnitude)(clip_uint8)


def random_erasing(clip: torch.Tensor, prob: float) -> torch.Tensor:
    """torchvision RandomErasing (random values) on normalized (T, C, H, W): one box for all frames."""
    from torchvision.transforms import v2

    return v2.RandomErasing(p=prob, value="random")(clip) if prob > 0 else clip


def normalize(clip_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """(T, C, H, W) uint8 -> float, (x / 255 - mean) / std."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (clip_uint8.float() / 255.0 - m) / s
