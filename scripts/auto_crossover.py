"""Where "auto" should switch from torch's own op (the "torch" family) to the Numba kernels:
per norm and size, the median time of a call on each family, forced, through the public
modules (their per-call plans included), inference and a training step (forward, backward),
timed interleaved. What ``normlab.backends.AUTO_TORCH_ELEMENTS`` is set from.

    python scripts/auto_crossover.py [--threads 2] [--rounds 9]

Prints one row per (norm, shape): the two families' medians in microseconds and
torch / numba (above 1: the kernels are faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import normlab
from normlab import backends

ROWS = [(8, 1024), (64, 1024), (128, 1024), (256, 1024), (1024, 1024), (2048, 1024)]
ROWS += [(512, 4096), (4096, 1024), (8192, 1024)]
IMAGES = [(1, 256, 14, 14), (1, 320, 32, 32), (2, 256, 32, 32), (4, 256, 32, 32)]
IMAGES += [(8, 256, 32, 32), (16, 256, 32, 32)]
SHAPES = {"LayerNorm": ROWS, "RMSNorm": ROWS, "GroupNorm": IMAGES, "InstanceNorm2d": IMAGES}


def _module(name: str, shape) -> torch.nn.Module:
    if name == "GroupNorm":
        return normlab.GroupNorm(32, shape[1])
    if name == "InstanceNorm2d":
        return normlab.InstanceNorm2d(shape[1], affine=True)
    return getattr(normlab, name)(shape[-1])


def _forced(family: str, fn):
    def run():
        with backends.use(family):
            fn()

    return run


def _medians(runners: dict, calls: int, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():  # warm-up: compile, plan
        for _ in range(3):
            run()
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, medians of {args.rounds} rounds")
    print(
        f"{'norm':15s} {'shape':18s} {'elements':>9s}  inference torch/numba us (ratio)"
        "   training torch/numba us (ratio)"
    )
    for name, shapes in SHAPES.items():
        for shape in shapes:
            print(_row(name, shape, args.rounds), flush=True)


def _row(name: str, shape, rounds: int) -> str:
    module = _module(name, shape)
    x = torch.randn(*shape)
    xg = x.clone().requires_grad_()
    calls = max(3, int(2e6 / x.numel()))

    def infer():
        module(x)

    def step():
        module(xg).sum().backward()

    with torch.inference_mode():
        inf = _medians({f: _forced(f, infer) for f in ("torch", "numba")}, calls, rounds)
    train = _medians({f: _forced(f, step) for f in ("torch", "numba")}, max(2, calls // 4), rounds)
    return (
        f"{name:15s} {shape!s:18s} {x.numel():9d}  "
        f"{inf['torch']:8.1f} / {inf['numba']:8.1f} ({inf['torch'] / inf['numba']:4.2f})"
        f"   {train['torch']:8.1f} / {train['numba']:8.1f} "
        f"({train['torch'] / train['numba']:4.2f})"
    )


if __name__ == "__main__":
    main()
