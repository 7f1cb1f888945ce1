"""Clip transforms: one random draw per clip, so every frame gets the same augmentation."""

import pytest
import torch

from mvit.data import transforms as T

pytest.importorskip("torchvision")


def _same_frames(clip):
    return all(torch.equal(clip[0], clip[t]) for t in range(1, clip.shape[0]))


def test_rand_augment_and_erasing_are_consistent_across_frames():
    torch.manual_seed(0)
    frame = torch.randint(0, 256, (1, 3, 24, 24), dtype=torch.uint8)
    clip = frame.expand(6, -1, -1, -1).contiguous()  # six identical frames
    for seed in range(5):
        torch.manual_seed(seed)
        out = T.rand_augment(clip, magnitude=9, num_ops=3)
        assert _same_frames(out)
    x = T.normalize(clip, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(1)
    erased = T.random_erasing(x, prob=1.0)
    changed = (erased != x).any(0).any(0)  # (H, W) mask of the erased box, union over frames
    assert changed.any()
    assert all(((erased[t] != x[t]).any(0) == changed).all() for t in range(6))  # the same box on every frame


def test_geometry_helpers():
    clip = torch.arange(2 * 3 * 20 * 30, dtype=torch.float32).view(2, 3, 20, 30)
    assert T.short_side_scale(clip, 10).shape[-2:] == (10, 15)
    assert torch.equal(T.uniform_crop(clip, 20, 0), clip[..., :, :20])
    assert torch.equal(T.uniform_crop(clip, 20, 2), clip[..., :, 10:])
    assert torch.equal(T.uniform_crop(clip, 10, 1), clip[..., 5:15, 10:20])
    g = torch.Generator().manual_seed(0)
    assert T.random_crop(clip, 16, g).shape[-2:] == (16, 16)
    assert T.parse_rand_augment("m7-n4") == (7, 4) and T.parse_rand_augment("none") is None


@pytest.mark.parametrize("spec", ["mx-n2", "garbage", "7-4", "m7", "n4-m7x", "m7-n4-m9", "m-n2", "m7_n4"])
def test_rand_augment_spec_must_be_m_n(spec):
    # these used to parse as the default m9-n2: a typo silently changed the augmentation
    with pytest.raises(ValueError, match="--rand-augment must look like 'm7-n4'"):
        T.parse_rand_augment(spec)


def test_rand_augment_magnitude_and_ops_ranges():
    assert T.parse_rand_augment("m30-n1") == (30, 1) and T.parse_rand_augment("M0-N3") == (0, 3)
    with pytest.raises(ValueError, match="magnitude must be 0..30"):
        T.parse_rand_augment("m31-n2")  # torchvision's RandAugment would fail on the first sample
    with pytest.raises(ValueError, match="at least one op"):
        T.parse_rand_augment("m9-n0")
    clip = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    T.rand_augment(clip, 30, 2)  # the largest accepted magnitude runs
