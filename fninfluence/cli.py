"""The ``fninfluence`` command line (also ``python -m fninfluence``).

* ``fninfluence demo``: the README's job on scikit-learn's digits, written to a store and a PNG;
* ``fninfluence inspect STORE``: what a factors or scores store (or a folder of stores) holds;
* ``fninfluence top STORE --query I -k K``: a query's top proponents and opponents from a scores store.

``inspect`` and ``top`` read JSON and Zarr arrays only; they never import or run the user's code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, List, Optional

from .curvature import ESTIMATORS
from .errors import InfluenceError
from .version import __version__


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
    demo.add_argument("--out", default="fninfluence-demo", metavar="DIR",
                      help="folder for the factors and scores stores and influence.png (default: ./fninfluence-demo)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.add_argument("--quiet", action="store_true", help="hide the per-phase summaries (examples, time, memory)")

    inspect = commands.add_parser(
        "inspect", help="show what a store holds: factors, strategy, arguments, partitions, score shapes",
        description="Describe an fninfluence store (factors or scores, complete or not), or every store inside a "
                    "folder (e.g. the demo's output or a Kronfluence-compatible analysis folder).",
    )
    inspect.add_argument("store", metavar="STORE", help="a store, or a folder that contains stores")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")

    top = commands.add_parser(
        "top", help="list a query's top proponents and opponents from a scores store",
        description="Rank the training examples of a pairwise scores store for one query (or of a self-influence "
                    "store). Entries not computed yet (an incomplete store) are left out.",
    )
    top.add_argument("store", metavar="STORE", help="a scores store, or a folder that holds exactly one")
    top.add_argument("--query", "-q", type=int, default=0, metavar="I", help="query row (default: 0)")
    top.add_argument("-k", type=_positive_int, default=10, metavar="K", help="how many of each to list (default: 10)")
    return parser


@contextlib.contextmanager
def _phase_summaries(enabled: bool) -> Iterator[None]:
    """Show the ``fninfluence`` logger's INFO records (per-phase summaries) on stderr while the command runs."""
    log = logging.getLogger("fninfluence")
    if not enabled:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fninfluence: %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _described(path: Path) -> dict:
    """``describe(path)`` with its text, or an ``unreadable`` entry saying why: one odd store never stops a scan."""
    from .store.describe import describe, format_description

    try:
        info = describe(path)
        return {**info, "text": format_description(info)}
    except InfluenceError as error:
        message = str(error)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OSError) as error:
        message = f"{path}: its metadata is odd ({type(error).__name__}: {error}); it was damaged or not written by " \
                  "fninfluence."
    return {"path": str(path), "kind": "unreadable", "error": message,
            "text": f"{path}: unreadable store\n  {message}"}


def _inspect(args) -> int:
    from .store.describe import find_stores

    stores = find_stores(Path(args.store))
    if not stores:
        raise InfluenceError(f"{args.store} is not an fninfluence store and holds none (searched 3 folders deep).")
    infos = [_described(path) for path in stores]
    texts = [info.pop("text") for info in infos]
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
    else:
        print("\n\n".join(texts))
    bad = [info["path"] for info in infos if info["kind"] == "unreadable"]
    if bad:
        print(f"fninfluence inspect: error: {len(bad)} of {len(infos)} stores could not be read: {', '.join(bad)}",
              file=sys.stderr)
        return 1
    return 0


def _scores_store(path: Path) -> Path:
    from .store.describe import find_stores

    infos = {p: _described(p) for p in find_stores(path)}
    scores = [p for p, info in infos.items() if info["kind"] in ("pairwise", "self")]
    unreadable = [info for info in infos.values() if info["kind"] == "unreadable"]
    if len(scores) != 1:
        found = ", ".join(f"{p} ({info['kind']})" for p, info in infos.items()) or "no store at all"
        why = "".join(f"\n  {info['error']}" for info in unreadable)
        raise InfluenceError(f"`top` ranks the examples of one pairwise or self-influence scores store, and {path} "
                             f"holds {len(scores)} of them; found: {found}. Pass the path of a scores store.{why}")
    for info in unreadable:
        print(f"fninfluence top: skipped an unreadable store: {info['error']}", file=sys.stderr)
    return scores[0]


def _top(args) -> int:
    import torch

    from .ranking import top_indices
    from .store.describe import read_ranked_scores

    path = _scores_store(Path(args.store))
    header, scores = read_ranked_scores(path)
    self_scores = header["kind"] == "self"
    if self_scores and args.query != 0:
        raise InfluenceError(f"{path} holds self-influence scores (one per training example): drop --query.")
    if not 0 <= args.query < scores.shape[0]:
        raise InfluenceError(f"--query must be between 0 and {scores.shape[0] - 1} for {path}, got {args.query}.")
    row = scores[args.query:args.query + 1]
    written = int(torch.isfinite(row).sum())
    if written == 0:
        raise InfluenceError(f"{path} has no scores for query {args.query} yet: rerun the computation to fill it.")
    k = min(args.k, written)
    proponents, opponents = top_indices(row, k)
    what = "self-influence" if self_scores else f"query {args.query} of {scores.shape[0]}"
    print(f"{path}: {header['kind']} scores {header['shape']}, {what}"
          + (f"; {row.shape[1] - written} of {row.shape[1]} training examples not computed yet" if written < row.shape[1]
             else ""))
    if self_scores:
        titles = ("highest self-influence (unusual or hard examples)", "lowest self-influence")
    else:
        titles = ("proponents (score > 0: upweighting the example lowers the query's measurement, it helps)",
                  "opponents (score < 0: it raises the measurement, it hurts)")
    for title, picked in zip(titles, (proponents[0], opponents[0])):
        print(f"top {k} {title}:")
        for rank, n in enumerate(picked.tolist(), start=1):
            print(f"  {rank:>3d}  train #{n:<7d} score {float(row[0, n]):+.4e}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in ("inspect", "top"):
        try:
            return _inspect(args) if args.command == "inspect" else _top(args)
        except InfluenceError as error:
            print(f"fninfluence {args.command}: error: {error}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            sys.stdout = open(os.devnull, "w")
            return 1
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OSError, RuntimeError) as error:
            # a store damaged in a way no check foresaw (zarr's own decoding errors among them): say so, no traceback
            print(f"fninfluence {args.command}: error: {args.store} could not be read ({type(error).__name__}: "
                  f"{error}); it may be damaged or truncated: `fninfluence inspect` shows what it holds, and rerunning "
                  "the computation that wrote it recomputes damaged cells.", file=sys.stderr)
            return 1
    if args.command == "demo":
        from .demo import DemoArgumentError, run_demo

        try:
            with _phase_summaries(not args.quiet):
                run_demo(strategy=args.strategy, num_queries=args.queries, top_k=args.top_k, seed=args.seed,
                         progress=not args.no_progress, out=args.out)
        except (ImportError, DemoArgumentError, InfluenceError) as error:
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
