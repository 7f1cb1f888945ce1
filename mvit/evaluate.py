"""``mvit eval``: multi-view testing.

Each video is scored by the average of the softmax (sigmoid for multi-label) over all its views
(K temporal clips x 1 or 3 spatial crops). Under DDP every rank scores a disjoint, unpadded share
of the videos, and rank 0 gathers (video index, scores) pairs: each video counts exactly once.
Reports top-1 / top-5 (single-label) or mAP (multi-label), optionally with each view's frames
shuffled (the MViT paper's Table 9 test of whether a model uses temporal order).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Callable, Optional

import numpy as np
import torch

from .cli import finite_float
from .convert import SOURCES
from .data.video import ORIENTATIONS, TEMPORAL_SAMPLING, UnreadableSampleError
from .training import distributed as dist_utils
from .training.signals import close_batches, dataloader_worker_init

log = logging.getLogger("mvit.eval")


#: How a video's views are combined (pySlowFast's DATA.ENSEMBLE_METHOD): the mean (its "sum") of the
#: views' softmax for single-label tasks, as the Kinetics and SSv2 configs; each class's largest
#: sigmoid for multi-label ones, as its Charades configs.
ENSEMBLES = ("mean", "max")


def default_ensemble(multi_label: bool) -> str:
    return "max" if multi_label else "mean"


def aggregate_views(view_logits: torch.Tensor, multi_label: bool = False,
                    ensemble: Optional[str] = None) -> torch.Tensor:
    """(videos, views, classes) logits -> (videos, classes) per-view probabilities (softmax, or
    sigmoid for multi-label), combined over the views by ``ensemble`` (default: ``default_ensemble``)."""
    ensemble = ensemble or default_ensemble(multi_label)
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    probs = view_logits.float().sigmoid() if multi_label else view_logits.float().softmax(-1)
    return probs.mean(1) if ensemble == "mean" else probs.amax(1)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict:
    order = np.argsort(-scores, axis=1, kind="stable")
    out = {}
    for k in ks:
        hit = (order[:, : min(k, scores.shape[1])] == labels[:, None]).any(1)
        out[f"top{k}"] = 100.0 * float(hit.mean()) if len(labels) else 0.0
    return out


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes with at least one positive of the average precision (Charades mAP)."""
    aps = []
    for c in range(scores.shape[1]):
        pos = targets[:, c] > 0
        if not pos.any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = pos[order]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return 100.0 * float(np.mean(aps)) if aps else 0.0


