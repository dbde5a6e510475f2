"""The ``fninfluence`` command line: ``fninfluence demo`` (also ``python -m fninfluence demo``)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import __version__
from .curvature import ESTIMATORS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fninfluence",
        description="Influence functions for PyTorch models, built from pure functions.",
    )
    parser.add_argument("--version", action="version", version=f"fninfluence {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train a small MLP on scikit-learn's digits and show the most influential training images",
        description="Train a small MLP on scikit-learn's bundled digits (no download; needs scikit-learn), fit "
                    "curvature factors, and print the top proponents and opponents of a few test images.",
    )
    demo.add_argument("--strategy", default="ekfac", choices=sorted(ESTIMATORS),
                      help="curvature estimator (default: ekfac)")
    demo.add_argument("--queries", type=_positive_int, default=3, metavar="Q",
                      help="number of test images to explain (default: 3)")
    demo.add_argument("--top-k", type=_positive_int, default=5, metavar="K",
                      help="proponents and opponents to list per query (default: 5)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        from .demo import DemoArgumentError, run_demo

        try:
            run_demo(strategy=args.strategy, num_queries=args.queries, top_k=args.top_k, seed=args.seed,
                     progress=not args.no_progress)
        except (ImportError, DemoArgumentError) as error:
            print(f"fninfluence demo: error: {error}", file=sys.stderr)
            return 1
        except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
            sys.stdout = open(os.devnull, "w")
            return 1
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
