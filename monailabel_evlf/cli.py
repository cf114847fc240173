"""The ``evlf`` command. Each area of the library registers its own sub-commands; imports stay lazy so
``evlf --help`` answers without loading torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from monailabel_evlf.errors import BackendUnavailable

# module -> function ``register(subparsers)`` adding its sub-commands (each sets ``func=callable(args) -> int``)
COMMAND_MODULES: tuple[str, ...] = (
    "monailabel_evlf.app.commands",
    "monailabel_evlf.data.commands",
    "monailabel_evlf.model.commands",
    "monailabel_evlf.training.commands",
)
# ``evlf bench <name>``: same contract, registered under the ``bench`` group
BENCH_MODULES: tuple[str, ...] = (
    "monailabel_evlf.app.bench",
    "monailabel_evlf.training.learning_loop",
    "monailabel_evlf.training.detector_bench",
)


def _register_all(subparsers: argparse._SubParsersAction, modules: Sequence[str]) -> None:
    for name in modules:
        importlib.import_module(name).register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evlf", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _register_all(subparsers, COMMAND_MODULES)
    bench = subparsers.add_parser("bench", help="benchmarks (speed, learning loop, detector)")
    _register_all(bench.add_subparsers(dest="bench", required=True), BENCH_MODULES)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, BackendUnavailable) as exc:
        print(f"evlf: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
