"""Video datasets: pySlowFast ``path label`` lists or class folders, decoded with PyAV.

PyAV is an optional extra (``pip install -e .[video]``) imported only when a video is decoded.
Decoding happens in DataLoader workers. In training, a video that cannot be read is logged and
replaced by another sample (chosen from the sample's seed, so the run stays reproducible). In
testing it is an error naming the file (:class:`UnreadableSampleError`): another video in its
place would be scored twice under the wrong name.

Training clip, as pySlowFast trains MViT on Kinetics: T frames every tau frames at ``target_fps``
from a random start (:func:`~mvit.data.samplers.clip_frame_indices`), RandAugment on the decoded
frames (:mod:`.rand_augment`), a random resized crop (``crop_scale`` of the area, aspect ratio in
``crop_ratio``; or, with ``crop_scale=None``, a random short-side scale in ``jitter`` and a random
crop, pySlowFast's rule for its other models and Something-Something), horizontal flip,
normalization, random erasing. ``temporal_sampling="segments"``: pySlowFast's Something-Something
frames instead, one from each of T equal segments of the whole video (random in training, the
middle in testing; :func:`~mvit.data.samplers.segment_frame_indices`).
Test views: K uniformly spaced clips (segments: the one clip) x 1 or 3 crops. One crop: the short
side scaled to ``jitter[0]`` (256 for 224 crops) and the centre crop; three: the short side scaled
to the crop size and left/centre/right crops (pySlowFast's two test rules).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import KINETICS_MEAN, KINETICS_STD
from . import transforms as T
from .rand_augment import VIDEO_FILL, RandAugmentSpec, rand_augment
from .samplers import clip_frame_indices, segment_frame_indices, split_key

log = logging.getLogger("mvit.data")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
#: clip_frame_indices (Kinetics: T frames tau apart) or segment_frame_indices (Something-Something)
TEMPORAL_SAMPLING = ("stride", "segments")
#: How files that ask to be shown rotated (a video's display matrix, a photo's EXIF orientation)
#: are read: as their pixels are stored (what pySlowFast, torchvision and timm read, and what the
#: published models were trained and scored on) or as players and viewers show them (a phone's
#: portrait video is stored sideways with a display matrix of -90 degrees).
ORIENTATIONS = ("stored", "display")
Label = Union[int, tuple[int, ...]]


class UnreadableSampleError(OSError):
    """A test sample (video or image) that cannot be read. Evaluation scores every listed sample,
    so it stops instead of substituting another one, as training does."""

    path: str = ""
    reason: str = ""  # the decoder's error, "Type: message"

    @classmethod
    def of(cls, kind: str, path: str, exc: BaseException) -> "UnreadableSampleError":
        reason = f"{type(exc).__name__}: {exc}"
        err = cls(f"cannot read the {kind} {path} ({reason}); every listed {kind} is "
                  f"scored, so fix the file, remove it from the list, or pass --skip-unreadable")
        err.path, err.reason = path, reason
        return err


def read_with_retries(items, index: int, read, errors: tuple[type, ...], *, kind: str, train: bool,
                      max_retries: int, gen: torch.Generator):
    """``(read(path), label)`` of ``items[index]``. A sample that raises one of ``errors`` is, in
    training, replaced by another drawn with ``gen`` (at most ``max_retries`` times, each logged);
    in testing it is an :class:`UnreadableSampleError`. Only reading is retried, and only on those
    errors: a bad setting must fail, not pass for a bad file."""
    for _ in range(max_retries + 1):
        path, label = items[index]
        try:
            return read(path), label
        except errors as exc:
            if not train:
                raise UnreadableSampleError.of(kind, path, exc) from exc
            log.warning("unreadable %s %s (%s: %s); using another sample", kind, path, type(exc).__name__, exc)
            index = int(torch.randint(0, len(items), (1,), generator=gen))
    raise RuntimeError(f"{max_retries + 1} {kind}s in a row could not be read; last: {path}")


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("reading videos needs PyAV: pip install -e .[video]  (or: pip install av)") from None
    return av


# Colour conversion in the calling thread. PyAV >= 17 scales frames with a pool of threads by
# default (threads=0, one per CPU), and with FFmpeg 8's swscale (PyAV 19) that pool outlives the
# call: a DataLoader worker forked after the parent process decoded a video inherited it and hung
# for good in pthread_cond_destroy on its first frame. One thread also suits the workers, which
# are the parallelism here. PyAV releases without the argument get no keyword.
_RGB = {"format": "rgb24", "threads": 1}


def _to_rgb(frame) -> np.ndarray:
    global _RGB
    try:
        return frame.to_ndarray(**_RGB)
    except TypeError:
        if "threads" not in _RGB:
            raise
        _RGB = {"format": "rgb24"}
        return frame.to_ndarray(**_RGB)


def decode_frames(path: str, indices_for: "callable", display: bool = False) -> tuple[np.ndarray, list[int]]:
    """Decode the frames ``indices_for(num_frames, fps)`` asks for, as uint8 RGB (len, H, W, 3),
    and those indices. ``display``: turned as the video's display matrix says players show it
    (quarter turns; its mirroring, which no camera writes, is left out), else as stored.

    The frame count comes from the container when it states one; decoding then stops at the last
    frame needed. A count that overstates the frames (a truncated or trimmed file) shows when
    decoding ends early: the indices are asked again for the frames the file has, as pySlowFast
    samples from the frames it decoded (one that understates them, which some AVI writers
    leave, is not noticed: the frames past it are never sampled). Without a count every frame is
    decoded first. Only the frames asked for are converted to RGB or kept; a frame whose size
    changes mid-stream is scaled to the size of the first one asked for.
    """
    av = _av()
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        rotate_tag = stream.metadata.get("rotate")  # where the frames carry no display matrix
        fps = float(stream.average_rate or stream.guessed_rate or 30)
        stated = stream.frames if stream.frames and stream.frames > 0 else 0
        if stated:
            wanted = indices_for(stated, fps)
            kept, count = _keep_frames(container.decode(stream), wanted)
        else:
            every = list(container.decode(stream))  # in the decoder's format, not RGB
            count = len(every)
            wanted = [min(i, count - 1) for i in indices_for(count, fps)] if count else []
            kept = {i: every[i] for i in set(wanted)}
    if not count:
        raise ValueError(f"no frames decoded from {path}")
    if stated and count <= max(wanted):  # the container overstated its frame count
        with av.open(path) as container:
            wanted = [min(i, count - 1) for i in indices_for(count, fps)]
            kept, _ = _keep_frames(container.decode(container.streams.video[0]), wanted)
    first = kept[min(wanted)]
    size = (first.width, first.height)
    rgb = {i: _to_rgb(f if (f.width, f.height) == size else f.reformat(width=size[0], height=size[1]))
           for i, f in kept.items()}
    frames = np.stack([rgb[i] for i in wanted])
    turns = _display_quarter_turns(first, rotate_tag) if display else 0
    if turns:
        frames = np.ascontiguousarray(np.rot90(frames, turns, axes=(1, 2)))
    return frames, list(wanted)


def _display_quarter_turns(frame, rotate_tag: Optional[str]) -> int:
    """Counter-clockwise quarter turns that show ``frame`` as players do: its display matrix's
    angle (PyAV >= 14 reads it; counter-clockwise degrees), else the stream's older ``rotate``
    tag (clockwise degrees). Angles between quarter turns go to the nearest one."""
    degrees = getattr(frame, "rotation", None)
    if not degrees and rotate_tag:
        try:
            degrees = -float(rotate_tag)
        except ValueError:
            degrees = 0
    return round((degrees or 0) / 90) % 4


def _keep_frames(frames, wanted: Sequence[int]) -> tuple[dict, int]:
    """The frames of ``wanted`` indices from an iterator of decoded frames, and how many frames
    were decoded: ``max(wanted) + 1`` unless the iterator ended first."""
    want, last, kept, count = set(wanted), max(wanted), {}, 0
    for i, frame in enumerate(frames):
        count = i + 1
        if i in want:
            kept[i] = frame
        if i >= last:
            break
    return kept, count


def read_csv(path: str, root: Optional[str] = None, multi_label: bool = False,
             num_classes: Optional[int] = None, classes_from: str = "") -> list[tuple[str, Label]]:
    """pySlowFast list: ``path label`` per line (space or comma... label field last; multi-label:
    comma-separated class ids). Relative paths are taken relative to ``root``. Labels must be
    >= 0 and, when ``num_classes`` is given, < ``num_classes`` (``classes_from`` says where that
    number came from, for the error message, which names the file and line)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"list file not found: {path}")
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a text list of 'path label' lines ({exc})") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'path label', got {line!r}")
        vid, lab = parts
        try:
            label: Label = tuple(int(c) for c in lab.split(",")) if multi_label else int(lab)
        except ValueError:
            hint = "" if multi_label or "," not in lab else " (comma-separated labels need --multi-label)"
            raise ValueError(f"{path}:{n}: label {lab!r} is not an integer{hint}") from None
        for c in (label if multi_label else (label,)):
            if c < 0:
                raise ValueError(f"{path}:{n}: label {c} is negative; class ids count from 0")
            if num_classes is not None and c >= num_classes:
                raise ValueError(f"{path}:{n}: label {c} is outside [0, {num_classes}){classes_from}")
        if root and not os.path.isabs(vid):
            vid = os.path.join(root, vid)
        items.append((vid, label))
    if not items:
        raise ValueError(f"{path} lists no files")
    return items


