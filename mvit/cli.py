"""The ``mvit`` command (also ``python -m mvit``).

Each subcommand lives in its own module, which provides ``add_parser(subparsers)`` registering
itself with ``set_defaults(func=...)``; this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from typing import Optional, Sequence

# module paths of the subcommands, in the order `mvit --help` shows them
SUBCOMMANDS = ("mvit.flops", "mvit.train", "mvit.evaluate", "mvit.predict")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvit", description="Multiscale Vision Transformers: train, evaluate, predict, count FLOPs."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def finite_float(text: str) -> float:
    """argparse type of every float option: ``inf`` and ``nan`` parse as floats but no option can
    use them (an infinite LR trained a NaN model to the end and reported success)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _one_line(exc: BaseException) -> str:
    """The message of an error raised in a DataLoader worker without the worker's traceback,
    which the loader puts into the message it raises again in the main process."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]  # "module.ErrorType: message"
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, OSError) as exc:
        # Bad arguments and unusable files (missing, unreadable, a folder where a file is due)
        # are the user's to fix: one line, no traceback.
        print(f"mvit {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