def shuffle_views(views: torch.Tensor, video_index: int, seed: int = 0) -> torch.Tensor:
    """Permute the frames (dim 2 of (V, C, T, H, W)) of each view, reproducibly per video."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + video_index)
    perm = torch.stack([torch.randperm(views.shape[2], generator=g) for _ in range(views.shape[0])])
    return torch.stack([v[:, p] for v, p in zip(views, perm)])


def _collate(batch):
    """(indices, stacked views or None, labels) of the readable samples, and (index, path) of the
    ones :class:`_Indexed` skipped."""
    read = [b for b in batch if b[1] is not None]
    idx = [b[0] for b in read]
    views = torch.stack([b[1] for b in read]) if read else None
    labels = [b[2] for b in read]
    return idx, views, labels, [(b[0], b[2]) for b in batch if b[1] is None]


class _Indexed(torch.utils.data.Dataset):
    """(index, views, label) of the dataset's samples at ``indices``; with ``skip_unreadable``, a
    sample that cannot be read is (index, None, its path) instead of an error."""

    def __init__(self, dataset, indices, shuffle_frames: bool, skip_unreadable: bool = False):
        self.dataset, self.indices, self.shuffle_frames = dataset, indices, shuffle_frames
        self.skip_unreadable = skip_unreadable

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        try:
            views, label = self.dataset[j]
        except UnreadableSampleError as exc:
            if not self.skip_unreadable:
                raise
            # exc's own message asks for --skip-unreadable, which is what is happening here
            log.warning("skipping the unreadable file %s (%s)", exc.path, exc.reason)
            return j, None, exc.path
        if self.shuffle_frames:
            views = shuffle_views(views, j)
        return j, views, label


@torch.no_grad()
def score_videos(model: Callable, dataset, rank: int, world_size: int, device, batch_size: int = 8,
                 workers: int = 0, multi_label: bool = False, autocast=None,
                 shuffle_frames: bool = False, ensemble: Optional[str] = None,
                 skipped: Optional[list] = None,
                 stop: Optional[Callable[[], bool]] = None) -> Optional[list[tuple[int, np.ndarray, object]]]:
    """This rank's (video index, aggregated scores, label) triples. Given a ``skipped`` list, a
    video that cannot be read is appended to it as (index, path) and left out, instead of
    stopping the evaluation. None when ``stop()`` turned true before a batch."""
    from .data.samplers import shard_indices

    subset = _Indexed(dataset, shard_indices(len(dataset), rank, world_size), shuffle_frames, skipped is not None)
    # a stop signal to the whole process group leaves the workers serving the main process until it
    # stops (training's evaluation; see mvit.training.signals)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                         worker_init_fn=dataloader_worker_init)
    out = []
    ctx = autocast or contextlib.nullcontext
    batches = iter(loader)
    try:
        for idx, views, labels, unreadable in batches:
            if stop is not None and stop():
                return None
            if skipped is not None:
                skipped.extend(unreadable)
            if views is None:
                continue
            b, v = views.shape[:2]
            with ctx():
                logits = model(views.flatten(0, 1).to(device, non_blocking=True))
            scores = aggregate_views(logits.view(b, v, -1), multi_label, ensemble).cpu().numpy()
            for i, s, y in zip(idx, scores, labels):
                out.append((i, s, y.numpy() if torch.is_tensor(y) else int(y)))
    finally:
        close_batches(batches)
    return out


def metrics_from_scores(triples: list, multi_label: bool) -> dict:
    triples = sorted(triples, key=lambda t: t[0])
    ids = [t[0] for t in triples]
    if len(set(ids)) != len(ids):
        raise RuntimeError("a video was scored more than once")
    if not triples:
        return {"videos": 0}
    scores = np.stack([t[1] for t in triples])
    if multi_label:
        return {"mAP": mean_average_precision(scores, np.stack([t[2] for t in triples])), "videos": len(ids)}
    labels = np.array([t[2] for t in triples])
    return {**topk_accuracy(scores, labels), "videos": len(ids)}


def evaluate(model: torch.nn.Module, dataset, info, batch_size: int = 8, workers: int = 0,
             multi_label: bool = False, autocast=None, shuffle_frames: bool = False,
             ensemble: Optional[str] = None, skip_unreadable: bool = False,
             stop: Optional[Callable[[], bool]] = None) -> Optional[dict]:
    """Scores ``dataset`` across all ranks; every rank gets the same metrics. With
    ``skip_unreadable``, videos that cannot be read are left out of the metrics and listed under
    ``"unreadable"`` (absent when there are none); without, the first one stops the evaluation
    (UnreadableSampleError). ``stop`` (training's stop signal) is asked before each batch: when it
    turns true on any rank, that rank stops scoring and every rank returns None, no metrics. The
    gather of the scores is where they agree, so this costs no collective."""
    was_training = model.training
    model.eval()
    skipped = [] if skip_unreadable else None
    try:
        mine = score_videos(model, dataset, info.rank, info.world_size, info.device, batch_size, workers,
                            multi_label, autocast, shuffle_frames, ensemble, skipped, stop=stop)
    finally:
        model.train(was_training)
    gathered = dist_utils.all_gather_object((mine, skipped or []))
    if any(part is None for part, _ in gathered):
        return None
    metrics = metrics_from_scores([t for part, _ in gathered for t in part], multi_label)
    unreadable = [path for _, path in sorted(s for _, part in gathered for s in part)]
    if unreadable:
        metrics["unreadable"] = unreadable
    return metrics


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="multi-view evaluation of a checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--val-csv", help="pySlowFast list (default: the synthetic task if trained on it)")
    p.add_argument("--data-root", help="class folders ROOT/val/<class>/ (or prefix of CSV paths)")
    p.add_argument("--image-folders", action="store_true")
    add_view_args(p)
    p.add_argument("--shuffle-frames", action="store_true", help="shuffle each view's frames")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave videos / images that cannot be decoded out of the metrics and list them in the "
                        "report (default: the first one is an error naming it)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per batch per rank")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 4, or the CPUs where fewer)")
    p.add_argument("--report", help="JSON report path (default: next to the checkpoint, "
                   "CHECKPOINT_eval[_ema][_shuffled].json; other views or precisions overwrite it)")
    p.set_defaults(func=run)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options of mvit eval and predict that name the model and where it runs."""
    p.add_argument("checkpoint", help="a checkpoint written by `mvit train`, or a run folder (its latest one); "
                   "with --source, weights of another implementation")
    p.add_argument("--source", choices=SOURCES, default="mvit_kernels",
                   help="whose weights: torchvision's, pySlowFast's, facebookresearch/mvit's (these two with "
                        "--preset), timm's or pytorchvideo's (see mvit.convert.from_pretrained)")
    p.add_argument("--preset", help="with --source: the architecture, where the weights do not say it")
    p.add_argument("--ema", action="store_true",
                   help="the EMA weights stored in a `mvit train` checkpoint (those a run with --ema-decay "
                        "validated: its result.json says \"ema\": true)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast (default: the checkpoint's run's --precision; else bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--fused", action="store_true")


def add_view_args(p: argparse.ArgumentParser) -> None:
    """The options of mvit eval and predict that say how inputs become views and how their
    scores combine (checked by :func:`check_view_args`, applied by :func:`mvit.data.eval_views`)."""
    p.add_argument("--test-clips", type=int, default=None,
                   help="videos: temporal views K (default 5, as the MViT papers; segments 1)")
    p.add_argument("--test-crops", type=int, default=None, choices=(1, 3),
                   help="videos: spatial views (default 1, as the MViT papers; 3 for MViTv2-L 40x3 and segments)")
    p.add_argument("--sampling-rate", type=int, default=None,
                   help="videos: default the run's, else the model's (4 for 16x4, 3 for 32x3)")
    p.add_argument("--temporal-sampling", choices=TEMPORAL_SAMPLING, default=None,
                   help="videos: default the run's, else 'stride'; 'segments' (Something-Something) tests 1 clip "
                        "x 3 crops by default")
    p.add_argument("--target-fps", type=finite_float, default=None, help="videos: default the run's, else 30")
    p.add_argument("--orientation", choices=ORIENTATIONS, default=None,
                   help="files stored sideways that ask to be shown turned (a phone video's display matrix, a "
                        "photo's EXIF orientation): read as 'stored' (the reference pipelines; mvit eval's default: "
                        "the run's, else stored) or as players 'display' them (mvit predict's default)")
    p.add_argument("--crop-fraction", type=finite_float, default=None,
                   help="images: the centre crop's share of the resized short side (default 0.875, as "
                        "facebookresearch/mvit; timm evaluates the same weights at 0.9)")
    for name, what in (("mean", "0.406 0.456 0.485"), ("std", "0.225 0.224 0.229")):
        p.add_argument(f"--input-{name}", type=finite_float, nargs=3, metavar=("R", "G", "B"), default=None,
                       help=f"the input normalization's {name} the weights expect, where their config does not "
                            f"say it (default: the model's; pySlowFast's SSv2 MViTv2-L weights need {what})")
    p.add_argument("--ensemble", choices=ENSEMBLES, default=None,
                   help="how a video's views combine: the mean of their softmax (default, single-label) or each "
                        "class's largest sigmoid (default for multi-label, as pySlowFast's Charades configs)")


def run(args: argparse.Namespace) -> int:
    dist_utils.run_guarded(lambda: main(args))
    return 0


def check_view_args(args: argparse.Namespace, *more: tuple) -> None:
    """The view options mvit eval and predict share (and ``more`` (option, value, minimum)):
    an impossible value is an error naming the option."""
    for name, value, lo in (("--test-clips", args.test_clips, 1), ("--sampling-rate", args.sampling_rate, 1),
                            *more):
        if value is not None and value < lo:
            raise ValueError(f"{name} must be >= {lo}, got {value}")
    if args.target_fps is not None and not args.target_fps > 0:
        raise ValueError(f"--target-fps must be > 0, got {args.target_fps}")


def main(args: argparse.Namespace) -> dict:
    check_view_args(args, ("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0))
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    if args.source != "mvit_kernels" and not (args.val_csv or args.data_root):
        # Their labels are the class indices they were trained with: a --val-csv of those, or class
        # folders whose sorted names give the same order (ImageNet's synset folders do).
        raise ValueError(f"give --val-csv or --data-root to evaluate --source {args.source} weights")
    model, state = load_model(args)
    info = dist_utils.init(args.device)
    if state.get("ema") and not args.ema and info.is_main:
        # its run validated (and reported) the EMA weights: without this these numbers differ silently
        print("note: the checkpoint also holds EMA weights, which its run validated: --ema evaluates those",
              file=sys.stderr)
    return _score(args, model, state, info)


def load_model(args: argparse.Namespace):
    """The model ``args`` name (``checkpoint``, ``source``, ``preset``, ``ema``, ``fused``) and
    its state: a checkpoint of `mvit train` (or a run folder: its latest), with its run's
    ``args``, ``recipe`` and ``classes``; with ``--source``, another implementation's weights,
    converted as :func:`mvit.convert.from_pretrained` does. ``args.checkpoint`` becomes the file
    read. Returns (model, state); the state holds at least ``model_config``, with the input
    normalization of ``args.input_mean`` / ``args.input_std`` where given."""
    model, state = _load_model(args)
    return model, with_normalization(state, args)


def with_normalization(state: dict, args: argparse.Namespace) -> dict:
    """``state`` with its model config taking ``args.input_mean`` / ``args.input_std`` where given."""
    mean, std = getattr(args, "input_mean", None), getattr(args, "input_std", None)
    if (mean is None) != (std is None):
        raise ValueError("--input-mean and --input-std go together: give both")
    if mean is None:
        return state
    cfg = state["model_config"].replace(input_mean=tuple(mean), input_std=tuple(std))
    cfg.validate()
    return dict(state, model_config=cfg)


def _load_model(args: argparse.Namespace):
    from . import MViT
    from .training import checkpoint as ckpt

    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    if args.source != "mvit_kernels":
        from .convert import from_pretrained

        if args.ema:
            raise ValueError("--ema reads the EMA weights of a checkpoint of `mvit train`, not --source weights")
        if os.path.isdir(args.checkpoint):
            raise ValueError(f"--source {args.source} needs a weights file, got the folder {args.checkpoint}")
        model = from_pretrained(args.checkpoint, source=args.source, preset=args.preset, fused=args.fused)
        return model, {"model_config": model.cfg}
    if args.preset:
        raise ValueError("--preset goes with --source: a checkpoint of `mvit train` holds its model's config")
    args.checkpoint, state = ckpt.load_file_or_run(args.checkpoint, "")
    model = MViT(state["model_config"], fused=args.fused)
    if args.ema:
        if not state.get("ema"):
            raise ValueError("--ema: the checkpoint holds no EMA weights")
        model.load_state_dict(state["ema"])
    else:
        model.load_state_dict(state["model"])
    return model, state


def scoring_precision(args: argparse.Namespace, state: dict) -> str:
    """--precision, or with ``auto`` the one the checkpoint's run trained and validated at (its
    result.json's numbers come from that autocast: a bf16 run scored again in fp32 could differ)."""
    if args.precision != "auto":
        return args.precision
    return (state.get("args") or {}).get("precision") or "auto"


def _score(args: argparse.Namespace, model, state: dict, info) -> dict:
    """Evaluate ``model`` on the data the arguments (and the checkpoint's run) name, write the report."""
    from .data import build_eval_dataset
    from .train import _autocast

    model.to(info.device).eval()
    dataset, multi_label, workers = build_eval_dataset(args, state)
    # the precision scored at: a run trained with "auto" resolves here, on this device
    autocast, precision = _autocast(info.device, scoring_precision(args, state))
    ensemble = args.ensemble or default_ensemble(multi_label)
    metrics = evaluate(model, dataset, info, args.batch_size, workers, multi_label, autocast, args.shuffle_frames,
                       ensemble, args.skip_unreadable)
    if metrics.get("unreadable") and info.is_main:
        print(f"note: {len(metrics['unreadable'])} unreadable file(s) left out of the metrics (--skip-unreadable; "
              f"listed in the report)", file=sys.stderr)
    report = {"checkpoint": os.path.abspath(args.checkpoint), "shuffle_frames": args.shuffle_frames,
              "ema": args.ema, "views_per_video": getattr(dataset, "views_per_video", 1), "ensemble": ensemble,
              "precision": precision,
              **metrics}
    if args.source != "mvit_kernels":
        report.update(source=args.source, model=model.cfg.name)
    if info.is_main:
        # the EMA's and the shuffled-frame scores get files of their own beside the plain one
        path = args.report or (os.path.splitext(args.checkpoint)[0] + "_eval" + ("_ema" if args.ema else "")
                               + ("_shuffled" if args.shuffle_frames else "") + ".json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps(report))
    dist_utils.cleanup()
    return report
