"""``mvit predict``: classify video and image files with a trained or published model.

Each file is scored as ``mvit eval`` scores it (a video: the average of the softmax over its test
views, by default the MViT papers' 5 clips x 1 crop; an image: its centre crop) and its top
classes are printed, named by, in order: ``--labels`` (one name per line, in class order), the
class names a `mvit train` run stored, or for torchvision's weights their Kinetics-400 names and
for the ImageNet weights of timm and facebookresearch/mvit the ImageNet-1k names. Otherwise the
class index is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterable
from typing import Optional

import torch

from .evaluate import add_model_args, add_view_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="top classes of video / image files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("inputs", nargs="+", metavar="FILE", help="videos or images")
    p.add_argument("--labels", help="class names, one per line in class order; or JSON: a list of names, or "
                   "{name: number} (Something-Something v2's labels file)")
    p.add_argument("--top-k", type=int, default=5)
    add_view_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per file instead of text")
    # a phone's portrait video or photo is stored sideways: scored as stored, it is scored on its side
    p.set_defaults(func=run, orientation="display")


def class_names(args: argparse.Namespace, state: dict) -> Optional[list[str]]:
    """Names for the model's classes, or None (see the module docstring for the order)."""
    num_classes = state["model_config"].num_classes
    if args.labels:
        if not os.path.isfile(args.labels):
            raise FileNotFoundError(f"--labels not found: {args.labels}")
        try:
            with open(args.labels, encoding="utf-8") as f:
                if args.labels.endswith(".json"):  # a list of names, or {name: number} as Something-Something's
                    loaded = json.load(f)
                    names = ([n for n, _ in sorted(loaded.items(), key=lambda kv: int(kv[1]))]
                             if isinstance(loaded, dict) else [str(n) for n in loaded])
                else:
                    names = [line.strip() for line in f if line.strip()]
        except (ValueError, TypeError, AttributeError) as exc:  # not UTF-8 text, or not JSON of names
            raise ValueError(f"--labels {args.labels} is not a list of class names, one per line, or a JSON "
                             f"list or {{name: number}} ({type(exc).__name__}: {exc})") from None
        if len(names) != num_classes:
            raise ValueError(f"--labels {args.labels} names {len(names)} classes; the model has {num_classes}")
        return names
    if state.get("classes"):
        return list(state["classes"])
    from torchvision.models import _meta

    if args.source == "torchvision" and num_classes == len(_meta._KINETICS400_CATEGORIES):
        return list(_meta._KINETICS400_CATEGORIES)
    if args.source in ("timm", "mvit") and num_classes == len(_meta._IMAGENET_CATEGORIES):
        return list(_meta._IMAGENET_CATEGORIES)
    return None


def run(args: argparse.Namespace) -> int:
    main(args)
    return 0


def main(args: argparse.Namespace) -> list[dict]:
    from .evaluate import load_model
    from .training import distributed as dist_utils

    kinds = _input_kinds(args)
    model, state = load_model(args)
    info = dist_utils.init(args.device)
    results = _score(args, model, state, kinds, info.device, show=True)
    dist_utils.cleanup()
    return results


class _RaisingParser(argparse.ArgumentParser):
    """A parser whose errors raise ValueError (a Python call must not exit the interpreter)."""

    def error(self, message):
        raise ValueError(message)


