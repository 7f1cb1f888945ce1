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
    sampling_rate: Optional[int] = None  # the frame stride of the clips, where they are strided videos


class SingleView(Dataset):
    """Eval adapter: a dataset of single clips as one-view videos."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x.unsqueeze(0), y


def default_workers() -> int:
    """DataLoader workers when --workers is not given: 4, or fewer where the CPUs this process may
    use, shared by the ranks on the machine (torchrun's LOCAL_WORLD_SIZE), are fewer; at least 1.
    More workers than CPUs only contend (DataLoader warns of it)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def build_datasets(args, recipe: dict) -> DataBundle:
    from ..presets import get_preset

    cfg = get_preset(args.preset)  # unknown preset: ValueError before any data is touched
    if recipe["synthetic"]:
        from .synthetic import SyntheticMotion, min_size
        if cfg.patch_2d:
            raise ValueError(f"the built-in synthetic task is a video task; {args.preset} is an image preset")
        t = args.num_frames or cfg.input_size[0]
        s = args.crop_size or cfg.input_size[1]
        if t < 1:
            raise ValueError(f"--num-frames must be >= 1, got {t}")
        if s < min_size(t):
            # the moving square would leave the frame (or not fit at all)
            raise ValueError(f"the synthetic task needs --crop-size >= 3 * (--num-frames - 1) + 10 = {min_size(t)} "
                             f"at {t} frames" + (" (the preset's)" if not args.num_frames else "") +
                             f"; got {s}" + ("" if args.crop_size else " (the preset's)"))
        n_train, n_val = args.synthetic_size
        train = SyntheticMotion("train", n_train, t, s, seed=args.seed)
        val = SingleView(SyntheticMotion("val", n_val, t, s, seed=args.seed)) if n_val > 0 else None
        # sampling_rate 1: the clips are consecutive frames, and the saved model says so (mvit predict
        # of rendered clips took every 4th frame, the preset's stride, and got half of them wrong)
        return DataBundle(train, val, SyntheticMotion.num_classes, SyntheticMotion.classes, False,
                          (t, s, s), 0 if args.workers is None else args.workers, sampling_rate=1)

    workers = default_workers() if args.workers is None else args.workers
    if args.image_folders or cfg.patch_2d:
        from .image import build_image_datasets

        return build_image_datasets(args, recipe, cfg, workers)
    from .video import build_video_datasets

    return build_video_datasets(args, recipe, cfg, workers)


def build_eval_dataset(args, state: dict):
    """The evaluation dataset for ``mvit eval``: the synthetic validation split when the checkpoint
    was trained on it and no data is given, else videos / images from the arguments.
    Returns (dataset, multi_label, workers)."""
    from .synthetic import SyntheticMotion

    cfg = state["model_config"]
    train_args = state.get("args") or {}
    recipe = state.get("recipe") or {}
    workers = default_workers() if args.workers is None else args.workers
    if not (args.val_csv or args.data_root):
        if not recipe.get("synthetic"):
            raise ValueError("give --val-csv or --data-root (the checkpoint was not trained on the synthetic task)")
        # one view per synthetic clip, rendered at the model's size
        _reject_unused("the synthetic task's evaluation",
                       _clip_options(args) + [("--image-folders", args.image_folders),
                                              ("--crop-fraction", args.crop_fraction is not None),
                                              ("--input-mean", getattr(args, "input_mean", None) is not None),
                                              ("--input-std", getattr(args, "input_std", None) is not None),
                                              ("--skip-unreadable", getattr(args, "skip_unreadable", False)),
                                              ("--orientation", getattr(args, "orientation", None) is not None)])
        from ..train import SYNTHETIC_VAL_LENGTH

        t, s = cfg.input_size[0], cfg.input_size[1]
        # A run trained without validation clips (--synthetic-size N 0) is evaluated on the
        # default number: its validation split is a pure function of the seed like any other.
        n_val = (train_args.get("synthetic_size") or (0, 0))[1] or SYNTHETIC_VAL_LENGTH
        ds = SingleView(SyntheticMotion("val", n_val, t, s, seed=train_args.get("seed", 0)))
        return ds, False, 0 if args.workers is None else args.workers
    multi = bool(train_args.get("multi_label"))
    image = args.image_folders or cfg.patch_2d
    from .image import IMAGE_EXTENSIONS
    from .video import VIDEO_EXTENSIONS, check_data_root, class_folders, read_list

    if args.val_csv:
        items = read_list(args.val_csv, args.data_root, multi, cfg.num_classes,
                          f" (the checkpoint's model has {cfg.num_classes} classes)")[0]
    else:
        check_data_root(args.data_root)
        items, classes = class_folders(args.data_root, "val", IMAGE_EXTENSIONS if image else VIDEO_EXTENSIONS,
                                       state.get("classes"))
        if len(classes) > cfg.num_classes:
            raise ValueError(f"{os.path.join(args.data_root, 'val')} has {len(classes)} class folders; the "
                             f"checkpoint's model has {cfg.num_classes} classes")
    return eval_views(args, state, items, image), multi, workers


def eval_views(args, state: dict, items: list, image: bool) -> Dataset:
    """The test views of ``items`` ((path, label) pairs) for ``mvit eval`` and ``mvit predict``:
    an image's centre crop (``args.crop_fraction``), or a video's clips x crops (``args.test_clips``,
    ``args.test_crops``, ``args.sampling_rate``, ``args.target_fps``, ``args.temporal_sampling``;
    unset: the checkpoint's run's sampling and the papers' views for it), read as
    ``args.orientation`` says (unset: the run's, else as stored). An option the input does not
    use is an error."""
    from ..presets import PAPER_TEST_VIEWS
    from .image import CROP_FRACTION, ImageFolderDataset
    from .video import ClipSpec, VideoDataset, default_jitter

    cfg = state["model_config"]
    train_args = state.get("args") or {}
    multi = bool(train_args.get("multi_label"))
    orientation = getattr(args, "orientation", None) or train_args.get("orientation") or "stored"
    if image:  # one centre crop of one frame per image
        _reject_unused("an image checkpoint's evaluation", _clip_options(args))
        fraction = CROP_FRACTION if args.crop_fraction is None else args.crop_fraction
        mean, std = cfg.normalization(image=True)
        return ImageFolderDataset(items, cfg.input_size[1], False, num_classes=cfg.num_classes,
                                  multi_label=multi, crop_fraction=fraction, mean=mean, std=std,
                                  orientation=orientation)
    # unset: the training run's settings (an older run's stored target_fps of 0 meant the source rate)
    fps = args.target_fps if args.target_fps is not None else train_args.get("target_fps", 30.0)
    stride = (args.sampling_rate if args.sampling_rate is not None
              else train_args.get("sampling_rate") or cfg.sampling_rate)  # the model's: the published weights
    sampling = (getattr(args, "temporal_sampling", None) or (state.get("recipe") or {}).get("temporal_sampling")
                or "stride")
    segments = sampling == "segments"
    _reject_unused("a video checkpoint's evaluation", [("--crop-fraction", args.crop_fraction is not None)] + (
        [("--sampling-rate", args.sampling_rate is not None), ("--target-fps", args.target_fps is not None)]
        if segments else []))
    # The MViT papers' views: Kinetics 5 clips x 1 crop (MViTv2-L 5 x 3: PAPER_TEST_VIEWS), the short
    # side scaled as in training (256 for 224 crops) before the centre crop, or to the crop for 3
    # crops; Something-Something (segments) 1 clip x 3 crops.
    crop = cfg.input_size[1]
    jitter = train_args.get("jitter_scales") or default_jitter(crop)
    clips, crops = (1, 3) if segments else PAPER_TEST_VIEWS.get(cfg.name, (5, 1))
    mean, std = cfg.normalization(image=False)
    spec = ClipSpec(frames=cfg.input_size[0], crop=crop, stride=stride, target_fps=fps or None,
                    jitter=tuple(jitter), temporal_sampling=sampling, mean=mean, std=std,
                    test_clips=clips if args.test_clips is None else args.test_clips,
                    test_crops=crops if args.test_crops is None else args.test_crops, orientation=orientation)
    return VideoDataset(items, spec, False, cfg.num_classes, multi)


def _clip_options(args) -> list[tuple[str, bool]]:
    """(option, given) for mvit eval's options of video clips and views."""
    return [("--test-clips", args.test_clips not in (None, 1)), ("--test-crops", args.test_crops not in (None, 1)),
            ("--sampling-rate", args.sampling_rate is not None), ("--target-fps", args.target_fps is not None),
            ("--temporal-sampling", getattr(args, "temporal_sampling", None) is not None)]


def _reject_unused(task: str, options: list[tuple[str, bool]]) -> None:
    """An option the evaluation would ignore is an error, not silently dropped."""
    unused = [name for name, given in options if given]
    if unused:
        raise ValueError(f"{task} does not use {', '.join(unused)}: leave {'it' if len(unused) == 1 else 'them'} out")
