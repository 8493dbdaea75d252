"""Channels-first LayerNorm/RMSNorm (``dim=1``): the Numba column kernel ("numba"), the torch
family ("torch": axis moved last, torch's op, moved back) and the user's own permute +
torch.nn.LayerNorm + permute, forward (no_grad) and forward+backward, 1 and 2 threads,
interleaved medians. One JSON line per row.

    PYTHONPATH=src python scripts/columns_bench.py main 31    # the issue #15 shapes
    PYTHONPATH=src python scripts/columns_bench.py cross 41   # numba vs torch near 32K elements
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

import torch

import normlab
from normlab import backends


def make(shape, kind, center=True):
    c, nd = shape[1], len(shape)
    if kind == "permute":
        m = torch.nn.LayerNorm(c) if center else torch.nn.RMSNorm(c, eps=1e-5)
        last, back = (0, *range(2, nd), 1), (0, nd - 1, *range(1, nd - 1))
        return lambda x: m(x.permute(last)).permute(back)
    m = normlab.LayerNorm(c, dim=1) if center else normlab.RMSNorm(c, dim=1, eps=1e-5)

    def run(x):
        with backends.use(kind):
            return m(x)

    return run


def once(f, x, train, dy):
    if train:
        xg = x.detach().requires_grad_()
        t = time.perf_counter()
        f(xg).backward(dy)
        return time.perf_counter() - t
    with torch.no_grad():
        t = time.perf_counter()
        f(x)
        return time.perf_counter() - t


def bench(shape, kinds, train, threads, reps, center=True):
    torch.set_num_threads(threads)
    x, dy = torch.randn(shape), torch.randn(shape)
    fs = {k: make(shape, k, center) for k in kinds}
    for f in fs.values():
        for _ in range(3):
            once(f, x, train, dy)
    times = {k: [] for k in kinds}
    for _ in range(reps):
        for k, f in fs.items():
            times[k].append(once(f, x, train, dy))
    return {k: round(statistics.median(v) * 1e3, 4) for k, v in times.items()}


def main(mode="main", reps=31):
    if mode == "main":
        for shape in [(16, 96, 56, 56), (8, 384, 14, 14)]:
            for train in (False, True):
                for threads in (1, 2):
                    r = bench(shape, ["numba", "torch", "permute"], train, threads, reps)
                    ratios = {
                        f"permute/{k}": round(r["permute"] / r[k], 2) for k in ("numba", "torch")
                    }
                    print(
                        json.dumps(
                            {"shape": shape, "train": train, "threads": threads, **r, **ratios}
                        )
                    )
        return
    for center in (True, False):
        for shape in [(2, 32, 16, 16), (4, 32, 16, 16), (4, 64, 16, 16), (8, 64, 16, 16)]:
            for train in (False, True):
                for threads in (1, 2):
                    r = bench(shape, ["numba", "torch"], train, threads, reps, center)
                    row = {
                        "norm": "LayerNorm" if center else "RMSNorm",
                        "elements": math.prod(shape),
                    }
                    row |= {"train": train, "threads": threads, **r}
                    print(json.dumps(row | {"torch/numba": round(r["torch"] / r["numba"], 2)}))


if __name__ == "__main__":
    main(
        sys.argv[1] if len(sys.argv) > 1 else "main", int(sys.argv[2]) if len(sys.argv) > 2 else 31
    )