#: Something-Something v2's class names, beside its train and validation lists in the download.
SSV2_LABELS = "something-something-v2-labels.json"


def read_ssv2_json(path: str, root: Optional[str] = None) -> tuple[list[tuple[str, int]], list[str]]:
    """Something-Something v2's own lists (``something-something-v2-{train,validation}.json``:
    entries with an ``id`` and a ``template``) as pySlowFast reads them: the label is the number
    that :data:`SSV2_LABELS`, in the same folder, gives the template with its brackets removed;
    the video is ROOT/<id>.webm, the download's names. Returns (items, class names by label)."""
    import json

    labels_path = os.path.join(os.path.dirname(os.path.abspath(path)), SSV2_LABELS)
    if not os.path.exists(labels_path):
        raise FileNotFoundError(f"{path}: Something-Something v2 lists need {SSV2_LABELS} beside them "
                                f"(not found: {labels_path})")
    with open(labels_path) as f:
        label_ids = {name: int(i) for name, i in json.load(f).items()}
    classes = [name for name, _ in sorted(label_ids.items(), key=lambda kv: kv[1])]
    if [label_ids[c] for c in classes] != list(range(len(classes))):
        raise ValueError(f"{labels_path}: the class numbers are not 0..{len(classes) - 1}")
    with open(path) as f:
        entries = json.load(f)
    items = []
    for n, entry in enumerate(entries):
        if "template" not in entry:
            raise ValueError(f"{path}: entry {n} ({entry.get('id')!r}) has no template, so no label (the test "
                             "list has none)")
        template = entry["template"].replace("[", "").replace("]", "")
        if template not in label_ids:
            raise ValueError(f"{path}: entry {n} ({entry.get('id')!r}): template {template!r} is not in {labels_path}")
        video = f"{entry['id']}.webm"
        items.append((os.path.join(root, video) if root else video, label_ids[template]))
    if not items:
        raise ValueError(f"{path} lists no files")
    return items, classes


