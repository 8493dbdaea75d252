"""``normlab bench``: normlab's norms against torch eager, torch.compile and a memory copy.

For each op of the grid (``cases``), forward and backward, float32 on the CPU, in two
allocation environments (``environment``): median time and spread (``timing``), GB/s under
the minimal-traffic model (``traffic``), and ratios to a copy of the same bytes, to torch
eager and to torch.compile (``ratios``); normlab runs with the "auto" backend and forced
"composite" and "numba" backends. Prints rich tables (``table``), writes JSON. On a CUDA
device (``--device``, default: CUDA when present) the GPU grid, float32 and bfloat16, with
the "triton" backend in place of "numba" and CUDA-event timing (``gpu``).

Run ``normlab bench --help`` (or ``python -m normlab.bench``); in Python, ``run(settings)``
measures with subprocesses and ``measure.measure_mode`` measures in this process.
"""

from __future__ import annotations

import argparse
import sys

from normlab.bench.options import Settings, add_arguments, settings_from

__all__ = ["Settings", "add_arguments", "build_parser", "main", "run", "run_from_args"]


def run(settings: Settings, console=None) -> dict:
    """Measure, print the tables, write the results; returns the report."""
    from normlab.bench import runner

    return runner.run(settings, console)


def build_parser(prog: str = "python -m normlab.bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Time normlab's norms against torch eager, torch.compile and a memory "
        "copy, forward and backward, in two allocation environments; print tables, write "
        "JSON.",
    )
    add_arguments(parser)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return parser


def run_from_args(args: argparse.Namespace, argv: list[str]) -> int:
    """Run what parsed options ask for (a measuring subprocess with ``--worker``)."""
    settings = settings_from(args, argv)
    if getattr(args, "worker", None):
        from normlab.bench import runner

        return runner.run_worker(args.worker, settings, args.worker_out)
    run(settings)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_from_args(build_parser().parse_args(argv), argv)