def predict(model, inputs, labels=None, **options) -> list[dict]:
    """Python form of ``mvit predict``: the top classes of video / image files, scored as ``mvit
    eval`` scores them (the model's test views, decoding, sampling and normalization).

    model: a :class:`mvit.MViT` (it stays on its device unless ``device`` is given), a checkpoint
    or run folder of ``mvit train``, or another implementation's weights file with ``source=``.
    inputs: a path or a list of paths. labels: class names (a list), or a file of them as
    ``--labels`` takes. options: the command's other flags by name, ``top_k=5``,
    ``test_clips=10``, ``source="timm"``, ``input_mean=(0.406, 0.456, 0.485)``, ... (see ``mvit
    predict --help``), checked as the command checks them.

    Returns one dict per input: ``{"input": path, "views": n, "top": [{"class": i, "label": name
    or None, "prob": p}, ...]}``. Unlike the command, it prints nothing and leaves any process
    group alone.
    """
    from . import MViT
    from .evaluate import load_model, with_normalization
    from .training.distributed import parse_device

    given = isinstance(model, MViT)
    if not given and not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be an MViT or the path of a checkpoint or run folder, got {type(model).__name__}")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    elif isinstance(inputs, Iterable) and not isinstance(inputs, torch.Tensor):
        inputs = list(inputs)
    if not isinstance(inputs, list):
        raise TypeError(f"inputs must be a path or a list of paths (of video or image files), got "
                        f"{type(inputs).__name__}")
    for i, path in enumerate(inputs):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"inputs[{i}] must be a path (of a video or image file), got {type(path).__name__}")
    if not inputs:
        raise ValueError("inputs: give at least one file")
    argv = ["predict", "unused" if given else os.fspath(model), *map(os.fspath, inputs)]
    names = None
    if labels is not None and not isinstance(labels, (str, os.PathLike)):
        names = [str(n) for n in labels]
    elif labels is not None:
        argv += ["--labels", os.fspath(labels)]
    parser = _RaisingParser(prog="mvit")
    add_parser(parser.add_subparsers())
    # the flags by name; labels is predict()'s own argument, so never among the options
    known = set(vars(parser.parse_args(["predict", "model", "input"]))) - {"inputs", "checkpoint", "json", "func"}
    for key, value in options.items():
        if key not in known:
            raise TypeError(f"predict() got an unexpected keyword argument {key!r}")
        if value is None or value is False:  # the flag's default
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    try:
        args = parser.parse_args(argv)
    except ValueError as exc:
        raise ValueError(f"predict(): {exc}") from None
    kinds = _input_kinds(args)
    if given:
        for flag in ("source", "preset", "ema", "fused"):
            if options.get(flag):
                raise ValueError(f"predict(): {flag}= reads weights from a file; the model is given")
        state = with_normalization({"model_config": model.cfg}, args)
        device = next(model.parameters()).device if "device" not in options else parse_device(args.device)
    else:
        model, state = load_model(args)
        device = parse_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if names is not None:
        if len(names) != state["model_config"].num_classes:
            raise ValueError(f"predict(): labels names {len(names)} classes; the model has "
                             f"{state['model_config'].num_classes}")
        state = dict(state, classes=names)
    return _score(args, model, state, kinds, device, show=False)


def _input_kinds(args: argparse.Namespace) -> list[bool]:
    """Whether each input is an image (else a video); missing files and unknown kinds are errors."""
    from .data.image import IMAGE_EXTENSIONS
    from .data.video import VIDEO_EXTENSIONS
    from .evaluate import check_view_args

    check_view_args(args, ("--top-k", args.top_k, 1))
    kinds = []
    for path in args.inputs:
        if os.path.isdir(path):
            raise ValueError(f"input {path} is a folder: give the video or image files in it")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input not found: {path}")
        ext = os.path.splitext(path)[1].lower()
        if ext not in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
            raise ValueError(f"{path}: not a video ({', '.join(VIDEO_EXTENSIONS)}) or image "
                             f"({', '.join(IMAGE_EXTENSIONS)}) file name")
        kinds.append(ext in IMAGE_EXTENSIONS)
    return kinds


def _score(args: argparse.Namespace, model, state: dict, kinds: list[bool], device: torch.device,
           show: bool) -> list[dict]:
    cfg = state["model_config"]
    if cfg.patch_2d and not all(kinds):
        raise ValueError(f"{cfg.name} is an image model: {args.inputs[kinds.index(False)]} is a video")
    if not cfg.patch_2d and any(kinds):
        # allowed (a still clip), but far from the clips the model was trained on: say so
        note = f"{cfg.name} is a video model: {args.inputs[kinds.index(True)]} is scored as a one-frame clip"
        if show:
            print(f"note: {note}", file=sys.stderr)
        else:
            warnings.warn(note)
    names = class_names(args, state)
    training = model.training  # a model given to predict() is left as it came
    model.to(device).eval()
    try:
        return _score_each(args, model, state, kinds, device, names, show)
    finally:
        model.train(training)


def _score_each(args, model, state, kinds, device, names, show) -> list[dict]:
    from .data import eval_views
    from .data.video import UnreadableSampleError
    from .evaluate import aggregate_views, scoring_precision
    from .train import _autocast

    autocast, _ = _autocast(device, scoring_precision(args, state))
    results = []
    for path, image in zip(args.inputs, kinds):
        dataset = eval_views(args, state, [(path, 0)], image)
        try:
            views, _ = dataset[0]  # test views: an unreadable file raises, it is never replaced
        except Exception as exc:  # the decoders' many error types
            cause = exc.__cause__ if isinstance(exc, UnreadableSampleError) else exc
            raise ValueError(f"cannot read {path}: {cause}") from None
        with torch.no_grad(), (autocast or contextlib.nullcontext)():
            logits = model(views.to(device))
        probs = aggregate_views(logits[None], dataset.multi_label, args.ensemble)[0].cpu()
        top = probs.topk(min(args.top_k, probs.numel()))
        ranked = [{"class": int(i), "label": names[int(i)] if names else None, "prob": float(p)}
                  for p, i in zip(top.values, top.indices)]
        results.append({"input": path, "views": views.shape[0], "top": ranked})
        if show:
            _print(results[-1], args.json)
    return results


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    print(result["input"])
    for row in result["top"]:
        name = row["label"] if row["label"] is not None else f"class {row['class']}"
        print(f"  {row['prob']:.4f}  {name}")
    sys.stdout.flush()