def read_list(path: str, root: Optional[str] = None, multi_label: bool = False, num_classes: Optional[int] = None,
              classes_from: str = "") -> tuple[list[tuple[str, Label]], Optional[list[str]]]:
    """A pySlowFast CSV list (:func:`read_csv`), or Something-Something v2's JSON list
    (:func:`read_ssv2_json`, which names the classes). Returns (items, class names or None)."""
    if not path.endswith(".json"):
        return read_csv(path, root, multi_label, num_classes, classes_from), None
    if not os.path.exists(path):
        raise FileNotFoundError(f"list file not found: {path}")
    if multi_label:
        raise ValueError(f"{path}: Something-Something v2 lists give one label per video; leave out --multi-label")
    items, classes = read_ssv2_json(path, root)
    if num_classes is not None and len(classes) > num_classes:
        raise ValueError(f"{path}: {len(classes)} classes in {SSV2_LABELS}, more than {num_classes}{classes_from}")
    return items, classes


#: The most classes taken from the largest label without --num-classes (ImageNet-21K has 21,841):
#: a label of 10**20 must not become a classifier layer of that width.
MAX_INFERRED_CLASSES = 100_000


def max_label(items: list, multi_label: bool = False) -> int:
    return max(c for _, lab in items for c in (lab if multi_label else (lab,)))


def check_data_root(path: str) -> None:
    """--data-root, the folder of the class folders: one line when missing or a file."""
    if os.path.isfile(path):
        raise ValueError(f"--data-root {path} is a file, not a folder (of train/ and val/ class folders)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--data-root not found: {path}")


