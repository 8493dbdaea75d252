"""The ``normlab`` command line: ``normlab report`` (the lab), ``normlab bench`` (speed) and
``normlab demo``."""

from __future__ import annotations

import argparse
import sys

import normlab
from normlab.bench.options import add_arguments as add_bench_arguments


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
    report = commands.add_parser(
        "report",
        help="test every claim of the LN-vs-BN article with experiments, verdicts and plots",
        description="Run the lab's experiments and write report.html (self-contained), "
        "report.md and results.json.",
    )
    report.add_argument(
        "--profile",
        choices=("quick", "full", "smoke"),
        default="quick",
        help="quick: a preview, about 4 minutes on 2 CPU cores, whose training claims may "
        "answer 'inconclusive' (default); full: 5 seeds and longer training, about 43 "
        "minutes (docs/lab holds its report); smoke: toy sizes",
    )
    report.add_argument(
        "--only", default=None, help="comma-separated experiments, e.g. padding,batch-size"
    )
    report.add_argument("--out", default="normlab-report", help="output folder")
    report.add_argument("--seed", type=int, default=0, help="base seed (runs are deterministic)")
    report.add_argument(
        "--resume",
        action="store_true",
        help="keep the claims an interrupted run of the same profile and seed finished in "
        "--out and run the others (the report says which were kept)",
    )
    report.add_argument(
        "--rerun",
        default=None,
        help="with --resume: comma-separated experiments to run again even if recorded, "
        "e.g. after a change to their schedule (the report says which ran again)",
    )
    bench = commands.add_parser(
        "bench",
        help="time the norms against torch eager, torch.compile and a memory copy",
        description="Time normlab's norms (auto, composite and numba backends) against torch "
        "eager, torch.compile and a memory copy of the same bytes, forward and backward, with "
        "glibc's default allocation and with freed memory retained; print tables, write JSON.",
    )
    add_bench_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from normlab.lab import demo

        return demo.main()
    if args.command == "report":
        from normlab.lab import main as lab_main

        only = None if args.only is None else args.only.split(",")
        rerun = () if args.rerun is None else tuple(args.rerun.split(","))
        if rerun and not args.resume:
            parser.error("--rerun needs --resume (without it every claim runs)")
        return lab_main.main(args.profile, only, args.out, args.seed, args.resume, rerun)
    if args.command == "bench":
        from normlab.bench import run_from_args

        words = list(sys.argv[1:] if argv is None else argv)
        words.remove("bench")  # the rest is the bench's own command line, for the record
        return run_from_args(args, words)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
