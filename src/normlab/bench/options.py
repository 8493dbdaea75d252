"""The bench's options, shared by ``python -m normlab.bench`` and ``normlab bench``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from normlab.bench import gpu
from normlab.bench.cases import GRIDS, OPS

PROFILES = {
    # profile: (grid, repetitions, warm-up rounds); every contender's first call (timed
    # separately) comes before these rounds, so one warm-up round suffices.
    "default": ("default", 11, 1),
    "quick": ("quick", 4, 1),
}
GPU_GRIDS = {"default": "gpu", "quick": "gpu-quick"}  # the profiles' grids on CUDA


@dataclass
class Settings:
    """What to run and how. ``only=None``: every op of the grid."""

    grid: str = "default"
    only: list[str] | None = None
    repetitions: int = 11
    warmup: int = 1
    threads: int | None = None
    alloc: str = "both"
    compile: bool = True
    fold: bool = True  # also time fold_batchnorm on a small CNN and an MLP
    models: bool = True  # also time whole models, converted vs not (bench.models)
    device: str = "cpu"  # "cpu" or "cuda" (normlab.bench.gpu)
    seed: int = 0
    json_path: str | None = "bench.json"
    markdown_path: str | None = None
    command: list[str] = field(default_factory=list)

    def allocation_modes(self) -> list[str]:
        if self.device == "cuda":
            return ["default"]  # glibc's tunables do not touch device memory
        return ["default", "retained"] if self.alloc == "both" else [self.alloc]

    def child_arguments(self) -> list[str]:
        """The options that reproduce these settings in a measuring subprocess."""
        args = ["--grid", self.grid, "--reps", str(self.repetitions)]
        args += ["--warmup", str(self.warmup), "--seed", str(self.seed)]
        args += ["--device", self.device]
        if self.only is not None:
            args += ["--only", ",".join(self.only)]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        if not self.compile:
            args.append("--no-compile")
        return args


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _ops(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in OPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown op(s) {unknown or [text]}; choose from {', '.join(OPS)}"
        )
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench's options to ``parser``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one shape per op and variant, 4 repetitions (about 2 minutes on 2 idle cores)",
    )
    parser.add_argument(
        "--only",
        type=_ops,
        default=None,
        metavar="OPS",
        help=f"comma-separated ops to run, from: {', '.join(OPS)}",
    )
    parser.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch.set_num_threads(N) in the measuring processes (default: torch's choice)",
    )
    parser.add_argument(
        "--alloc",
        choices=("default", "retained", "both"),
        default="both",
        help="allocation environment(s): glibc defaults, freed memory retained, or both (default)",
    )
    parser.add_argument(
        "--json", default="bench.json", metavar="PATH", help="where to write the results"
    )
    parser.add_argument(
        "--markdown", default=None, metavar="PATH", help="also write the tables as Markdown"
    )
    parser.add_argument(
        "--grid",
        choices=sorted(GRIDS),
        default=None,
        help="shape grid (default: the profile's; toy: tiny shapes, for tests)",
    )
    parser.add_argument(
        "--reps", type=_positive, default=None, help="timed repetitions per contender"
    )
    parser.add_argument(
        "--warmup", type=_count, default=None, help="untimed warm-up rounds before them"
    )
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip the torch.compile contenders (their compile time dominates short runs)",
    )
    parser.add_argument(
        "--no-fold",
        dest="fold",
        action="store_false",
        help="skip the fold_batchnorm inference timing (small CNN and MLP)",
    )
    parser.add_argument(
        "--no-models",
        dest="models",
        action="store_false",
        help="skip the whole-model timing (Hugging Face Llama and BERT, a ConvNeXt-style CNN, "
        "each converted with normlab.convert against itself unconverted)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run (default: cuda when a GPU is present). On cuda: the 'gpu' grid "
        "(32768 rows x 1024..262144 features, float32 and bfloat16; --quick: 'gpu-quick'), "
        "normlab's 'triton' backend, CUDA-event timing, one allocation mode, and cases that "
        "do not fit in device memory skipped with the reason",
    )
    parser.add_argument("--seed", type=int, default=0, help="inputs and contender order")


def settings_from(args: argparse.Namespace, command: list[str] | None = None) -> Settings:
    """Settings from parsed options: the profile's grid and counts, overridden where given."""
    profile = "quick" if args.quick else "default"
    grid, repetitions, warmup = PROFILES[profile]
    device = gpu.resolve_device(getattr(args, "device", "auto"))
    if device == "cuda":
        grid = GPU_GRIDS[profile]
    return Settings(
        grid=args.grid or grid,
        only=args.only,
        repetitions=args.reps or repetitions,
        warmup=warmup if args.warmup is None else args.warmup,
        threads=args.threads,
        alloc=args.alloc,
        compile=args.compile,
        fold=args.fold and device == "cpu",  # the fold timing is a CPU model
        models=args.models and device == "cpu",  # so is the whole-model timing, for now
        device=device,
        seed=args.seed,
        json_path=args.json,
        markdown_path=args.markdown,
        command=list(command or []),
    )
