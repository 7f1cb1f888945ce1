"""Datasets for training and evaluation, chosen from the command-line arguments.

Training datasets return ``(clip (3, T, H, W) float, label)`` and accept ``(index, sample_seed)``
keys from :class:`~mvit.data.samplers.TrainSampler`. Evaluation datasets return
``(views (V, 3, T, H, W), label)``: all test views of one video together, so that a video is
scored on one rank, once.

- built-in synthetic task (:mod:`.synthetic`): no data arguments;
- videos (:mod:`.video`): pySlowFast ``path label`` CSV files, or class folders ROOT/train/<class>/;
- images (:mod:`.image`): ImageNet-layout folders, for image presets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset


@dataclass
class DataBundle:
    train: Dataset
    val: Optional[Dataset]
    num_classes: int
    classes: Optional[Sequence[str]]
    multi_label: bool
    input_size: Optional[tuple]  # (T, H, W) the model should be built for, or None for the preset's
    workers: int


class SingleView(Dataset):
    """Eval adapter: a dataset of single clips as one-view videos."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x.unsqueeze(0), y


def build_datasets(args, recipe: dict) -> DataBundle:
    from ..presets import get_preset

    cfg = get_preset(args.preset)  # unknown preset: ValueError before any data is touched
    if recipe["synthetic"]:
        from .synthetic import SyntheticMotion
        from ..train import SYNTHETIC_TRAIN_LENGTH, SYNTHETIC_VAL_LENGTH

        if cfg.patch_2d:
            raise ValueError(f"the built-in synthetic task is a video task; {args.preset} is an image preset")
        t = args.num_frames or cfg.input_size[0]
        s = args.crop_size or cfg.input_size[1]
        train = SyntheticMotion("train", SYNTHETIC_TRAIN_LENGTH, t, s, seed=args.seed)
        val = SingleView(SyntheticMotion("val", SYNTHETIC_VAL_LENGTH, t, s, seed=args.seed))
        return DataBundle(train, val, SyntheticMotion.num_classes, SyntheticMotion.classes, False,
                          (t, s, s), 0 if args.workers is None else args.workers)

    workers = 4 if args.workers is None else args.workers
    if args.image_folders or cfg.patch_2d:
        from .image import build_image_datasets

        return build_image_datasets(args, recipe, cfg, workers)
    from .video import build_video_datasets

    return build_video_datasets(args, recipe, cfg, workers)
