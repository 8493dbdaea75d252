"""Serial helpers shared by the Numba kernels of several families (inlined into them)."""

from __future__ import annotations

import numpy as np

from normlab.kernels.cpu.half import compute, load, store
from normlab.kernels.cpu.runtime import chunk_bounds, serial

serial_chunk_bounds = serial(chunk_bounds)


@serial
def div(total, count):
    """total / count, NaN for count 0 (as 0/0 in torch, where Numba would raise)."""
    return total / count if count != 0 else np.nan


@serial
def rsqrt(v):
    """1 / sqrt(v) with torch's rsqrt at the edges: inf at 0, NaN for NaN and negatives."""
    if v > 0:
        return 1.0 / np.sqrt(v)
    return np.inf if v == 0 else np.nan


@serial
def zeros(n):
    """float64 zeros by a serial loop: in a parallel kernel np.zeros (and np.full) outside a
    prange is a parallel region of its own (a thread wake-up and a barrier, costly for a
    small input and on a loaded machine)."""
    z = np.empty(n)
    for i in range(n):
        z[i] = 0.0
    return z


@serial
def add_blocks(partial, out):
    """out = partial[0] + partial[1] + ... in block order (vectorized across columns)."""
    acc = zeros(partial.shape[1])
    for blk in range(partial.shape[0]):
        p = partial[blk]
        for j in range(acc.shape[0]):
            acc[j] += p[j]
    for j in range(acc.shape[0]):
        store(out, j, acc[j])


@serial
def shifted_sum(row, k):
    """sum (row - k), in ``compute``'s dtype (k: ``half.pivot(row)``)."""
    s = compute(row, 0.0)
    for j in range(row.shape[0]):
        s += load(row, j) - k
    return s


@serial
def shifted_squares(row, k, mu):
    """sum ((row - k) - mu)^2, in ``compute``'s dtype."""
    s = compute(row, 0.0)
    for j in range(row.shape[0]):
        d = (load(row, j) - k) - mu
        s += d * d
    return s
