"""Clip transforms: one random draw per clip, so every frame gets the same augmentation."""

import pytest
import torch

from mvit.data import rand_augment
from mvit.data import transforms as T

pytest.importorskip("torchvision")


def _same_frames(clip):
    return all(torch.equal(clip[0], clip[t]) for t in range(1, clip.shape[0]))


def test_rand_augment_and_erasing_are_consistent_across_frames():
    torch.manual_seed(0)
    frame = torch.randint(0, 256, (1, 3, 24, 24), dtype=torch.uint8)
    clip = frame.expand(6, -1, -1, -1).contiguous()  # six identical frames
    spec = rand_augment.parse("rand-m9-n3-mstd0.5-inc1")
    changed = 0
    for seed in range(8):
        out = rand_augment.rand_augment(clip, spec, torch.Generator().manual_seed(seed))
        assert _same_frames(out)
        changed += not torch.equal(out, clip)
    assert changed >= 4  # P(no op applies) = 1/8 per clip
    x = T.normalize(clip, (0.5,) * 3, (0.25,) * 3)
    erased = T.random_erasing(x, 1.0, torch.Generator().manual_seed(1))
    changed = (erased != x).any(0).any(0)  # (H, W) mask of the erased box, union over frames
    assert changed.any()
    assert all(((erased[t] != x[t]).any(0) == changed).all() for t in range(6))  # the same box on every frame
    # pySlowFast's _erase_cube draws the noise per frame (torchvision's froze one patch on all)
    box = erased[:, :, changed]
    assert not torch.equal(box[0], box[1])
    assert abs(float(box.mean())) < 0.3 and 0.7 < float(box.std()) < 1.3  # standard normal noise


def test_random_erasing_boxes_as_timm():
    # 2%-1/3 of the area, aspect log-uniform in [0.3, 3.33]; probability as given
    x = torch.zeros(1, 3, 40, 60)
    areas, hits = [], 0
    for seed in range(300):
        out = T.random_erasing(x, 0.5, torch.Generator().manual_seed(seed))
        mask = (out != 0).any(0).any(0)
        if mask.any():
            hits += 1
            rows, cols = mask.any(1).sum().item(), mask.any(0).sum().item()
            assert mask.sum().item() == rows * cols  # one rectangle
            areas.append(rows * cols / (40 * 60))
    assert 120 < hits < 180
    assert min(areas) > 0.01 and max(areas) < 0.36 and 0.1 < sum(areas) / len(areas) < 0.25


def test_geometry_helpers():
    clip = torch.arange(2 * 3 * 20 * 30, dtype=torch.float32).view(2, 3, 20, 30)
    assert T.short_side_scale(clip, 10).shape[-2:] == (10, 15)
    assert torch.equal(T.uniform_crop(clip, 20, 0), clip[..., :, :20])
    assert torch.equal(T.uniform_crop(clip, 20, 2), clip[..., :, 10:])
    assert torch.equal(T.uniform_crop(clip, 10, 1), clip[..., 5:15, 10:20])
    g = torch.Generator().manual_seed(0)
    assert T.random_crop(clip, 16, g).shape[-2:] == (16, 16)


def test_centre_crops_round_as_their_references():
    clip = torch.arange(21 * 26, dtype=torch.float32).view(1, 1, 21, 26)
    # pySlowFast's uniform_crop: ceil((h - size) / 2); 21 - 16 = 5 -> 3, 26 - 16 = 10 -> 5
    assert torch.equal(T.uniform_crop(clip, 16, 1), clip[..., 3:19, 5:21])
    # torchvision's CenterCrop: round((h - size) / 2), Python's rounding: 2.5 -> 2, 5 -> 5
    assert torch.equal(T.center_crop(clip, 16), clip[..., 2:18, 5:21])
    assert torch.equal(T.center_crop(clip[..., :19, :], 16), clip[..., 2:18, 5:21])  # 1.5 -> 2


def test_random_resized_crop_boxes(monkeypatch):
    h, w = 60, 80
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    clip = torch.stack([ys, xs])[None]  # channel 0: row, channel 1: column

    def box(scale, ratio, gen):
        """(top, left, height, width) of the box cut before the resize."""
        with monkeypatch.context() as m:
            m.setattr(T, "resize", lambda crop, *a, **k: crop)
            crop = T.random_resized_crop(clip, 12, scale, ratio, gen)
        return int(crop[0, 0, 0, 0]), int(crop[0, 1, 0, 0]), crop.shape[-2], crop.shape[-1]

    g = torch.Generator().manual_seed(0)
    areas, aspects = [], []
    for _ in range(300):
        top, left, bh, bw = box((0.08, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
        areas.append(bh * bw / (h * w))
        aspects.append(bw / bh)
    assert 0.07 < min(areas) < 0.2 and max(areas) > 0.8  # drawn over the range
    assert min(aspects) > 0.7 and max(aspects) < 1.4 and min(aspects) < 0.85 and max(aspects) > 1.2
    assert box((1.0, 1.0), (w / h, w / h), g) == (0, 0, h, w)  # the whole frame
    # no box of aspect 4-5 fits at 99% of the area: the centre box of aspect 4 (torchvision's fallback)
    assert box((0.99, 1.0), (4.0, 5.0), g) == ((h - 20) // 2, 0, 20, w)
    uint8 = torch.randint(0, 256, (3, 3, 50, 40), dtype=torch.uint8)
    a = T.random_resized_crop(uint8, 16, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(3), "bicubic", True)
    b = T.random_resized_crop(uint8, 16, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(3), "bicubic", True)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 16, 16) and torch.equal(a, b)


def test_inverse_uniform_jitter_leans_to_the_small_sizes():
    """pySlowFast's INV_UNIFORM_SAMPLE: 1 / uniform(1 / max, 1 / min); between 16 and 64 its median
    is 1 / 0.0390625 = 25.6 where a uniform draw's is 40."""
    clip = torch.zeros(1, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    inv = sorted(T.random_short_side_scale(clip, 16, 64, g, inverse_uniform=True).shape[-1] for _ in range(300))
    uni = sorted(T.random_short_side_scale(clip, 16, 64, g).shape[-1] for _ in range(300))
    assert 16 <= inv[0] and inv[-1] <= 64 and 16 <= uni[0] and uni[-1] <= 64
    assert 22 <= inv[150] <= 30 and 35 <= uni[150] <= 45


@pytest.mark.parametrize("mode, antialias", [("bilinear", True), ("bilinear", False), ("bicubic", True)])
def test_resize_in_chunks_of_frames_equals_one_resize(mode, antialias):
    # resize works through a long clip RESIZE_FRAMES frames at a time (memory): the frames must
    # come out as one call over the whole clip gives them.
    g = torch.Generator().manual_seed(3)
    clip = torch.randint(0, 256, (T.RESIZE_FRAMES * 2 + 3, 3, 37, 52), dtype=torch.uint8, generator=g)
    whole = torch.nn.functional.interpolate(clip.float(), size=(20, 29), mode=mode, align_corners=False,
                                            antialias=antialias).round_().clamp_(0, 255).to(torch.uint8)
    out = T.resize(clip, (20, 29), mode, antialias)
    assert out.dtype == torch.uint8 and torch.equal(out, whole)
    assert torch.equal(T.resize(clip[:1], (20, 29), mode, antialias), whole[:1])
