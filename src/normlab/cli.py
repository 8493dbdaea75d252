"""The ``normlab`` command line: ``normlab demo`` (later: ``report``, ``bench``)."""

from __future__ import annotations

import argparse
import sys

import normlab


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab",
        description="Layer, batch, RMS, group and instance normalization for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"normlab {normlab.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "demo",
        help="LayerNorm and BatchNorm on a 4x6 batch, side by side, with the statistics used",
        description="Print LayerNorm and BatchNorm outputs for a 4 samples x 6 features batch, "
        "with the mean and standard deviation each norm used.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from normlab.lab import demo

        return demo.main()
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
