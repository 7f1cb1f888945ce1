"""CPU time of the training and test transforms per sample, per recipe: how many DataLoader
workers a GPU needs to be fed.

    python bench/data_pipeline.py [--repeats 40] [--threads 1]

Times each dataset's ``_transform`` (everything after decoding: RandAugment, cropping, resizing,
flipping, normalization, random erasing; the test views) on random uint8 frames of the sizes
the datasets usually hold: Kinetics clips pre-resized to a short side of 320 (16 frames of
320x427; the MViT-B 32x3 row: 32 frames), Something-Something v2 at its download's 240 (16 of
240x427), ImageNet photos of 375x500. Each sample draws its own augmentation (its own seed),
as in training, so the median over --repeats samples is the typical cost and the spread shows
how much the draw of ops changes it. Decoding is not included (it depends on the codec and the
files); add it to size the workers. One thread per worker (DataLoader workers run one each).

Writes bench/results/data_pipeline_cpu.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mvit.data.image import ImageFolderDataset  # noqa: E402
from mvit.data.rand_augment import parse  # noqa: E402
from mvit.data.video import ClipSpec, VideoDataset, _spec  # noqa: E402
from mvit.presets import get_preset  # noqa: E402
from mvit.train import IMAGE_RECIPE, PAPER_RECIPE, SSV2_RECIPE  # noqa: E402

# (row name, recipe, preset (its frames and crop), frame height, frame width)
CASES = [
    ("Kinetics, MViT-B 16x4", PAPER_RECIPE, "mvit_b_16x4", 320, 427),
    ("Kinetics, MViT-B 32x3", PAPER_RECIPE, "mvit_b_32x3", 320, 427),
    ("Something-Something v2, MViTv2-S 16x4", SSV2_RECIPE, "mvitv2_s_16x4", 240, 427),
    ("ImageNet, MViTv2 image", IMAGE_RECIPE, "mvitv2_s_image", 375, 500),
]


def _dataset(recipe: dict, cfg, train: bool):
    crop = cfg.input_size[1]
    if recipe is IMAGE_RECIPE:
        return ImageFolderDataset([], crop, train, parse(recipe["rand_augment"]) if train else None,
                                  recipe["random_erasing"] if train else 0.0, recipe["flip"])
    args = SimpleNamespace(num_frames=None, crop_size=None, jitter_scales=None, sampling_rate=cfg.sampling_rate,
                           target_fps=30.0, orientation=None)
    if train:
        return VideoDataset([], _spec(args, recipe, cfg, True, 1, 1), True, 400)
    # the papers' test views for the recipe: Kinetics 5 clips x 1 crop, SSv2 1 x 3 (one clip's frames here)
    segments = recipe["temporal_sampling"] == "segments"
    spec = ClipSpec(frames=cfg.input_size[0], crop=crop, temporal_sampling=recipe["temporal_sampling"],
                    test_clips=1, test_crops=3 if segments else 1)
    return VideoDataset([], spec, False, 400)


def time_case(recipe, cfg, h, w, train: bool, repeats: int) -> list[float]:
    frames = cfg.input_size[0]
    ds = _dataset(recipe, cfg, train)
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (frames, 3, h, w), dtype=torch.uint8, generator=g)
    out = []
    for i in range(repeats + 2):
        gen = torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        ds._transform(raw, gen)
        if i >= 2:  # two warm-up samples
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, recipe, preset, h, w in CASES:
        cfg = get_preset(preset)
        frames = cfg.input_size[0]
        for train in (True, False):
            ms = time_case(recipe, cfg, h, w, train, args.repeats)
            q = statistics.quantiles(ms, n=4)
            row = dict(case=name, mode="train" if train else "test view", frames=frames, frame=f"{h}x{w}",
                       median_ms=statistics.median(ms), q1_ms=q[0], q3_ms=q[2], max_ms=max(ms),
                       per_core_per_s=1e3 / statistics.median(ms))
            rows.append(row)
            print(f"{name:40s} {row['mode']:9s} {row['median_ms']:8.1f} ms  (quartiles {q[0]:.1f}-{q[2]:.1f}, "
                  f"max {max(ms):.1f})  {row['per_core_per_s']:6.1f} samples/s/core", flush=True)
    stamp = time.strftime("%Y-%m-%d")
    meta = dict(date=stamp, torch=torch.__version__, threads=args.threads, repeats=args.repeats,
                cpu=platform.processor() or platform.machine())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "data_pipeline_cpu.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# Transform time per sample ({stamp}, {args.threads} thread, medians of {args.repeats} samples, "
             f"torch {torch.__version__})", "",
             "| recipe, model | mode | frames | frame | median ms | quartiles ms | max ms | samples/s per core |",
             "|---|---|---:|---|---:|---|---:|---:|"]
    lines += [f"| {r['case']} | {r['mode']} | {r['frames']} | {r['frame']} | {r['median_ms']:.1f} | "
              f"{r['q1_ms']:.1f}-{r['q3_ms']:.1f} | {r['max_ms']:.1f} | {r['per_core_per_s']:.1f} |" for r in rows]
    lines += ["", "Decoding excluded. A test view row is one clip's views (Kinetics: 1 crop of the 5 clips; "
              "Something-Something: its 3 crops)."]
    with open(os.path.join(args.out, "data_pipeline_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
