"""The built-in synthetic video task: which way does the textured square move?

Every clip shows a textured square crossing a cluttered, static background in one of four
directions (the class: right, left, down, up), with a random start, speed, size, texture and
colours. Any single frame is a square somewhere on clutter, and the positions a square visits
have the same distribution for opposite directions (start and speed are uniform, and the path
of one direction is the mirror of the other), so only the ORDER of the frames tells left from
right and up from down. With the frames shuffled the axis of motion still shows (the square's
positions spread horizontally or vertically), so a model can reach at most 50% there, against
25% chance and ~99% with the frames in order (the MViT paper's Table 9, in miniature). A variant
with two squares (one per axis, class = both directions) would make shuffled frames exactly
chance, but a tiny MViT did not start learning it within 2 epochs, so the one-square task stays.

Clips are generated in-process from a seed, so the task needs no download and is reproducible:
sample ``i`` of a split is a pure function of ``(seed, split, i)`` (and, for training, of the
per-sample seed the sampler hands out, so each epoch sees fresh clips).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import KINETICS_MEAN, KINETICS_STD

CLASSES = ("right", "left", "down", "up")
# unit motion per class as (dy, dx) in pixels per frame
_DIRECTIONS = {0: (0, 1), 1: (0, -1), 2: (1, 0), 3: (-1, 0)}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

# Kinetics mean/std (pySlowFast DATA.MEAN / DATA.STD): the synthetic clips' normalization
MEAN, STD = KINETICS_MEAN, KINETICS_STD


# The moving square is up to 10 pixels wide and moves up to 3 pixels a frame, and its whole path
# stays in frame: that needs size >= 3 * (frames - 1) + 10.
_MAX_SQUARE, _MAX_SPEED = 10, 3.0


def min_size(frames: int) -> int:
    """The smallest frame size (pixels) whose clips of ``frames`` frames keep the square in frame."""
    return int(_MAX_SPEED * (frames - 1)) + _MAX_SQUARE


def render_clip(rng: np.random.Generator, label: int, frames: int = 8, size: int = 32) -> np.ndarray:
    """One clip as float32 (T, H, W, 3) in [0, 1]."""
    # background clutter: coarse random colour blobs (bilinear-upsampled 4x4 noise) + fine noise
    coarse = rng.uniform(0.0, 1.0, size=(4, 4, 3)).astype(np.float32)
    coords = np.linspace(0, 3, size, dtype=np.float32)
    i0 = np.clip(np.floor(coords).astype(int), 0, 2)
    f = (coords - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]  # (size, 4, 3)
    bg = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]
    bg = 0.6 * bg + 0.4 * rng.uniform(0.0, 1.0, size=(size, size, 3)).astype(np.float32)

    # static distractor squares with the same kind of texture as the moving one
    def texture(s: int) -> np.ndarray:
        c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        cell = int(rng.integers(1, 3))
        pattern = (np.add.outer(np.arange(s) // cell, np.arange(s) // cell) % 2).astype(np.float32)
        pattern = np.clip(pattern + rng.normal(0, 0.15, (s, s)), 0, 1)[..., None]
        return (pattern * c1 + (1 - pattern) * c2).astype(np.float32)

    for _ in range(int(rng.integers(1, 4))):
        s = int(rng.integers(4, 9))
        y, x = rng.integers(0, size - s, 2)
        bg[y : y + s, x : x + s] = texture(s)

    s = int(rng.integers(6, _MAX_SQUARE + 1))
    obj = texture(s)
    dy, dx = _DIRECTIONS[label]
    speed = rng.uniform(1.5, _MAX_SPEED)
    travel = speed * (frames - 1)
    room = size - s
    along0 = rng.uniform(0, room - travel)  # start so that the whole path stays in frame
    across = int(rng.integers(0, room + 1))
    clip = np.empty((frames, size, size, 3), dtype=np.float32)
    for t in range(frames):
        along = along0 + speed * t
        if dy + dx < 0:  # moving towards 0: mirror the path
            along = room - along
        pos = int(round(along))
        y, x = (pos, across) if dy else (across, pos)
        frame = bg.copy()
        frame[y : y + s, x : x + s] = obj
        clip[t] = frame
    clip += rng.normal(0, 0.03, clip.shape).astype(np.float32)  # per-frame sensor noise
    return np.clip(clip, 0, 1)


class SyntheticMotion(Dataset):
    """Map-style dataset of synthetic clips, (3, T, H, W) normalized float tensors and int labels.

    Indices may be ints or ``(index, sample_seed)`` pairs (what the training sampler yields): with a
    sample seed the clip is drawn from it, so a training epoch sees new clips every time.
    """

    num_classes = len(CLASSES)
    classes = CLASSES

    def __init__(self, split: str = "train", length: int = 8192, frames: int = 8, size: int = 32,
                 seed: int = 0):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        if frames < 1 or size < min_size(frames):
            raise ValueError(f"the synthetic task needs frames >= 1 and size >= 3 * (frames - 1) + 10 "
                             f"(= {min_size(max(frames, 1))}) to keep the square in frame; got {frames} frames of "
                             f"{size}x{size}")
        self.split, self.length, self.frames, self.size = split, length, frames, size
        self.seed = seed
        self.mean = torch.tensor(MEAN).view(3, 1, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1, 1)

    def __len__(self) -> int:
        return self.length

    def label(self, index: int) -> int:
        return index % self.num_classes

    def __getitem__(self, key):
        index, sample_seed = key[:2] if isinstance(key, tuple) else (key, None)  # (index, seed[, clip seed])
        entropy = [self.seed, _SPLIT_IDS[self.split], index] + ([] if sample_seed is None else [sample_seed])
        rng = np.random.default_rng(entropy)
        label = self.label(index)
        clip = render_clip(rng, label, self.frames, self.size)
        x = torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2)  # (3, T, H, W)
        return (x - self.mean) / self.std, label
