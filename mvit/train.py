"""``mvit train``: the training loop (one process, or one per GPU/CPU rank under torchrun).

With no data arguments it trains ``mvit_tiny`` on the built-in synthetic motion task
(:mod:`mvit.data.synthetic`) with the settings in ``SYNTHETIC_RECIPE``, then evaluates it with
the frames in order and shuffled. Otherwise every default is the papers' recipe, each overridable
by a flag: ``PAPER_RECIPE`` for videos (MViT / MViTv2 Kinetics training as in pySlowFast),
``IMAGE_RECIPE`` for images (MViTv2 ImageNet training as in facebookresearch/mvit), or with
``--recipe ssv2`` ``SSV2_RECIPE`` (Something-Something v2 as in pySlowFast).

Reproducibility: the initial weights are drawn after seeding the global torch RNG with --seed,
the RNG is reseeded at every optimizer step from (seed, rank, step), and every sample's
augmentation is drawn from its own seed (see ``TrainSampler``): two runs with the same seed are
the same run, and resuming from a mid-epoch checkpoint replays exactly the losses of the
uninterrupted run. The RNG states are saved in checkpoints too (per rank) and restored on
resume. Bitwise replay also needs the same number of CPU threads (it changes how reductions
are split), so the replay tests pin ``--threads 1``.

Preemption: SIGTERM or SIGUSR1 (SLURM, Kubernetes, torchrun's shutdown) ends the run after the
step in progress with a checkpoint of it, and the exit code 128 + the signal; ``--resume auto``
continues it (``mvit.training.signals``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import mvit_kernels

from .cli import finite_float
from .training import checkpoint as ckpt
from .training import distributed as dist_utils
from .training.ema import ModelEMA
from .training.logs import JsonLog, plot_curves, read_jsonl, truncate_after as truncate_log_after
from .training.mixup import MixupCutmix, soft_target_cross_entropy
from .data.video import ORIENTATIONS, TEMPORAL_SAMPLING
from .training.optim import OPTIMIZERS, WarmupCosine, build_optimizer
from .training.signals import StopSignals, close_batches, dataloader_worker_init

# The papers' Kinetics recipe (MViT paper A.1 / MViTv2 paper, pySlowFast's MVIT_B_16x4_CONV and
# MVITv2_S_16x4 configs): AUG.AA_TYPE rand-m7-n4-mstd0.5-inc1, random resized crops of 8-100% of
# the area (DATA.TRAIN_JITTER_SCALES_RELATIVE), two augmented copies of each clip (AUG.NUM_SAMPLE),
# weight decay on the position tables and class token too (MVIT.ZERO_DECAY_POS_CLS False). The LRs
# are per 512 clips, scaled linearly as pySlowFast scales them with the machines (BASE_LR,
# WARMUP_START_LR and COSINE_END_LR 1e-4, 1e-6, 1e-6 per 32 clips: 16 videos x 2 copies).
PAPER_RECIPE = dict(
    epochs=200, warmup_epochs=30.0, batch_size=64, base_lr=1.6e-3, min_lr=1.6e-5, warmup_start_lr=1.6e-5,
    weight_decay=0.05,
    label_smoothing=0.1, mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5,
    rand_augment="rand-m7-n4-mstd0.5-inc1", random_erasing=0.25, repeated_aug=2, clip_grad=1.0, drop_path=None,
    flip=True, eval_every=5, crop_scale=(0.08, 1.0), zero_decay_pos_cls=False, optimizer="adamw",
    temporal_sampling="stride", inverse_uniform_jitter=False,
)

# facebookresearch/mvit's ImageNet recipe (its config defaults and configs/MVITv2_{T,S,B}.yaml):
# 300 epochs, 70 of warmup, AdamW at 2.5e-4 per 256 images (from 1e-8, down to 1e-6), RandAugment
# rand-m9-n6-mstd0.5-inc1,
# one copy of each image (AUG.NUM_SAMPLE 1); the rest as for videos.
IMAGE_RECIPE = dict(
    PAPER_RECIPE, epochs=300, warmup_epochs=70.0, base_lr=5e-4, min_lr=2e-6, warmup_start_lr=2e-8,
    rand_augment="rand-m9-n6-mstd0.5-inc1", repeated_aug=1,
)

# pySlowFast's Something-Something v2 configs (SSv2/MVITv2_S_16x4.yaml; MVITv2_B_32x3 differs only
# in its LR, 0.0015 per 16 clips: PRESET_RECIPE): one frame from each of T segments of the video,
# no flips (the labels name directions), a short-side jitter drawn inverse-uniformly and a random
# crop, SGD with Nesterov momentum at 0.0025 per 16 clips (from 1e-4, down to 1e-6), weight decay
# 1e-4, 100 epochs, 3 of
# warmup, stochastic depth 0.4, one copy per clip, no gradient clipping (no CLIP_GRAD_L2NORM);
# tested on 1 clip x 3 crops. The papers fine-tune from Kinetics weights (--finetune).
SSV2_RECIPE = dict(
    PAPER_RECIPE, epochs=100, warmup_epochs=3.0, base_lr=0.08, min_lr=3.2e-5, warmup_start_lr=3.2e-3,
    weight_decay=1e-4, optimizer="sgd", repeated_aug=1,
    flip=False, crop_scale=None, inverse_uniform_jitter=True, temporal_sampling="segments", drop_path=0.4,
    eval_every=2, clip_grad=0.0,
)

#: Where a preset's own config for a recipe sets other values (LRs per 512 clips; pySlowFast's per
#: its batch: 16 clips for B, 8 for L). MViTv2-L on SSv2 (SSv2/MVITv2_L_40x3.yaml): 40 epochs,
#: warmup from and cosine to 1e-6 per 8, clipping at 2.0, no mixup or cutmix (MIXUP.PROB 0), its own
#: stochastic depth of 0.75. (Its Kinetics training config is not published.)
PRESET_RECIPE = {
    ("ssv2", "mvitv2_b_32x3"): dict(base_lr=0.0015 * 512 / 16),
    ("ssv2", "mvitv2_l_40x3"): dict(epochs=40, warmup_start_lr=1e-6 * 512 / 8, min_lr=1e-6 * 512 / 8, clip_grad=2.0,
                                    mixup_prob=0.0, drop_path=0.75),
}

#: --recipe choices; without it, image runs take "imagenet" and video runs "kinetics".
RECIPES = {"kinetics": PAPER_RECIPE, "imagenet": IMAGE_RECIPE, "ssv2": SSV2_RECIPE}

# The built-in synthetic task: small, fast, and motion direction must survive augmentation (no
# flips, no RandAugment geometry, no mixing that blends two directions into one clip).
SYNTHETIC_RECIPE = dict(
    epochs=4, warmup_epochs=1.0, batch_size=64, base_lr=8e-3, min_lr=8e-5, warmup_start_lr=8e-6, weight_decay=0.05,
    label_smoothing=0.1, mixup=0.0, cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5,
    rand_augment="none", random_erasing=0.0, repeated_aug=1, clip_grad=1.0, drop_path=None,
    flip=False, eval_every=1, zero_decay_pos_cls=True,  # as its seeds were measured (README)
    optimizer="adamw",
)
SYNTHETIC_TRAIN_LENGTH = 8192
SYNTHETIC_VAL_LENGTH = 1024


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (no data arguments: the built-in synthetic motion task)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data (none given: built-in synthetic task)")
    d.add_argument("--train-csv", help="pySlowFast list: one 'path label' per line")
    d.add_argument("--val-csv", help="pySlowFast list for validation")
    d.add_argument("--data-root", help="class folders: ROOT/train/<class>/<video>, ROOT/val/... "
                   "(also the prefix of relative paths in CSV files)")
    d.add_argument("--image-folders", action="store_true",
                   help="DATA_ROOT holds images (ImageNet layout) for an image preset")
    d.add_argument("--multi-label", action="store_true",
                   help="labels are comma-separated class ids (Charades): BCE loss, mAP")
    d.add_argument("--num-classes", type=int, help="default: from the data")
    d.add_argument("--num-frames", type=int, help="frames per clip T (default: the preset's)")
    d.add_argument("--sampling-rate", type=int,
                   help="tau: frames between samples (default: the preset's, 4 for 16x4 and 3 for 32x3 / 40x3)")
    d.add_argument("--target-fps", type=finite_float, help="frame rate tau is counted at (default 30)")
    d.add_argument("--crop-size", type=int, help="default: the preset's")
    d.add_argument("--temporal-sampling", choices=TEMPORAL_SAMPLING,
                   help="videos: 'stride' (T frames every --sampling-rate frames; Kinetics) or 'segments' (one "
                        "frame from each of T segments of the video; Something-Something)")
    d.add_argument("--orientation", choices=ORIENTATIONS,
                   help="videos and images stored sideways that ask to be shown turned (a phone's display matrix, "
                        "EXIF): 'stored' reads their pixels as stored, as the reference pipelines do (default); "
                        "'display' as players show them")
    d.add_argument("--inverse-uniform-jitter", action=argparse.BooleanOptionalAction, default=None,
                   help="with --jitter-scales: draw the short side as 1 / uniform(1 / MAX, 1 / MIN) (pySlowFast's "
                        "INV_UNIFORM_SAMPLE)")
    d.add_argument("--crop-scale", type=finite_float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random resized crop: fractions of the area (default 0.08 1.0, the papers')")
    d.add_argument("--jitter-scales", type=int, nargs=2, default=None,
                   help="videos: a random short-side scale in this range and a random crop instead of the "
                        "random resized crop (pySlowFast's other models; 256 320 at 224 crops is its default)")
    d.add_argument("--test-clips", type=int, help="temporal views at validation (default 1)")
    d.add_argument("--test-crops", type=int, choices=(1, 3), help="spatial views at validation (default 1)")
    d.add_argument("--synthetic-size", type=int, nargs=2, metavar=("TRAIN", "VAL"),
                   help=f"clips per epoch and validation clips of the synthetic task (default "
                        f"{SYNTHETIC_TRAIN_LENGTH} {SYNTHETIC_VAL_LENGTH}; VAL 0: no validation)")
    d.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 4, or the CPUs per rank where fewer; 0 synthetic)")

    m = p.add_argument_group("model")
    m.add_argument("--preset", default="mvit_tiny")
    m.add_argument("--drop-path", type=finite_float, help="stochastic depth rate (default: the preset's)")
    m.add_argument("--finetune", help="initialize from this checkpoint (mvit train's, or its run folder's newest; "
                   "pySlowFast's, torchvision's, pytorchvideo's or timm's, .safetensors included); "
                   "position tables are interpolated to the input size, a head of another size is re-made")
    m.add_argument("--layer-decay", type=finite_float, default=1.0, help="layer-wise LR decay (1 = off)")
    m.add_argument("--fused", action="store_true", help="use the fused kernels (needs the built extension)")
    m.add_argument("--compile", action="store_true", help="torch.compile the model")
    m.add_argument("--checkpoint-activations", action="store_true", help="recompute blocks in backward")

    o = p.add_argument_group("optimization (defaults: the papers' recipe; synthetic: SYNTHETIC_RECIPE)")
    o.add_argument("--recipe", choices=sorted(RECIPES),
                   help="the defaults of every option below and of the augmentations: pySlowFast's Kinetics or "
                        "Something-Something v2 configs, facebookresearch/mvit's ImageNet ones (default: imagenet "
                        "for image runs, else kinetics)")
    o.add_argument("--optimizer", choices=OPTIMIZERS)
    o.add_argument("--epochs", type=int)
    o.add_argument("--warmup-epochs", type=finite_float)
    o.add_argument("--batch-size", type=int, help="global clips per optimizer step (all ranks, all micro-batches)")
    o.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-batches")
    o.add_argument("--base-lr", type=finite_float, help="LR for a global batch of 512 (scaled linearly)")
    o.add_argument("--min-lr", type=finite_float, help="the cosine's last LR, per 512 as --base-lr")
    o.add_argument("--warmup-start-lr", type=finite_float, help="the warmup's first LR, per 512 as --base-lr")
    o.add_argument("--weight-decay", type=finite_float)
    o.add_argument("--zero-decay-pos-cls", action=argparse.BooleanOptionalAction, default=None,
                   help="exempt position tables and the class token from weight decay (pySlowFast's "
                        "MVIT.ZERO_DECAY_POS_CLS; the papers' configs: no)")
    o.add_argument("--label-smoothing", type=finite_float)
    o.add_argument("--mixup", type=finite_float, help="mixup alpha (0 = off)")
    o.add_argument("--cutmix", type=finite_float, help="cutmix alpha (0 = off)")
    o.add_argument("--mixup-prob", type=finite_float)
    o.add_argument("--mixup-switch-prob", type=finite_float)
    o.add_argument("--rand-augment", help="timm's form, e.g. 'rand-m7-n4-mstd0.5-inc1' (magnitude of 10, ops, "
                   "magnitude noise, increasing ops), or 'none'")
    o.add_argument("--random-erasing", type=finite_float, help="probability (0 = off)")
    o.add_argument("--repeated-aug", type=int, help="repeated augmentation copies (1 = off)")
    o.add_argument("--clip-grad", type=finite_float, help="max gradient L2 norm (0 = off)")
    o.add_argument("--no-flip", dest="flip", action="store_const", const=False, default=None)
    o.add_argument("--ema-decay", type=finite_float, default=0.0,
                   help="EMA of weights, in [0, 1): each step moves it 1 - decay of the way (0 = off), e.g. 0.9999")
    o.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast dtype (auto: bf16 on GPU, fp32 on CPU); fp16 uses a GradScaler")
    o.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("run")
    r.add_argument("--output-dir", help="default: runs/<preset>[_synthetic]")
    r.add_argument("--resume", help="a checkpoint path, or 'auto' (latest valid one in the output dir)")
    r.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps (0: per epoch)")
    r.add_argument("--keep-ckpts", type=int, default=3, help="checkpoints kept, newest first (0: all)")
    r.add_argument("--eval-every", type=int, help="validate every N epochs (and after the last)")
    r.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0 = no limit)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda (cuda:N single-process)")
    r.add_argument("--threads", type=int, help="torch CPU threads per rank (default: torch's)")
    r.add_argument("--dist-timeout", type=finite_float, default=600.0, help="seconds before a collective fails")
    r.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def resolve_recipe(args: argparse.Namespace) -> dict:
    """Flags given explicitly win; the rest come from the synthetic or the paper recipe."""
    synthetic = not (args.train_csv or args.data_root)
    name = getattr(args, "recipe", None) or ("imagenet" if _image_task(args) else "kinetics")
    base = SYNTHETIC_RECIPE if synthetic else dict(RECIPES[name], **PRESET_RECIPE.get((name, args.preset), {}))
    recipe = {k: (getattr(args, k, None) if getattr(args, k, None) is not None else v) for k, v in base.items()}
    recipe["synthetic"] = synthetic
    if getattr(args, "jitter_scales", None) is not None:
        if getattr(args, "crop_scale", None) is not None:
            raise ValueError("--jitter-scales and --crop-scale choose between two ways of cropping: give one")
        recipe["crop_scale"] = None  # the short-side jitter and random crop instead
    return recipe


def _image_task(args: argparse.Namespace) -> bool:
    """Images (--image-folders or an image preset); an unknown preset is a ValueError naming it."""
    from .presets import get_preset

    return bool(args.image_folders or get_preset(args.preset).patch_2d)


# Data options only some tasks read, and their defaults. They default to None in the parser, so
# that an option given to a task that does not read it is an error rather than silently unused.
# (--sampling-rate defaults to the preset's: MViTConfig.sampling_rate.)
DATA_DEFAULTS = dict(target_fps=30.0, test_clips=1, test_crops=1,
                     synthetic_size=(SYNTHETIC_TRAIN_LENGTH, SYNTHETIC_VAL_LENGTH))


def _unused_options(args: argparse.Namespace, recipe: dict, image: bool) -> list[str]:
    """The options given that this task would not use (or use differently from what they say)."""
    from .data.synthetic import SyntheticMotion
    from .data.rand_augment import parse as parse_rand_augment

    video_only = {
        "--sampling-rate": args.sampling_rate is not None,
        "--target-fps": args.target_fps is not None,
        "--jitter-scales": args.jitter_scales is not None,
        "--test-clips": args.test_clips not in (None, 1),
        "--test-crops": args.test_crops not in (None, 1),
        "--temporal-sampling": args.temporal_sampling is not None,
        "--inverse-uniform-jitter": args.inverse_uniform_jitter is not None,
    }
    if recipe["synthetic"]:
        # the synthetic task renders clips at the model's size, one view each, without augmentation
        given = video_only | {
            "--image-folders": args.image_folders,
            "--multi-label": args.multi_label,
            "--num-classes": args.num_classes not in (None, SyntheticMotion.num_classes),
            "--rand-augment": parse_rand_augment(recipe["rand_augment"]) is not None,
            "--random-erasing": recipe["random_erasing"] > 0,
            "--crop-scale": args.crop_scale is not None,
            "--recipe": args.recipe is not None,
            "--orientation": args.orientation is not None,
        }
    elif image:  # one frame, one centre crop per image
        given = video_only | {"--num-frames": args.num_frames not in (None, 1),
                              "--synthetic-size": args.synthetic_size is not None}
    else:
        segments = recipe.get("temporal_sampling") == "segments"  # the frames span the whole video
        given = {"--synthetic-size": args.synthetic_size is not None,
                 "--sampling-rate": segments and args.sampling_rate is not None,
                 "--target-fps": segments and args.target_fps is not None,
                 "--inverse-uniform-jitter": recipe.get("crop_scale") is not None and args.inverse_uniform_jitter}
    # how often and which of mixup / cutmix: nothing to choose between with both off
    no_mixing = recipe["mixup"] == 0 and recipe["cutmix"] == 0
    given |= {"--mixup-prob": no_mixing and args.mixup_prob is not None,
              "--mixup-switch-prob": no_mixing and args.mixup_switch_prob is not None}
    return [name for name, used in given.items() if used]


def check_options_used(args: argparse.Namespace, recipe: dict) -> None:
    """Raise ValueError for options the task would ignore: a run must not differ silently from
    what its command line says."""
    image = _image_task(args)
    if recipe["synthetic"] and args.val_csv:
        raise ValueError("--val-csv needs the training data too (--train-csv or --data-root); without them "
                         "the built-in synthetic task runs, with its own validation clips")
    unused = _unused_options(args, recipe, image)
    if unused:
        task = ("the built-in synthetic task (no --train-csv or --data-root)" if recipe["synthetic"] else
                "an image run" if image else "a video run")
        raise ValueError(f"{task} does not use {', '.join(unused)}: leave "
                         f"{'it' if len(unused) == 1 else 'them'} out")
    for name, value in DATA_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.sampling_rate is None:
        from .presets import get_preset

        # the synthetic clips are consecutive frames; what the run's args record, eval and predict read
        args.sampling_rate = 1 if recipe["synthetic"] else get_preset(args.preset).sampling_rate


def check_values(args: argparse.Namespace, recipe: dict) -> None:
    """Raise ValueError, naming the option, for values no run can use. Checked before anything is
    built: out of range, they made runs that did nothing (--epochs 0) or failed late (--eval-every 0
    after the first epoch)."""
    r = recipe

    def opt(name):  # the value as the run will use it
        return r[name] if name in r else getattr(args, name)

    def at_least(name, lo):
        v = opt(name)
        return v is None or v >= lo, f"--{name.replace('_', '-')} must be >= {lo}, got {v}"

    def within(name, lo, hi, hi_open=False):
        v = opt(name)
        ok = v is None or (lo <= v < hi if hi_open else lo <= v <= hi)
        return ok, f"--{name.replace('_', '-')} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {v}"

    def above(name, lo):
        v = opt(name)
        return v is None or v > lo, f"--{name.replace('_', '-')} must be > {lo}, got {v}"

    checks = [
        at_least("epochs", 1), at_least("warmup_epochs", 0), at_least("batch_size", 1), at_least("accum_steps", 1),
        above("base_lr", 0), at_least("min_lr", 0), at_least("warmup_start_lr", 0), at_least("weight_decay", 0),
        within("label_smoothing", 0, 1, True),
        at_least("mixup", 0), at_least("cutmix", 0), within("mixup_prob", 0, 1), within("mixup_switch_prob", 0, 1),
        within("random_erasing", 0, 1), at_least("repeated_aug", 1), at_least("clip_grad", 0),
        within("drop_path", 0, 1, True), within("ema_decay", 0, 1, True), at_least("eval_every", 1),
        at_least("max_steps", 0), at_least("ckpt_every", 0), at_least("keep_ckpts", 0), at_least("threads", 1),
        at_least("workers", 0), above("dist_timeout", 0), at_least("num_classes", 1), at_least("num_frames", 1),
        at_least("crop_size", 1), at_least("sampling_rate", 1), above("target_fps", 0), at_least("test_clips", 1),
        within("seed", 0, 2**32 - 1),  # numpy's and the samplers' seeds are derived from it
    ]
    if not 0 < args.layer_decay <= 1:
        checks.append((False, f"--layer-decay must be in (0, 1], got {args.layer_decay}"))
    if args.synthetic_size is not None and (args.synthetic_size[0] < 1 or args.synthetic_size[1] < 0):
        n_train, n_val = args.synthetic_size
        checks.append((False, f"--synthetic-size needs TRAIN >= 1 and VAL >= 0 clips, got {n_train} {n_val}"))
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    epoch_pos: int = 0  # samples of the current epoch this rank has consumed
    wall_before: float = 0.0  # seconds the run's earlier processes took (resumed from a checkpoint)


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step) & 0x7FFF_FFFF_FFFF


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), precision


def run(args: argparse.Namespace) -> int:
    result = dist_utils.run_guarded(lambda: train(args))
    # stopped by a signal: the shell's code for "killed by it", so job scripts see the run unfinished
    return 128 + result["stopped"] if "stopped" in result else 0


def train(args: argparse.Namespace) -> dict:
    with contextlib.ExitStack() as held:  # the output folder's lock, for as long as the run
        return _train(args, held)


def _train(args: argparse.Namespace, held: contextlib.ExitStack) -> dict:
    from .data import build_datasets
    from .evaluate import evaluate
    from .presets import get_preset
    from . import build_model

    t_start = time.time()
    recipe = resolve_recipe(args)
    check_values(args, recipe)
    check_options_used(args, recipe)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = dist_utils.init(args.device, args.dist_timeout)
    micro, rem = divmod(recipe["batch_size"], info.world_size * args.accum_steps)
    if rem or micro < 1:
        raise ValueError(
            f"--batch-size {recipe['batch_size']} is not divisible by world size {info.world_size} x "
            f"--accum-steps {args.accum_steps}")
    mixing = recipe["mixup_prob"] > 0 and (recipe["mixup"] > 0 or recipe["cutmix"] > 0)
    if mixing and micro == 1:
        # mixup/cutmix pair each clip with another of its micro-batch (the batch reversed): with
        # one clip it would be paired with itself and the run would train without mixing
        raise ValueError(
            f"mixup/cutmix mix the clips of a micro-batch, and --batch-size {recipe['batch_size']} / world size "
            f"{info.world_size} / --accum-steps {args.accum_steps} leaves 1 clip per micro-batch: give "
            "--mixup 0 --cutmix 0, or a larger --batch-size (or fewer --accum-steps)")

    out_dir = args.output_dir or os.path.join("runs", args.preset + ("_synthetic" if recipe["synthetic"] else ""))
    ckpt.check_output_dir(out_dir)
    existing = ckpt.list_checkpoints(out_dir)
    if existing and not args.resume:
        # Pruning keeps the highest steps and eval / --resume auto take the newest: the two runs'
        # checkpoints would mix, and this run's could be the ones deleted.
        raise ValueError(f"--output-dir {out_dir} already holds checkpoints of a run ({os.path.basename(existing[0])}"
                         f"{', ...' if len(existing) > 1 else ''}): give --resume auto to continue that run, or "
                         "another --output-dir")

    data = build_datasets(args, recipe)
    overrides = {"num_classes": data.num_classes}
    if data.input_size is not None:
        overrides["input_size"] = data.input_size
    if data.sampling_rate is not None:  # the model records what its clips were sampled at
        overrides["sampling_rate"] = data.sampling_rate
    if recipe["drop_path"] is not None:
        overrides["drop_path_rate"] = recipe["drop_path"]
    # The initial weights come from the global RNG, which torch seeds differently in every
    # process: without this, --seed fixed the data but not the starting point. Same seed on every
    # rank, so the replicas also start equal before DDP's broadcast.
    finetune = None
    if args.finetune:  # a file, or a run folder (its newest checkpoint) as eval and predict take
        args.finetune, finetune = ckpt.load_file_or_run(args.finetune, "--finetune", required=())
    if finetune is not None:
        semantics = _finetune_semantics(finetune, get_preset(args.preset).replace(**overrides))
        if semantics and info.is_main:
            print(f"--finetune {args.finetune}: its model computed with {semantics}; so does this one",
                  file=sys.stderr)
        overrides.update(semantics)
    torch.manual_seed(args.seed)
    model = build_model(args.preset, fused=args.fused, checkpoint_activations=args.checkpoint_activations,
                        **overrides)
    if finetune is not None:
        _load_finetune(model, args.finetune, info.is_main, raw=finetune)
    model.to(info.device)

    global_batch = recipe["batch_size"]
    lr = recipe["base_lr"] * global_batch / 512.0
    optimizer = build_optimizer(model, lr, recipe["weight_decay"], args.layer_decay,
                                zero_decay_pos_cls=recipe["zero_decay_pos_cls"], kind=recipe["optimizer"])
    from .data.samplers import TrainSampler

    sampler = TrainSampler(len(data.train), info.rank, info.world_size, recipe["repeated_aug"], args.seed)
    steps_per_epoch = len(sampler) // (micro * args.accum_steps)
    if steps_per_epoch < 1:
        raise ValueError(f"the training set ({len(data.train)} samples) is smaller than one batch per rank")
    total_steps = recipe["epochs"] * steps_per_epoch
    sched = WarmupCosine(lr, total_steps, int(recipe["warmup_epochs"] * steps_per_epoch),
                         start_lr=min(recipe["warmup_start_lr"] * global_batch / 512.0, lr),
                         end_lr=min(recipe["min_lr"] * global_batch / 512.0, lr))
    autocast, precision = _autocast(info.device, args.precision)
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")
    ema = ModelEMA(model, args.ema_decay) if args.ema_decay > 0 else None
    mix = MixupCutmix(data.num_classes, recipe["mixup"], recipe["cutmix"], recipe["mixup_prob"],
                      recipe["mixup_switch_prob"], recipe["label_smoothing"])

    state = TrainState()

    def run_seconds() -> float:  # the run's wall time over its processes (resumes)
        return state.wall_before + time.time() - t_start

    # Before the first write into the folder. Every rank learns whether rank 0 holds it: alone,
    # rank 0's error left the others to fail in their next collective with a gloo traceback.
    refused = None
    if info.is_main:
        try:
            held.enter_context(ckpt.hold_output_dir(out_dir))
        except ValueError as exc:
            refused = exc
    if dist_utils.any_rank(refused is not None, info.device):
        raise refused or ValueError(f"--output-dir {out_dir}: rank 0 could not hold it (see its error)")
    log = JsonLog(os.path.join(out_dir, "log.jsonl") if info.is_main else None)
    resumed = _maybe_resume(args, recipe, out_dir, model, optimizer, scaler, ema, state, info, steps_per_epoch)
    if info.is_main and not resumed and os.path.exists(os.path.join(out_dir, "log.jsonl")):
        os.unlink(os.path.join(out_dir, "log.jsonl"))
    elif info.is_main and resumed:
        truncate_log_after(os.path.join(out_dir, "log.jsonl"), state.step)

    net = model
    if args.compile:
        net = torch.compile(net)
    if info.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if info.is_main:
        log.write(kind="config", preset=args.preset, world_size=info.world_size, micro_batch=micro,
                  accum_steps=args.accum_steps, global_batch=global_batch, lr=lr, steps_per_epoch=steps_per_epoch,
                  precision=precision, **{k: v for k, v in recipe.items()})

    def save(tag_epoch: int) -> None:
        rngs = dist_utils.all_gather_object(_rng_state())
        if info.is_main:
            obj = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema else None,
                "epoch": state.epoch, "step": state.step, "sampler": {"epoch": state.epoch, "position": state.epoch_pos},
                "rng": rngs, "world_size": info.world_size, "preset": args.preset,
                "steps_per_epoch": steps_per_epoch,
                "wall_s": run_seconds(),
                "num_classes": data.num_classes, "model_config": model.cfg, "classes": data.classes,
                "args": vars(args) | {"func": None}, "recipe": recipe,
            }
            ckpt.atomic_save(obj, os.path.join(out_dir, ckpt.checkpoint_name(tag_epoch, state.step)))
            ckpt.prune(out_dir, args.keep_ckpts)
        dist_utils.barrier()

    multi_label = data.multi_label
    max_steps = args.max_steps or total_steps
    last_metrics: dict = {}
    show = info.is_main and not args.no_progress
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    # SIGTERM / SIGUSR1 stop the run after the step in progress, with a checkpoint (signals.py);
    # the handlers stay until the run returns, so a signal in its last evaluations stops it too
    stop = held.enter_context(StopSignals())
    stopping = saved_at = None

    def stop_requested() -> bool:  # evaluations end early on it (every rank then returns None)
        return stop.requested

    unit = "images" if _image_task(args) else "videos"  # what the scores count, for the lines printed

    def validate() -> Optional[dict]:
        """The epoch-end evaluation, logged; None when a stop signal ended it."""
        # An unreadable validation video is left out and listed (log, result.json, the line
        # below), not an error: it would end the run here.
        metrics = evaluate(ema.module if ema else model, data.val, info, batch_size=max(1, micro),
                           workers=data.workers, multi_label=multi_label, autocast=autocast,
                           skip_unreadable=True, stop=stop_requested)
        if metrics is not None and info.is_main:
            log.write(kind="val", epoch=state.epoch, step=state.step, time=round(run_seconds(), 2),
                      ema=ema is not None, **metrics)
            # a run ended by --max-steps within an epoch is scored part way through it
            at = f"epoch {state.epoch}" if not state.epoch_pos else f"step {state.step} (in epoch {state.epoch + 1})"
            print(f"{at}: " + _fmt(metrics, unit), file=sys.stderr, flush=True)
        return metrics

    # Resumed from an epoch's checkpoint whose evaluation a stop cut short (or never started):
    # that evaluation comes first, on the same weights, so every epoch keeps its scores.
    if resumed and data.val is not None and dist_utils.any_rank(
            info.is_main and _evaluation_missed(os.path.join(out_dir, "log.jsonl"), state, recipe, max_steps),
            info.device):
        last_metrics = validate()
        stopping = last_metrics is None
        last_metrics = last_metrics or {}

    while not stopping and state.epoch < recipe["epochs"] and state.step < max_steps:
        model.train()
        sampler.set_epoch(state.epoch, state.epoch_pos)
        loader = torch.utils.data.DataLoader(
            data.train, batch_size=micro, sampler=sampler, num_workers=data.workers, drop_last=True,
            pin_memory=info.device.type == "cuda", persistent_workers=False,
            worker_init_fn=dataloader_worker_init)
        remaining = (len(sampler) // micro) // args.accum_steps
        bar = tqdm(total=remaining, desc=f"epoch {state.epoch + 1}/{recipe['epochs']}", leave=True,
                   dynamic_ncols=True, file=sys.stderr) if show and tqdm else None
        it = iter(loader)
        t_last, clips_since = time.time(), 0
        try:
            for _ in range(remaining):
                if state.step >= max_steps:
                    break
                torch.manual_seed(_step_seed(args.seed, info.rank, state.step))
                cur_lr = sched.apply(optimizer, state.step)
                loss_sum = 0.0
                for k in range(args.accum_steps):
                    x, y = next(it)
                    x = x.to(info.device, non_blocking=True)
                    y = y.to(info.device, non_blocking=True)
                    x, target, _, _ = mix(x, y)
                    sync = k == args.accum_steps - 1 or not info.distributed
                    ctx = contextlib.nullcontext() if sync else net.no_sync()
                    with ctx:
                        with autocast():
                            logits = net(x)
                        if multi_label:
                            loss = F.binary_cross_entropy_with_logits(logits.float(), target)
                        else:
                            loss = soft_target_cross_entropy(logits, target)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"loss is {loss.item()} at step {state.step}")
                        scaler.scale(loss / args.accum_steps).backward()
                    loss_sum += loss.item() / args.accum_steps
                if info.distributed:
                    # the logged loss is the whole global batch's, as in one process (rank 0's own was
                    # the loss of 1 / world size of it). A stop signal rides along: the ranks that got
                    # it at different steps stop after the same one.
                    reduced = torch.tensor([loss_sum, float(stop.requested)], dtype=torch.float64, device=info.device)
                    loss_sum, stops = dist_utils.all_reduce_sum(reduced).tolist()
                    loss_sum /= info.world_size
                    stopping = stops > 0
                else:
                    stopping = stop.requested
                if recipe["clip_grad"] > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["clip_grad"])
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema:
                    ema.update(model)
                state.step += 1
                state.epoch_pos += micro * args.accum_steps
                clips_since += global_batch
                if info.is_main:
                    log.write(kind="train", epoch=state.epoch, step=state.step, loss=loss_sum, lr=cur_lr,
                              time=round(run_seconds(), 2))
                if bar:
                    now = time.time()
                    bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{cur_lr:.2e}",
                                    clips_s=f"{clips_since / max(now - t_last, 1e-9):.0f}")
                    if now - t_last > 5:
                        t_last, clips_since = now, 0
                    bar.update(1)
                if args.ckpt_every and state.step % args.ckpt_every == 0:
                    save(state.epoch)
                    saved_at = state.step
                if stopping:
                    break
        finally:
            close_batches(it)
        if bar:
            bar.close()
        del it, loader
        # done when no full step is left: a position that is no multiple of a step must end the
        # epoch too, not start it again and again with nothing to train
        epoch_done = sampler.per_rank - state.epoch_pos < micro * args.accum_steps
        if epoch_done:
            state.epoch += 1
            state.epoch_pos = 0
        if stopping:
            if saved_at != state.step:
                save(state.epoch)
            break
        # The checkpoint comes before the evaluation, which can take minutes: a stop signal or a
        # failure during it loses that evaluation, not the epoch.
        save(state.epoch)
        stopping = dist_utils.any_rank(stop.requested, info.device)
        if stopping:
            break
        finished = state.epoch >= recipe["epochs"] or state.step >= max_steps
        if data.val is not None and (finished or (epoch_done and _evaluated_after(state.epoch, recipe))):
            last_metrics = validate()
            if last_metrics is None:  # a stop signal ended it; the checkpoint above holds the run
                stopping, last_metrics = True, {}
                break

    if not stopping and data.val is not None and not last_metrics:
        # Resumed at the end of its run (or past a shortened --epochs / --max-steps): nothing was
        # trained, so evaluate the checkpoint rather than report no metrics.
        if info.is_main:
            print(f"nothing left to train (epoch {state.epoch} of {recipe['epochs']}, step {state.step}): "
                  "evaluating the checkpoint", file=sys.stderr, flush=True)
        last_metrics = evaluate(ema.module if ema else model, data.val, info, batch_size=max(1, micro),
                                workers=data.workers, multi_label=multi_label, autocast=autocast,
                                skip_unreadable=True, stop=stop_requested)
        stopping = last_metrics is None
    # with --ema-decay the EMA weights are validated, and `mvit eval` scores them with --ema only
    result = {"val": last_metrics, "ema": ema is not None, "steps": state.step, "epochs": state.epoch}
    if not stopping and recipe["synthetic"] and data.val is not None:
        shuffled = evaluate(ema.module if ema else model, data.val, info, batch_size=max(1, micro),
                            workers=data.workers, multi_label=False, autocast=autocast, shuffle_frames=True,
                            stop=stop_requested)
        stopping = shuffled is None
        result["val_shuffled_frames"] = shuffled

    if stopping:
        # every rank exits with the same code, that of a signal one of them got (the ranks that
        # got none stop with the others)
        signum = max(dist_utils.all_gather_object(stop.signum or 0)) or int(signal.SIGTERM)
        name = ckpt.checkpoint_name(state.epoch, state.step)
        if info.is_main:
            log.write(kind="stop", signal=stop.name, epoch=state.epoch, step=state.step,
                      time=round(run_seconds(), 2))
            print(f"stopped by a signal{' (' + stop.name + ')' if stop.name else ' on another rank'} after step "
                  f"{state.step}: {os.path.join(out_dir, name)} holds the run; continue it with --resume auto",
                  file=sys.stderr, flush=True)
        dist_utils.cleanup()
        return {"stopped": signum, "steps": state.step, "epochs": state.epoch}

    # the whole run's, over resumes (a finished run resumed to evaluate it again kept only the
    # evaluation's seconds)
    result["wall_s"] = round(run_seconds(), 1)
    if mvit_kernels.tuning.choices():  # fused ops timed against their alternatives (CUDA by default)
        result["kernel_choices"] = mvit_kernels.tuning.summary()
    if info.is_main:
        log.write(kind="result", **result)
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f, indent=2)
        try:
            plot_curves(os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "curves.png"))
        except Exception as exc:  # a plot must never fail a finished run
            print(f"warning: could not plot curves: {exc}", file=sys.stderr)
        line = f"done: {state.epoch} epochs, {state.step} steps, {result['wall_s']:.0f} s"
        if last_metrics:
            line += "; validation " + ("of the EMA weights " if ema else "") + _fmt(last_metrics, unit)
        if "val_shuffled_frames" in result:
            line += "; with frames shuffled " + _fmt(result["val_shuffled_frames"])
        print(line)
        print(f"checkpoints, log.jsonl, curves.png, result.json in {out_dir}")
    dist_utils.cleanup()
    return result


def _evaluated_after(epoch: int, recipe: dict) -> bool:
    """Whether the run evaluates at the end of epoch ``epoch`` (counted from 1) before its last."""
    return epoch % recipe["eval_every"] == 0


def _evaluation_missed(log_path: str, state: TrainState, recipe: dict, max_steps: int) -> bool:
    """Whether a run resumed at ``state`` owes the evaluation of the epoch that just ended: its
    checkpoint is an epoch's end (written before the evaluation), one was due there, and the log
    has no scores for that step. A finished run is evaluated at its end anyway."""
    if state.epoch_pos or not state.epoch or state.epoch >= recipe["epochs"] or state.step >= max_steps:
        return False
    if not _evaluated_after(state.epoch, recipe):
        return False
    records = read_jsonl(log_path) if os.path.exists(log_path) else []
    return not any(r.get("kind") == "val" and r.get("step") == state.step for r in records)


def _fmt(metrics: dict, unit: str = "videos") -> str:
    """One line of scores; ``unit``: what was scored ("videos" or "images"; the metrics' key is
    "videos" for both)."""
    left_out = f"; {len(metrics['unreadable'])} unreadable left out" if metrics.get("unreadable") else ""
    scored = f"({metrics['videos']} {unit}{left_out})"
    if "mAP" in metrics:
        return f"mAP {metrics['mAP']:.2f} {scored}"
    return f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% {scored}"


#: Config fields that change what given weights compute, and that a checkpoint's layout can say.
SEMANTIC_FIELDS = ("pool_norm_eps", "residual_pooling_cls")


def _finetune_layout(weights: dict) -> str:
    """Whose key layout a --finetune state_dict has: "torchvision", "timm", "pytorchvideo" or
    "pyslowfast" (pySlowFast's and facebookresearch/mvit's, and this project's own)."""
    if "conv_proj.weight" in weights or any(k.startswith("pos_encoding.") for k in weights):
        return "torchvision"
    if any(k.startswith("stages.") for k in weights):
        return "timm"
    if "patch_embed.patch_model.weight" in weights:
        return "pytorchvideo"
    return "pyslowfast"


def _finetune_semantics(raw: dict, cfg) -> dict:
    """The config fields of :data:`SEMANTIC_FIELDS` under which the --finetune checkpoint's model
    computed, where its layout says so without doubt, and where they differ from ``cfg``'s (the
    model about to be built): a `mvit train` checkpoint's stored config; pytorchvideo's pooling
    norms (eps 1e-5); timm's class-token models (q added to the class row too). pySlowFast's and
    facebookresearch/mvit's share one layout but not the class row's rule: those keep ``cfg``'s."""
    from .config import MViTConfig
    from .convert import PYTORCHVIDEO_POOL_NORM_EPS, _unwrap

    saved = raw.get("model_config")
    weights = _unwrap(raw)
    layout = _finetune_layout(weights)
    if isinstance(saved, MViTConfig):
        wanted = {f: getattr(saved, f) for f in SEMANTIC_FIELDS}
    elif layout == "pytorchvideo":
        wanted = {"pool_norm_eps": PYTORCHVIDEO_POOL_NORM_EPS}
    elif layout == "timm":
        wanted = {"residual_pooling_cls": "cls_token" in weights}
    else:
        wanted = {}
    if wanted.get("residual_pooling_cls") and not (cfg.residual_pooling and cfg.cls_embed):
        del wanted["residual_pooling_cls"]  # no class row takes the connection in this model
    return {k: v for k, v in wanted.items() if getattr(cfg, k) != v}


def _load_finetune(model, path: str, verbose: bool, raw: Optional[dict] = None) -> None:
    """Initialize ``model`` from a checkpoint: this project's, a pySlowFast / facebookresearch/mvit
    one (``model_state`` nesting, ``module.`` prefixes, ``norm_q`` and separate q/k/v names), a
    torchvision, pytorchvideo or timm state_dict (timm's ``.safetensors`` files too). Position
    embeddings and rel-pos tables of another input size are interpolated as the model does for
    inputs of another size, an image model's convolutions inflated over time into a video model;
    tensors that still do not fit (a head of another size) keep their fresh initialization and are
    listed. ``raw``: the checkpoint, when the caller has read it already."""
    # _unwrap: the same unwrapping as from_pretrained (model_state / model / state_dict, module.)
    from .convert import _unwrap, convert_pyslowfast, convert_pytorchvideo, convert_timm, convert_torchvision

    if raw is None:
        raw = ckpt.load_checked(path, "--finetune", required=())
    weights = _unwrap(raw)
    if not weights:
        raise ValueError(f"--finetune {path} holds no weights (no tensors, nor a 'model_state', 'model' or "
                         "'state_dict' of them)")
    layout = _finetune_layout(weights)
    if layout == "torchvision":
        weights = convert_torchvision(weights)
    elif layout == "timm":
        weights = convert_timm(weights, model.cfg)
    elif layout == "pytorchvideo":
        weights = convert_pytorchvideo(weights, model.cfg)
    else:  # pySlowFast's names; this project's own pass through unchanged
        weights = convert_pyslowfast(weights, model.cfg)
    saved_cfg = raw.get("model_config")
    interpolated = _fit_position_tables(weights, model, getattr(saved_cfg, "patch_grid", None))
    own = model.state_dict()
    inflated = _inflate_image_convs(weights, own)
    fitting = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        # e.g. a checkpoint of another architecture: "fine-tuning" it would train from scratch
        raise ValueError(f"--finetune {path}: none of its {len(weights)} tensors fits {model.cfg.name} (such as "
                         f"{', '.join(sorted(weights)[:3])}): is it a checkpoint of another model?")
    model.load_state_dict(fitting, strict=False)
    if verbose:
        fresh = sorted(set(own) - set(fitting))
        # what the model did not take: a head of another size, or (another architecture's
        # checkpoint, matched by name) whole blocks, which would otherwise go unmentioned
        unused = sorted(set(weights) - set(fitting))
        other = (f" (the checkpoint's model is {saved_cfg.name}, depth {saved_cfg.depth}; this one {model.cfg.name}, "
                 f"depth {model.cfg.depth}: tensors are matched by name)"
                 if getattr(saved_cfg, "depth", model.cfg.depth) != model.cfg.depth else "")
        print(f"fine-tuning from {path}: loaded {len(fitting)} of the model's {len(own)} tensors"
              + (f", interpolated {interpolated} to this input size" if interpolated else "")
              + (f", inflated {len(inflated)} image convolutions over time" if inflated else "")
              + f"; re-initialized {fresh}"
              + (f"; left unused {len(unused)} of the checkpoint's {len(weights)} tensors: "
                 f"{unused[:8]}{' ...' if len(unused) > 8 else ''}{other}" if unused else ""), file=sys.stderr)


def _inflate_image_convs(weights: dict, own: dict) -> list[str]:
    """An image model's convolutions in a video model (pySlowFast's TRAIN.CHECKPOINT_INFLATE, how
    MViTv2's Kinetics models start from ImageNet weights): a 2-D kernel, or a 3-D one of one
    frame, repeated over the video kernel's frames and divided by their number, so that a still
    clip gets the image's response away from the first and last frames. In ``weights``, in place;
    returns the names inflated."""
    inflated = []
    for name, w in list(weights.items()):
        target = own.get(name)
        if target is None or target.dim() != 5 or w.shape == target.shape or w.dim() not in (4, 5):
            continue
        w = w.unsqueeze(2) if w.dim() == 4 else w
        if w.shape[2] == 1 and w.shape[:2] == target.shape[:2] and w.shape[3:] == target.shape[3:]:
            frames = target.shape[2]
            weights[name] = w.repeat(1, 1, frames, 1, 1) / frames
            inflated.append(name)
    return inflated


def _fit_position_tables(weights: dict, model, source_grid) -> list[str]:
    """Resize, in ``weights``, the absolute position embeddings and rel-pos tables of another input
    size to ``model``'s, the way the model resizes them for an input of another size: the loaded
    model then computes what the checkpoint's model computed at this size. ``source_grid``: the
    checkpoint's token grid (T, H, W), when known; else the spatial grid is taken to be square
    (and a joint table's frames those of the model or of its preset).
    Returns the names of the tables resized."""
    import math

    from mvit_kernels.reference import interpolate_rel_pos

    from .model import _resize_grid  # the model's own resizing of position tables
    from .presets import get_preset

    own = model.state_dict()
    t, h, w = model.grid
    cls = int(model.cfg.cls_embed)

    def square(n: int, frames: int):
        side = math.isqrt(n // frames) if n % frames == 0 else 0
        return (frames, side, side) if side * side * frames == n else None

    def preset_frames() -> int:
        try:
            return get_preset(model.cfg.name).patch_grid[0]
        except ValueError:  # a model built from its own config
            return t

    resized = []
    for name, table in list(weights.items()):
        if name not in own or own[name].shape == table.shape or own[name].shape[-1] != table.shape[-1]:
            continue
        if name == "pos_embed_spatial":
            src = (1, *source_grid[1:]) if source_grid else square(table.shape[1], 1)
            new = _resize_grid(table, src, (1, h, w), "trilinear") if src else None
        elif name == "pos_embed_temporal":
            new = _resize_grid(table, (table.shape[1], 1, 1), (t, 1, 1), "trilinear")
        elif name == "pos_embed":
            # without the checkpoint's grid: the frames of this model, else of the preset's input
            n = table.shape[1] - cls
            src = source_grid or square(n, t) or square(n, preset_frames())
            new = (torch.cat((table[:, :cls], _resize_grid(table[:, cls:], src, (t, h, w), "trilinear")), dim=1)
                   if src and math.prod(src) == table.shape[1] - cls else None)
        elif name.rsplit(".", 1)[-1] in ("rel_pos_t", "rel_pos_h", "rel_pos_w"):
            new = interpolate_rel_pos(table, own[name].shape[0])
        else:
            continue
        if new is not None and new.shape == own[name].shape:
            weights[name] = new
            resized.append(name)
    return resized


def _maybe_resume(args, recipe: dict, out_dir: str, model, optimizer, scaler, ema, state: TrainState,
                  info, steps_per_epoch: int) -> bool:
    """Restore model, optimizer, EMA, position and RNGs from ``--resume``. The LR schedule is not
    restored: it is built from the current --epochs / --warmup-epochs / --base-lr / --min-lr, so a
    run can be extended; changed settings are listed. A change of model or batch size is refused."""
    if not args.resume:
        return False
    if args.resume == "auto":
        found = ckpt.latest_valid(out_dir, ckpt.TRAINING_KEYS)
        if found is None:
            if ckpt.list_checkpoints(out_dir):
                raise ValueError(f"--resume auto: no checkpoint in {out_dir} can be read (see the warnings above): "
                                 "move them away, or give another --output-dir")
            if info.is_main:
                print(f"--resume auto: no checkpoint in {out_dir}, starting fresh", file=sys.stderr)
            return False
        path, obj = found
        if info.is_main:
            # Newer files that do not load would still count among the --keep-ckpts newest, so
            # pruning would delete good ones in their place (and eval would skip them each time).
            for torn in ckpt.list_checkpoints(out_dir):
                if ckpt.step_of(torn) > obj["step"]:
                    os.replace(torn, torn + ".unreadable")
                    print(f"--resume auto: renamed the unreadable {os.path.basename(torn)} to "
                          f"{os.path.basename(torn)}.unreadable", file=sys.stderr)
    else:
        path, obj = args.resume, ckpt.load_checked(args.resume, "--resume")
        later = [p for p in ckpt.list_checkpoints(out_dir)
                 if ckpt.step_of(p) > obj["step"] and not os.path.samefile(p, path)]
        if later:
            # they would outrank this run's checkpoints in pruning, eval and --resume auto
            raise ValueError(f"--resume {path} is at step {obj['step']}, but --output-dir {out_dir} holds later "
                             f"checkpoints ({os.path.basename(later[0])}): resume the latest (--resume auto), move "
                             "them away, or give another --output-dir")
    changed = _check_same_run(path, obj, model, args, recipe, steps_per_epoch)
    if changed and info.is_main:
        print(f"resuming with changed settings, which apply from here on (the LR schedule follows them): "
              f"{', '.join(changed)}", file=sys.stderr)
    try:
        model.load_state_dict(obj["model"])
    except RuntimeError as exc:  # a checkpoint without model_config, of another model
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip())
        raise ValueError(f"--resume {path}: its weights do not fit this run's model ({detail[:300]}"
                         f"{' ...' if len(detail) > 300 else ''})") from None
    # The parameter groups' weight decay and LR scale follow the current arguments, like the schedule.
    current = [{k: g[k] for k in ("weight_decay", "lr_scale") if k in g} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(obj["optimizer"])
    except ValueError as exc:
        raise ValueError(f"--resume {path}: the optimizer state does not fit this run's parameter groups "
                         f"({exc})") from None
    for group, values in zip(optimizer.param_groups, current):
        group.update(values)
    if scaler.is_enabled() and obj.get("scaler"):
        scaler.load_state_dict(obj["scaler"])
    # else: a run that was not fp16 saved a disabled scaler's empty state ("The source state dict is
    # empty" when loaded); going to fp16 starts a fresh scaler, leaving it drops the old one (listed)
    if ema is not None:
        # without EMA weights in the checkpoint the average starts from the resumed weights (it was
        # copied from the initial ones when built)
        ema.load_state_dict(obj["ema"] if obj.get("ema") is not None else model.state_dict())
    state.epoch, state.step = obj["epoch"], obj["step"]
    state.wall_before = float(obj.get("wall_s", 0.0))
    # The position counts one rank's samples. Step k takes positions [k * batch, (k + 1) * batch)
    # of the epoch's list whatever the number of ranks (each rank its strided share), so the
    # checkpoint's ranks had consumed position * their number; resumed with another number of
    # processes, each rank skips its share of that (it skipped too few, or never ended the epoch).
    saved_world = obj.get("world_size") or info.world_size
    state.epoch_pos = obj["sampler"]["position"] * saved_world // info.world_size
    rngs = obj.get("rng") or []
    if obj.get("world_size") == info.world_size and info.rank < len(rngs):
        _set_rng_state(rngs[info.rank])
    if info.is_main:
        print(f"resumed from {path} (epoch {state.epoch}, step {state.step})", file=sys.stderr)
    return True


def _check_same_run(path: str, obj: dict, model, args, recipe: dict, steps_per_epoch: int) -> list[str]:
    """Refuse a resume whose model or batch size differs from the checkpoint's; return the other
    settings that changed (they apply from the resumed step on), as '--name old -> new', and the
    epoch's length in steps where it changed."""
    import dataclasses

    saved = obj.get("model_config")
    if saved is not None:
        # drop_path_rate changes no parameter, sampling_rate only the data: they may change like the
        # other regularization and data settings
        diff = [f"{f.name} {getattr(saved, f.name)} in the checkpoint, {getattr(model.cfg, f.name)} now"
                for f in dataclasses.fields(model.cfg) if f.name not in ("drop_path_rate", "sampling_rate")
                and getattr(saved, f.name, None) != getattr(model.cfg, f.name)]
        if diff:
            raise ValueError(f"--resume {path}: the checkpoint's model differs from this run's ({'; '.join(diff)}): "
                             "give the run's --preset, --num-frames, --crop-size and data, or start a new run from "
                             "it with --finetune")
    old_recipe, old_args = obj.get("recipe") or {}, obj.get("args") or {}
    if "batch_size" in old_recipe and old_recipe["batch_size"] != recipe["batch_size"]:
        raise ValueError(f"--resume {path}: the run was started with --batch-size {old_recipe['batch_size']}, not "
                         f"{recipe['batch_size']}; its step count and data position are in those batches: give "
                         f"--batch-size {old_recipe['batch_size']}, or start a new run from it with --finetune")
    if "layer_decay" in old_args and old_args["layer_decay"] != args.layer_decay:
        raise ValueError(f"--resume {path}: the run was started with --layer-decay {old_args['layer_decay']}, not "
                         f"{args.layer_decay} (the optimizer's parameter groups differ): give --layer-decay "
                         f"{old_args['layer_decay']}, or start a new run from it with --finetune")
    old_optimizer = old_recipe.get("optimizer", "adamw") if old_recipe else recipe["optimizer"]
    if old_optimizer != recipe["optimizer"]:
        raise ValueError(f"--resume {path}: the run was started with --optimizer {old_optimizer}, not "
                         f"{recipe['optimizer']}: give --optimizer {old_optimizer}, or start a new run from it "
                         "with --finetune")
    # runs started before the option existed exempted position tables and the class token
    old_zero = old_recipe.get("zero_decay_pos_cls", True) if old_recipe else recipe["zero_decay_pos_cls"]
    if old_zero != recipe["zero_decay_pos_cls"]:
        flag = "--zero-decay-pos-cls" if old_zero else "--no-zero-decay-pos-cls"
        raise ValueError(f"--resume {path}: the run was started with {flag} (the optimizer's parameter groups "
                         f"differ): give {flag}, or start a new run from it with --finetune")
    # drop_path: the recipe's None means the preset's rate; the configs hold the rates used
    changed = [f"--{k.replace('_', '-')} {_shown(old_recipe[k])} -> {_shown(v)}" for k, v in recipe.items()
               if k in old_recipe and not _same(old_recipe[k], v) and k != "drop_path"]
    new_args = vars(args)
    changed += [f"--{k.replace('_', '-')} {old_args[k]} -> {new_args[k]}" for k in RESUME_LISTED_ARGS
                if k in old_args and k not in recipe and _plain(new_args.get(k)) != _plain(old_args[k])]
    if saved is not None:
        for field, flag in (("drop_path_rate", "--drop-path"), ("sampling_rate", "--sampling-rate")):
            if getattr(saved, field) != getattr(model.cfg, field):
                changed.append(f"{flag} {getattr(saved, field)} -> {getattr(model.cfg, field)}")
    # The epoch's length follows the data, the repeats, the batch and the number of processes, and
    # the sampler's rules (a list whose file kept its name, a code update): listed whatever the cause,
    # as it moves every later epoch boundary and the schedule's length in steps.
    old_steps = obj.get("steps_per_epoch")
    if old_steps is not None and old_steps != steps_per_epoch:
        changed.append(f"steps per epoch {old_steps} -> {steps_per_epoch}")
    return changed


#: Arguments besides the recipe's whose change a resume lists: the data, the seed (it orders the
#: rest of the epoch and seeds every later step), EMA (0 drops the run's average from the next
#: checkpoint on), micro-batching and precision. Model and optimizer changes are refused instead.
RESUME_LISTED_ARGS = (
    "train_csv", "val_csv", "data_root", "image_folders", "multi_label", "target_fps", "temporal_sampling",
    "inverse_uniform_jitter", "crop_scale", "jitter_scales", "test_clips", "test_crops", "synthetic_size",
    "seed", "ema_decay", "accum_steps", "precision",
)


def _plain(value):
    """Sequences compared as lists (argparse gives lists, a recipe tuples)."""
    return list(value) if isinstance(value, (tuple, list)) else value


def _shown(value) -> str:
    """A float to 6 significant digits (one converted from an older unit shows no rounding tail)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _same(old, new) -> bool:
    """A recipe value unchanged: floats to rounding (LRs converted from older checkpoints' units)."""
    if isinstance(old, float) and isinstance(new, float):
        return math.isclose(old, new, rel_tol=1e-9, abs_tol=0.0)
    return _plain(old) == _plain(new)