def class_folders(root: str, split: str, extensions=VIDEO_EXTENSIONS,
                  classes: Optional[Sequence[str]] = None) -> tuple[list[tuple[str, int]], list[str]]:
    """ROOT/<split>/<class>/<file> -> items and the sorted class names."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data folder not found: {folder}")
    found = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if classes:
        # a folder of a class the model was not trained on would be skipped without a word
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{folder} has class folders the training classes lack: {', '.join(unknown)}")
    classes = list(classes) if classes else found
    if not classes:
        raise ValueError(f"{folder} has no class folders")
    items = []
    for label, name in enumerate(classes):
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            continue
        for fn in sorted(os.listdir(sub)):
            if fn.lower().endswith(extensions):
                items.append((os.path.join(sub, fn), label))
    if not items:
        raise ValueError(f"no files with extensions {extensions} under {folder}")
    return items, classes


@dataclass
class ClipSpec:
    frames: int = 16
    stride: int = 4
    target_fps: Optional[float] = 30.0
    crop: int = 224
    jitter: tuple[int, int] = (256, 320)
    crop_scale: Optional[tuple[float, float]] = None  # random resized crop's area fraction; None: jitter
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    inverse_uniform: bool = False  # the jitter's short side drawn as pySlowFast's INV_UNIFORM_SAMPLE
    temporal_sampling: str = "stride"  # or "segments": one frame per segment of the video (SSv2)
    flip: bool = True
    rand_augment: Optional[RandAugmentSpec] = None
    erasing: float = 0.0
    test_clips: int = 1
    test_crops: int = 1
    mean: tuple[float, ...] = KINETICS_MEAN  # the normalization the model expects (MViTConfig.normalization)
    std: tuple[float, ...] = KINETICS_STD
    orientation: str = "stored"  # one of ORIENTATIONS

    def check(self, train: bool) -> None:
        """Raise ValueError (naming the command-line option) for settings no video could satisfy.
        Checked once up front: inside ``__getitem__`` they would look like unreadable videos."""
        if self.frames < 1:
            raise ValueError(f"--num-frames must be >= 1, got {self.frames}")
        if self.temporal_sampling not in TEMPORAL_SAMPLING:
            raise ValueError(f"--temporal-sampling must be one of {TEMPORAL_SAMPLING}, "
                             f"got {self.temporal_sampling!r}")
        check_orientation(self.orientation)
        if self.stride < 1:
            raise ValueError(f"--sampling-rate must be >= 1, got {self.stride}")
        if self.target_fps is not None and not self.target_fps > 0:
            raise ValueError(f"--target-fps must be > 0, got {self.target_fps}")
        if self.crop < 1:
            raise ValueError(f"--crop-size must be >= 1, got {self.crop}")
        lo, hi = self.jitter
        if lo > hi:
            raise ValueError(f"--jitter-scales must be MIN MAX with MIN <= MAX, got {lo} {hi}")
        if lo < self.crop:
            raise ValueError(f"--jitter-scales {lo} {hi}: the short side is scaled to at least the crop "
                             f"size, {self.crop} (--crop-size), to crop from it; got a minimum of {lo}")
        if train:
            if self.crop_scale is not None:
                check_crop_scale(self.crop_scale, self.crop_ratio)
            if not 0.0 <= self.erasing <= 1.0:
                raise ValueError(f"--random-erasing is a probability in [0, 1], got {self.erasing}")
        else:
            if self.test_clips < 1:
                raise ValueError(f"--test-clips must be >= 1, got {self.test_clips}")
            if self.test_crops not in (1, 3):
                raise ValueError(f"--test-crops must be 1 or 3, got {self.test_crops}")
            if self.temporal_sampling == "segments" and self.test_clips != 1:
                raise ValueError(f"--temporal-sampling segments takes one clip spanning the video (its middle "
                                 f"frames); --test-clips {self.test_clips} would repeat it")


def check_crop_scale(scale, ratio) -> None:
    """The random resized crop's ranges (--crop-scale: fractions of the frame's area)."""
    lo, hi = scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"--crop-scale must be MIN MAX with 0 < MIN <= MAX <= 1 (fractions of the area), "
                         f"got {lo} {hi}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"the crop's aspect ratio range must be 0 < MIN <= MAX, got {ratio[0]} {ratio[1]}")


class VideoDataset(Dataset):
    """``train=True``: one augmented clip per sample; else all test views of a video, (V, 3, T, H, W)."""

    def __init__(self, items: list, spec: ClipSpec, train: bool, num_classes: int,
                 multi_label: bool = False, max_retries: int = 10):
        spec.check(train)
        self.items, self.spec, self.train = items, spec, train
        self.num_classes, self.multi_label, self.max_retries = num_classes, multi_label, max_retries

    @property
    def views_per_video(self) -> int:
        return 1 if self.train else self.spec.test_clips * self.spec.test_crops

    def __len__(self) -> int:
        return len(self.items)

    def _target(self, label: Label):
        return label_target(label, self.num_classes, self.multi_label)

    def __getitem__(self, key):
        index, seed, clip_seed = split_key(key)
        gen = torch.Generator().manual_seed(seed)
        clip_gen = torch.Generator().manual_seed(clip_seed)  # where the clip starts: shared by copies
        frames, label = read_with_retries(
            self.items, index, lambda path: self._decode(path, clip_gen), _decode_errors(),
            kind="video", train=self.train, max_retries=self.max_retries, gen=gen)
        return self._transform(frames, gen), self._target(label)

    def _decode(self, path: str, gen: torch.Generator) -> torch.Tensor:
        """The frames of one training clip, or of every test clip one after another: (N, C, H, W) uint8."""
        s = self.spec
        if s.temporal_sampling == "segments":
            def wanted(n, fps):
                return segment_frame_indices(n, s.frames, gen, train=self.train)
        elif self.train:
            def wanted(n, fps):
                return clip_frame_indices(n, s.frames, s.stride, fps, s.target_fps, -1, 1, gen)
        else:
            def wanted(n, fps):
                return [i for k in range(s.test_clips)
                        for i in clip_frame_indices(n, s.frames, s.stride, fps, s.target_fps, k, s.test_clips)]
        frames, _ = decode_frames(path, wanted, display=s.orientation == "display")
        return torch.from_numpy(frames).permute(0, 3, 1, 2)

    def decode_scale(self) -> Optional[int]:
        """The short side frames are scaled to as they are decoded, before any augmentation:
        pySlowFast decodes Kinetics videos with FFmpeg's scaler at ``max_spatial_scale``, the
        smallest scale the transforms use (TRAIN_JITTER_SCALES[0], 256 for 224 crops; in testing
        the 1-crop views' 256, or the crop size for 3 crops). RandAugment and the crops then work
        on 256-line frames: from raw 720p-1080p frames the crop's resize to 224 aliased (no
        antialiasing in it) and RandAugment cost up to 20x more. Something-Something (segments)
        is read at its own resolution, as pySlowFast reads its frames."""
        s = self.spec
        if s.temporal_sampling == "segments":
            return None
        return s.jitter[0] if self.train or s.test_crops == 1 else s.crop

    def _transform(self, frames: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        s = self.spec
        scale = self.decode_scale()
        if scale is not None:  # antialiased, as FFmpeg's (area-averaging) scaler shrinks frames
            frames = T.short_side_scale(frames, scale, "bilinear", antialias=True)
        if self.train:
            # pySlowFast: RandAugment on the decoded frames, then the crop
            clip = rand_augment(frames, s.rand_augment, gen, VIDEO_FILL) if s.rand_augment else frames
            if s.crop_scale is not None:
                clip = T.random_resized_crop(clip, s.crop, s.crop_scale, s.crop_ratio, gen)
            else:
                clip = T.random_short_side_scale(clip, *s.jitter, gen=gen, inverse_uniform=s.inverse_uniform)
                clip = T.random_crop(clip, s.crop, gen)
            if s.flip:
                clip = T.random_flip(clip, 0.5, gen)
            clip = T.random_erasing(T.normalize(clip, s.mean, s.std), s.erasing, gen)
            return clip.permute(1, 0, 2, 3).contiguous()  # (C, T, H, W)

        views = []
        for clip in frames.split(s.frames):
            clip = T.short_side_scale(clip, s.jitter[0] if s.test_crops == 1 else s.crop)
            for c in ([1] if s.test_crops == 1 else [0, 1, 2]):
                views.append(T.normalize(T.uniform_crop(clip, s.crop, c), s.mean, s.std).permute(1, 0, 2, 3))
        return torch.stack(views)


def _decode_errors() -> tuple[type, ...]:
    """What a missing, corrupt or empty video raises: PyAV's errors, OS errors, and the
    ValueErrors of :func:`decode_frames` / :func:`clip_frame_indices` for files without a video
    stream or without frames."""
    return (_av().FFmpegError, OSError, EOFError, ValueError)


def check_orientation(orientation: str) -> None:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"--orientation must be one of {ORIENTATIONS}, got {orientation!r}")


def label_target(label: Label, num_classes: Optional[int], multi_label: bool):
    """An int class id, or for multi-label a (num_classes,) 0/1 float vector."""
    if not multi_label:
        return int(label)
    t = torch.zeros(num_classes)
    t[list(label)] = 1.0
    return t


def default_jitter(crop: int) -> tuple[int, int]:
    """pySlowFast's short-side range (256, 320) for 224 crops, scaled to ``crop``."""
    return round(crop * 256 / 224), round(crop * 320 / 224)


