"""The timer: one timed run of a contender, interleaved repetitions, and their summary.

A *runner* is a zero-argument callable that does one run of one contender and returns the
seconds of its timed region (``time.perf_counter``), per call: a run of a small case makes
``inner`` calls back to back (``inner_calls``), so that a call of a few microseconds is not
timed alone at the clock's and the interpreter's resolution. Untimed setup (the forward that a
backward needs) happens inside the runner, outside the timed region. Outputs are dropped
after the timed region, so every contender allocates fresh outputs in every run, as it
would in a training step.
"""

from __future__ import annotations

import contextlib
import gc
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import numpy as np
import torch

Runner = Callable[[], float]
Call = Callable[[], tuple[torch.Tensor, ...]]
ContextFactory = Callable[[], AbstractContextManager]


INNER_BYTES = 1 << 21
"""A timed region moves at least about this many bytes: smaller calls are repeated."""

MAX_INNER = 64


def inner_calls(traffic_bytes: int) -> int:
    """How many calls one timed run makes for a call that moves ``traffic_bytes``."""
    return max(1, min(MAX_INNER, INNER_BYTES // max(1, traffic_bytes)))


def forward_runner(
    call: Call, context: ContextFactory = contextlib.nullcontext, inner: int = 1
) -> Runner:
    """Times ``call()`` (the forward, recording the autograd graph as in training)."""

    def run() -> float:
        with context():
            start = time.perf_counter()
            for _ in range(inner):
                outputs = call()
            elapsed = time.perf_counter() - start
        del outputs
        return elapsed / inner

    return run


def backward_runner(
    call: Call,
    inputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor],
    context: ContextFactory = contextlib.nullcontext,
    inner: int = 1,
) -> Runner:
    """Runs the forward untimed (``inner`` times), then times ``torch.autograd.grad`` of
    each forward's outputs with respect to ``inputs`` (a fresh graph each: no
    ``retain_graph``)."""

    def run() -> float:
        with context():
            graphs = [call() for _ in range(inner)]
            start = time.perf_counter()
            for outputs in graphs:
                grads = torch.autograd.grad(outputs, inputs, output_grads)
            elapsed = time.perf_counter() - start
        del grads, graphs
        return elapsed / inner

    return run


def copy_runner(source: torch.Tensor, destination: torch.Tensor | None, inner: int = 1) -> Runner:
    """Times ``destination.copy_(source)`` into a preallocated buffer, or ``source.clone()``
    (allocating a fresh buffer, as the contenders allocate their outputs) when
    ``destination`` is None."""

    def run() -> float:
        start = time.perf_counter()
        for _ in range(inner):
            result = source.clone() if destination is None else destination.copy_(source)
        elapsed = time.perf_counter() - start
        del result
        return elapsed / inner

    return run


def two_pass_runner(reread: torch.Tensor, source: torch.Tensor, inner: int = 1) -> Runner:
    """Times ``reread.sum()`` then ``source.clone()``: a pass that only reads, then the
    allocating copy (the two-pass bound of ``traffic.MODEL``)."""

    def run() -> float:
        start = time.perf_counter()
        for _ in range(inner):
            total = reread.sum()
            result = source.clone()
        elapsed = time.perf_counter() - start
        del result, total
        return elapsed / inner

    return run


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect once, then keep Python's cyclic collector out of the timed loop."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def interleaved(
    runners: dict[str, Runner], repetitions: int, warmup: int, seed: int = 0
) -> dict[str, list[float]]:
    """Run every runner ``warmup`` times, then ``repetitions`` times, in a fresh random
    order in each round so that machine noise falls on all contenders alike. Returns the
    timed seconds of the measured rounds, per runner."""
    order = list(runners)
    shuffle = random.Random(seed).shuffle
    samples: dict[str, list[float]] = {name: [] for name in runners}
    with gc_paused():
        for round_index in range(warmup + repetitions):
            shuffle(order)
            for name in order:
                elapsed = runners[name]()
                if round_index >= warmup:
                    samples[name].append(elapsed)
    return samples


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (linear interpolation) and interquartile range, in seconds."""
    values = np.asarray(seconds, dtype=np.float64)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {
        "median_s": float(median),
        "q1_s": float(q1),
        "q3_s": float(q3),
        "iqr_s": float(q3 - q1),
        "min_s": float(values.min()),
        "max_s": float(values.max()),
    }


def timed_once(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result
