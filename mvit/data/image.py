"""Image folders (ImageNet layout: ROOT/train/<class>/<image>, ROOT/val/<class>/<image>) for the
image presets. Samples are (3, 1, H, W) clips of one frame, so the rest of the pipeline is shared.

As facebookresearch/mvit trains and evaluates its ImageNet models (timm's transforms, PIL images):
train: random resized crop (area 0.08-1, aspect 3/4-4/3, bicubic), flip, RandAugment
(:mod:`.rand_augment`, uncovered pixels the ImageNet mean), normalization, random erasing.
Val: the short side resized to int(crop / crop_fraction) (bicubic, antialiased as PIL resizes:
256 for 224 crops at the default 0.875), the centre crop.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import Dataset

from ..config import IMAGENET_MEAN, IMAGENET_STD
from . import transforms as T
from .rand_augment import RandAugmentSpec, rand_augment
from .samplers import split_key
from .video import check_orientation, label_target, read_with_retries

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def mean_fill(mean) -> tuple[int, ...]:
    """timm's ``img_mean`` fill for RandAugment's geometric ops: the normalization mean in 0..255."""
    return tuple(min(255, round(255 * m)) for m in mean)


IMAGENET_FILL = mean_fill(IMAGENET_MEAN)
#: facebookresearch/mvit's ``DATA.VAL_CROP_RATIO`` (timm's model cards say 0.9 for the same weights).
CROP_FRACTION = 0.875


def read_image(path: str, display: bool = False) -> torch.Tensor:
    """An image as (3, H, W) uint8 RGB; ``display``: turned and mirrored as its EXIF orientation
    says viewers show it, else as stored (as torchvision's and timm's loaders read it)."""
    import numpy as np
    from PIL import Image, ImageOps  # Pillow comes with matplotlib

    with Image.open(path) as stored:
        img = ImageOps.exif_transpose(stored) if display else stored
        if img.mode.startswith("I;16") or img.mode == "I":
            # 16-bit grayscale (PNG; older Pillow opens it as "I"): convert("RGB") clips every
            # value above 255 to white, so scale 0..65535 to 0..255 first.
            gray = np.asarray(img).astype(np.float32) / 257.0
            gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
            return torch.from_numpy(gray).expand(3, *gray.shape).clone()
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def _image_errors() -> tuple[type, ...]:
    """What a missing, truncated or corrupt image raises in Pillow: OSError (UnidentifiedImageError
    and truncated files among them), SyntaxError (some plugins' "broken PNG file"), ValueError,
    EOFError, and the decompression-bomb error (an Exception of its own)."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageFolderDataset(Dataset):
    def __init__(self, items, crop: int, train: bool, rand_augment: Optional[RandAugmentSpec] = None,
                 erasing: float = 0.0, flip: bool = True, max_retries: int = 10, num_classes: Optional[int] = None,
                 multi_label: bool = False, crop_scale: tuple[float, float] = (0.08, 1.0),
                 crop_fraction: float = CROP_FRACTION, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 orientation: str = "stored"):
        check_orientation(orientation)
        if multi_label and not num_classes:
            raise ValueError("multi-label images need num_classes")
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"--crop-fraction must be in (0, 1], got {crop_fraction}")
        self.items, self.crop, self.train = items, crop, train
        self.crop_scale, self.crop_fraction = tuple(crop_scale), crop_fraction
        self.num_classes, self.multi_label = num_classes, multi_label
        self.rand_augment, self.erasing, self.flip, self.max_retries = rand_augment, erasing, flip, max_retries
        self.mean, self.std = tuple(mean), tuple(std)
        self.orientation = orientation

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index, seed, _ = split_key(key)  # one image: no clip to place
        gen = torch.Generator().manual_seed(seed)
        display = self.orientation == "display"
        img, label = read_with_retries(self.items, index, lambda path: read_image(path, display), _image_errors(),
                                       kind="image", train=self.train, max_retries=self.max_retries, gen=gen)
        x = self._transform(img[None], gen)  # (1, 3, H, W)
        x = x.permute(1, 0, 2, 3).contiguous()  # (3, 1, H, W)
        target = label_target(label, self.num_classes, self.multi_label)
        return (x, target) if self.train else (x[None], target)

    def _transform(self, img: torch.Tensor, gen) -> torch.Tensor:
        if not self.train:
            img = T.short_side_scale(img, int(self.crop / self.crop_fraction), "bicubic", antialias=True)
            return T.normalize(T.center_crop(img, self.crop), self.mean, self.std)
        img = T.random_resized_crop(img, self.crop, self.crop_scale, (3 / 4, 4 / 3), gen, "bicubic", antialias=True)
        if self.flip:
            img = T.random_flip(img, 0.5, gen)
        if self.rand_augment:
            img = rand_augment(img, self.rand_augment, gen, mean_fill(self.mean))
        return T.random_erasing(T.normalize(img, self.mean, self.std), self.erasing, gen)


def build_image_datasets(args, recipe: dict, cfg, workers: int):
    from . import DataBundle
    from .rand_augment import parse as parse_rand_augment
    from .video import check_crop_scale, labelled_items

    multi = bool(args.multi_label)
    train_items, val_items, classes, num_classes = labelled_items(args, IMAGE_EXTENSIONS)
    crop = args.crop_size or cfg.input_size[1]
    if crop < 1:
        raise ValueError(f"--crop-size must be >= 1, got {crop}")
    ra = parse_rand_augment(recipe.get("rand_augment"))
    erasing = recipe.get("random_erasing", 0.0)
    if not 0.0 <= erasing <= 1.0:
        raise ValueError(f"--random-erasing is a probability in [0, 1], got {erasing}")
    crop_scale = tuple(recipe.get("crop_scale") or (0.08, 1.0))
    check_crop_scale(crop_scale, (3 / 4, 4 / 3))
    mean, std = cfg.normalization(image=True)
    shared = dict(num_classes=num_classes, multi_label=multi, mean=mean, std=std,
                  orientation=args.orientation or "stored")
    train = ImageFolderDataset(train_items, crop, True, ra, erasing, bool(recipe.get("flip", True)),
                               crop_scale=crop_scale, **shared)
    val = ImageFolderDataset(val_items, crop, False, **shared) if val_items else None
    return DataBundle(train, val, num_classes, classes, multi, (1, crop, crop), workers)
