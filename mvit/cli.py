"""The ``mvit`` command (also ``python -m mvit``).

Each subcommand lives in its own module, which provides ``add_parser(subparsers)`` registering
itself with ``set_defaults(func=...)``; this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        # Bad arguments and missing files are the user's to fix: one line, no traceback.
        print(f"mvit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
