"""Clip transforms on (T, C, H, W) tensors; every random choice is made once per clip, so all
frames of a clip get the same scale, crop, flip, RandAugment ops (:mod:`.rand_augment`) and
erased box.

Randomness comes from an explicit ``torch.Generator`` (or, for torchvision's RandomErasing, from
the global RNG that the dataset seeds per sample), so a sample's augmentation is a function of its
sample seed alone.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


#: frames resized together by :func:`resize` (bounds its float working memory)
RESIZE_FRAMES = 8


def _randint(lo: int, hi: int, gen: Optional[torch.Generator]) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def resize(clip: torch.Tensor, size: tuple[int, int], mode: str = "bilinear", antialias: bool = False) -> torch.Tensor:
    """(T, C, H, W) to ``size`` = (H', W'), keeping uint8 uint8 (rounded, clamped: bicubic overshoots)."""
    if tuple(clip.shape[-2:]) == tuple(size):
        return clip
    if clip.dtype != torch.uint8:
        return F.interpolate(clip.float(), size=size, mode=mode, align_corners=False, antialias=antialias)
    # A few frames at a time: the float copy of all of a video's test clips at its own size
    # (80 frames of 1080p: 2 GB) never exists at once. Frames are resized independently, so
    # the result is the same.
    out = clip.new_empty((*clip.shape[:2], *size))
    for i in range(0, clip.shape[0], RESIZE_FRAMES):
        part = F.interpolate(clip[i:i + RESIZE_FRAMES].float(), size=size, mode=mode, align_corners=False,
                             antialias=antialias)
        out[i:i + RESIZE_FRAMES] = part.round_().clamp_(0, 255)
    return out


def short_side_scale(clip: torch.Tensor, size: int, mode: str = "bilinear", antialias: bool = False) -> torch.Tensor:
    """Resize (T, C, H, W) so that its shorter side is ``size``, keeping aspect ratio (the longer
    side rounded down, as pySlowFast and torchvision's ``Resize(int)``). Videos: bilinear without
    antialiasing (pySlowFast's ``F.interpolate``); images: bicubic with it (PIL's resize)."""
    h, w = clip.shape[-2:]
    if min(h, w) == size:
        return clip
    if h <= w:
        new_h, new_w = size, int(math.floor(w * size / h))
    else:
        new_h, new_w = int(math.floor(h * size / w)), size
    return resize(clip, (new_h, new_w), mode, antialias)


def random_short_side_scale(clip: torch.Tensor, min_size: int, max_size: int, gen=None,
                            inverse_uniform: bool = False) -> torch.Tensor:
    """The short side to a size drawn from [min_size, max_size]: uniformly, or with
    ``inverse_uniform`` (pySlowFast's DATA.INV_UNIFORM_SAMPLE, its Something-Something configs)
    round(1 / u) for u uniform in [1 / max_size, 1 / min_size]."""
    if inverse_uniform:
        u = 1.0 / max_size + (1.0 / min_size - 1.0 / max_size) * float(torch.rand((), generator=gen))
        return short_side_scale(clip, int(round(1.0 / u)))
    return short_side_scale(clip, _randint(min_size, max_size, gen))


def random_crop(clip: torch.Tensor, size: int, gen=None) -> torch.Tensor:
    h, w = clip.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from {h}x{w}")
    y, x = _randint(0, h - size, gen), _randint(0, w - size, gen)
    return clip[..., y : y + size, x : x + size]


def random_resized_crop(clip: torch.Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                        gen=None, mode: str = "bilinear", antialias: bool = False) -> torch.Tensor:
    """A box of ``scale`` of the area and aspect ratio (w/h) in ``ratio`` (drawn log-uniformly),
    resized to size x size: torchvision's ``RandomResizedCrop`` rule, which pySlowFast's
    ``random_resized_crop`` (MViT's Kinetics training) and timm's (its ImageNet training) share.
    After 10 draws that do not fit, the centre box of the nearest aspect ratio."""
    h, w = clip.shape[-2:]
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=gen)))
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(torch.rand((), generator=gen)))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y, x = _randint(0, h - ch, gen), _randint(0, w - cw, gen)
            break
    else:
        in_ratio = w / h
        if in_ratio < min(ratio):
            cw, ch = w, int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            cw, ch = int(round(h * max(ratio))), h
        else:
            cw, ch = w, h
        y, x = (h - ch) // 2, (w - cw) // 2
    return resize(clip[..., y : y + ch, x : x + cw], (size, size), mode, antialias)


def random_flip(clip: torch.Tensor, prob: float = 0.5, gen=None) -> torch.Tensor:
    return clip.flip(-1) if float(torch.rand((), generator=gen)) < prob else clip


def uniform_crop(clip: torch.Tensor, size: int, spatial_idx: int) -> torch.Tensor:
    """pySlowFast ``uniform_crop``: crop 0/1/2 = left/centre/right (top/centre/bottom when the
    frame is taller than wide) along the longer side, centred along the shorter."""
    h, w = clip.shape[-2:]
    y, x = -((size - h) // 2), -((size - w) // 2)  # ceil((h - size) / 2), as pySlowFast
    if spatial_idx != 1:
        if h > w:
            y = 0 if spatial_idx == 0 else h - size
        else:
            x = 0 if spatial_idx == 0 else w - size
    return clip[..., y : y + size, x : x + size]


def center_crop(clip: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's ``CenterCrop`` (the image models' evaluation): offsets round((h - size) / 2),
    where :func:`uniform_crop` (pySlowFast's, for videos) takes the ceiling."""
    h, w = clip.shape[-2:]
    y, x = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return clip[..., y : y + size, x : x + size]


def random_erasing(clip: torch.Tensor, prob: float, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """With probability ``prob``, one box of normalized (T, C, H, W) replaced by standard normal
    noise: timm's RandomErasing as pySlowFast (``_erase_cube``, mode pixel, one box) and
    facebookresearch/mvit apply it. The box covers 2%-1/3 of the area with an aspect ratio
    log-uniform in [0.3, 1/0.3] (up to 100 draws) and is the same on every frame; the noise is
    drawn per frame (it stayed frozen across frames with torchvision's RandomErasing)."""
    if prob <= 0 or float(torch.rand((), generator=gen)) >= prob:
        return clip
    frames, channels, h, w = clip.shape
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(100):
        area = h * w * (0.02 + (1 / 3 - 0.02) * float(torch.rand((), generator=gen)))
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(torch.rand((), generator=gen)))
        eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if ew < w and eh < h:
            top, left = _randint(0, h - eh, gen), _randint(0, w - ew, gen)
            out = clip.clone()
            out[:, :, top:top + eh, left:left + ew] = torch.randn(
                (frames, channels, eh, ew), generator=gen, dtype=clip.dtype, device=clip.device)
            return out
    return clip


def normalize(clip_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """(T, C, H, W) uint8 -> float, (x / 255 - mean) / std."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (clip_uint8.float() / 255.0 - m) / s
