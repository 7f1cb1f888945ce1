"""Which samples each rank reads (and in which order), and which frames each clip takes.

``TrainSampler``: a per-epoch permutation (seeded by ``seed + epoch``, identical on all ranks),
each index repeated ``repeats`` times (repeated augmentation: the copies get different
augmentations), padded to a multiple of the world size and dealt round-robin. Every copy is kept:
an epoch reads each sample ``repeats`` times, ``repeats * len(dataset)`` clips in all, as
pySlowFast's ``AUG.NUM_SAMPLE`` loads every video once per epoch and gives that many clips of it
(DeiT's RASampler instead keeps one pass's count, so only 1 / repeats of the samples each epoch:
half the Kinetics recipe's clips). It yields ``(index, sample_seed, clip_seed)`` triples
(:func:`split_key`): datasets draw a sample's augmentation from its sample seed and the clip's
place in the video from its clip seed, which the copies of a sample share in an epoch, so they are
the same frames augmented differently, as pySlowFast decodes one clip and augments it
NUM_SAMPLE times. Results do not depend on which DataLoader worker loads an item, and ``start``
skips the items already consumed (mid-epoch resume).

``shard_indices``: evaluation sharding without padding, so every video is counted exactly once.

``clip_frame_indices``: pySlowFast's clip sampling, T frames every tau frames at the target frame
rate, mapped to the source frame rate (Kinetics).

``segment_frame_indices``: pySlowFast's Something-Something sampling, one frame from each of T
equal segments of the whole video.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch.utils.data import Sampler


class TrainSampler(Sampler):
    def __init__(self, length: int, rank: int = 0, world_size: int = 1, repeats: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if repeats < 1:
            raise ValueError(f"repeated augmentation count must be >= 1, got {repeats}")
        if length < 1:
            raise ValueError("the training set is empty")
        self.length, self.rank, self.world_size = length, rank, world_size
        self.repeats, self.seed, self.shuffle = repeats, seed, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(length * repeats / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_items(self) -> list[tuple[int, int]]:
        """This rank's (index, sample_seed) list for the current epoch, before skipping ``start``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=g) if self.shuffle else torch.arange(self.length)
        order = order.repeat_interleave(self.repeats).tolist()
        total = self.per_rank * self.world_size
        order += order[: total - len(order)]
        mine = range(self.rank, total, self.world_size)
        # the sample seed hashes the global position in this epoch's list (unique per copy and
        # epoch), the clip seed the sample's index (shared by its copies; a 4-tuple, apart from the
        # 3-tuples). Hashes of int tuples do not depend on PYTHONHASHSEED.
        return [(order[p], hash((self.seed, self.epoch, p)) & 0x7FFFFFFF,
                 hash((self.seed, self.epoch, order[p], 1)) & 0x7FFFFFFF) for p in mine]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.epoch_items()[self.start:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


def index_seed(index: int) -> int:
    """The seed of a sample read by its index alone (evaluation, a plain DataLoader)."""
    return (index * 2_654_435_761) & 0x7FFFFFFF


def split_key(key) -> tuple[int, int, int]:
    """A dataset key as (index, sample_seed, clip_seed): the TrainSampler's triple, an
    ``(index, seed)`` pair (both seeds the one), or an index (seeds from it)."""
    if isinstance(key, tuple):
        return key if len(key) == 3 else (key[0], key[1], key[1])
    seed = index_seed(key)
    return key, seed, seed


def shard_indices(length: int, rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of ``range(length)``: strided, no padding, disjoint, complete."""
    return list(range(rank, length, world_size))


def clip_frame_indices(num_frames: int, frames: int, stride: int, source_fps: float,
                       target_fps: Optional[float], clip_idx: int, num_clips: int,
                       rng: Optional[torch.Generator] = None) -> list[int]:
    """Frame indices of one clip of ``frames`` frames, ``stride`` apart at ``target_fps``.

    The clip spans ``frames * stride * source_fps / target_fps`` source frames (pySlowFast
    ``get_start_end_idx``). ``clip_idx == -1``: random start (training); otherwise clip
    ``clip_idx`` of ``num_clips`` uniformly spaced clips, as the MViT configs' offset sampling
    (``DATA.USE_OFFSET_SAMPLING``) spaces them: starts ``k * floor(delta / (num_clips - 1))``,
    one clip ``floor(delta / 2)``, where ``delta`` is the video's length less the span. Indices
    are ``linspace(start, end, frames)`` truncated and clamped to the video, so short videos
    repeat frames.
    """
    if num_frames < 1:
        raise ValueError("video has no frames")
    ratio = 1.0 if not target_fps else source_fps / target_fps
    span = frames * stride * ratio
    delta = max(num_frames - span, 0.0)
    if clip_idx == -1:
        start = float(torch.rand((), generator=rng)) * delta
    elif num_clips == 1:
        start = float(math.floor(delta / 2.0))
    else:
        start = float(clip_idx * math.floor(delta / (num_clips - 1)))
    end = start + span - 1.0
    idx = torch.linspace(start, end, frames).long().clamp_(0, num_frames - 1)
    return idx.tolist()


def segment_frame_indices(num_frames: int, frames: int, rng: Optional[torch.Generator] = None,
                          train: bool = False) -> list[int]:
    """One frame from each of ``frames`` equal segments spanning the whole video (pySlowFast's
    ``Ssv2.get_seq_frames``): segment i runs from round(i * s) to round((i + 1) * s) with
    s = (num_frames - 1) / frames, both ends included; training takes a random frame of each
    (``rng``), testing the middle one. Short videos repeat frames."""
    if num_frames < 1:
        raise ValueError("video has no frames")
    size = (num_frames - 1) / frames
    out = []
    for i in range(frames):
        # numpy's round (half to even), as pySlowFast's np.round
        start, end = int(round(size * i)), int(round(size * (i + 1)))
        out.append(int(torch.randint(start, end + 1, (1,), generator=rng)) if train else (start + end) // 2)
    return out