def _spec(args, recipe: dict, cfg, train: bool, test_clips: int, test_crops: int) -> ClipSpec:
    from .rand_augment import parse

    frames = args.num_frames or cfg.input_size[0]
    crop = args.crop_size or cfg.input_size[1]
    jitter = tuple(args.jitter_scales) if getattr(args, "jitter_scales", None) else default_jitter(crop)
    crop_scale = recipe.get("crop_scale")
    mean, std = cfg.normalization(image=False)
    return ClipSpec(frames=frames, stride=args.sampling_rate, target_fps=args.target_fps or None, crop=crop,
                    mean=mean, std=std, jitter=jitter, crop_scale=tuple(crop_scale) if crop_scale else None,
                    inverse_uniform=bool(recipe.get("inverse_uniform_jitter", False)),
                    temporal_sampling=recipe.get("temporal_sampling") or "stride",
                    flip=bool(recipe.get("flip", True)),
                    rand_augment=parse(recipe.get("rand_augment")) if train else None,
                    erasing=recipe.get("random_erasing", 0.0) if train else 0.0,
                    test_clips=test_clips, test_crops=test_crops, orientation=args.orientation or "stored")


def build_video_datasets(args, recipe: dict, cfg, workers: int):
    from . import DataBundle

    multi = bool(args.multi_label)
    train_items, val_items, classes, num_classes = labelled_items(args, VIDEO_EXTENSIONS)
    train = VideoDataset(train_items, _spec(args, recipe, cfg, True, 1, 1), True, num_classes, multi)
    val = (VideoDataset(val_items, _spec(args, recipe, cfg, False, args.test_clips, args.test_crops), False,
                        num_classes, multi) if val_items else None)
    spec = train.spec
    return DataBundle(train, val, num_classes, classes, multi, (spec.frames, spec.crop, spec.crop), workers,
                      spec.stride if spec.temporal_sampling == "stride" else None)


