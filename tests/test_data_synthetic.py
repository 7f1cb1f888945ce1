"""The built-in synthetic motion task."""

import numpy as np
import torch

from mvit.data.synthetic import CLASSES, SyntheticMotion, render_clip


def test_shapes_labels_and_determinism():
    ds = SyntheticMotion("val", 8, frames=8, size=32, seed=0)
    x, y = ds[5]
    assert x.shape == (3, 8, 32, 32) and x.dtype == torch.float32 and y == 5 % len(CLASSES)
    assert torch.equal(ds[5][0], x)
    assert not torch.equal(ds[(5, 1)][0], ds[(5, 2)][0])  # training keys draw fresh clips
    assert not torch.equal(SyntheticMotion("train", 8)[5][0], x)  # splits differ


def _object_track(label, seed):
    """Centre of mass of what changes between frames, per frame."""
    clip = render_clip(np.random.default_rng(seed), label)
    diff = np.abs(clip - np.median(clip, axis=0, keepdims=True)).sum(-1)  # (T, H, W)
    ys, xs = np.indices(diff.shape[1:])
    diff = diff * (diff > 0.3)  # ignore sensor noise
    w = diff / diff.sum(axis=(1, 2), keepdims=True)
    return (w * ys).sum(axis=(1, 2)), (w * xs).sum(axis=(1, 2))


def test_motion_direction_matches_label():
    for seed in range(5):
        y, x = _object_track(0, seed)
        assert x[-1] > x[0] + 3  # right
        y, x = _object_track(1, seed)
        assert x[-1] < x[0] - 3  # left
        y, x = _object_track(2, seed)
        assert y[-1] > y[0] + 3  # down
        y, x = _object_track(3, seed)
        assert y[-1] < y[0] - 3  # up


def test_smallest_size_keeps_the_square_in_frame():
    import pytest

    from mvit.data.synthetic import min_size

    for frames in (1, 2, 8, 16):
        size = min_size(frames)
        for seed in range(200):  # the fastest, largest squares included
            assert render_clip(np.random.default_rng(seed), seed % 4, frames, size).shape == (frames, size, size, 3)
    assert min_size(8) == 31  # mvit_tiny's 8 x 32 x 32 fits
    with pytest.raises(ValueError, match=r"size >= 3 \* \(frames - 1\) \+ 10 \(= 55\)"):
        SyntheticMotion("train", 8, frames=16, size=32)