def labelled_items(args, extensions) -> tuple[list, Optional[list], Optional[list[str]], int]:
    """(train items, validation items or None, class names or None, number of classes) from
    ``--train-csv`` / ``--val-csv`` lists or ``--data-root`` class folders, every label checked
    against the number of classes (``--num-classes``, else the class folders or the largest
    training label)."""
    multi = bool(args.multi_label)
    given = args.num_classes
    if args.train_csv:
        train_items, classes = read_list(args.train_csv, args.data_root, multi, given, f" (--num-classes {given})")
        num_classes = given or (len(classes) if classes else max_label(train_items, multi) + 1)
        if num_classes > MAX_INFERRED_CLASSES and not given:
            raise ValueError(f"the largest label in --train-csv {args.train_csv} is {num_classes - 1}, which would "
                             f"make a classifier of {num_classes} classes; give --num-classes if that is meant")
        why = (f" (--num-classes {given})" if given else f" ({num_classes} classes in {SSV2_LABELS})" if classes else
               f" ({num_classes} classes, from the largest label in --train-csv {args.train_csv}; "
               "give --num-classes if there are more)")
    else:
        if multi:
            raise ValueError("--multi-label needs --train-csv (and --val-csv) lists: class folders give one "
                             "label per file")
        check_data_root(args.data_root)
        train_items, classes = class_folders(args.data_root, "train", extensions)
        if given is not None and given < len(classes):
            raise ValueError(f"--num-classes {given} is smaller than the {len(classes)} class folders in "
                             f"{os.path.join(args.data_root, 'train')}")
        num_classes = given or len(classes)
        why = f" (--num-classes {given})" if given else f" ({num_classes} class folders in --data-root)"
    if args.val_csv:
        val_items = read_list(args.val_csv, args.data_root, multi, num_classes, why)[0]
    elif classes is not None and os.path.isdir(os.path.join(args.data_root, "val")):
        val_items = class_folders(args.data_root, "val", extensions, classes)[0]
    else:
        val_items = None
    return train_items, val_items, classes, num_classes
