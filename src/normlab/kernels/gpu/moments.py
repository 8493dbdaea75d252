"""Pieces the GroupNorm, BatchNorm and PowerNorm Triton kernels share: Chan's merge of
(count, mean, M2) partial moments, the finite-pivot guard, and the in-order column sums
that turn per-program partial sums into one result without atomics.

Large means: a float32 mean of data near 1e4 is only known to 1e-3, the scale of noise it
should resolve. The kernels therefore accumulate x - k for a pivot k taken from the data
(x at the first real element): the difference of two nearby float32 numbers is exact, and
the moments of x - k are small and accurate. Each block of a reduction is two-pass in
registers (block mean, then squared deviations from it) and the blocks are merged in a
fixed order with Chan's formula: one read of x, no E[x^2] - E[x]^2 cancellation.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)  # a global a kernel reads: constexpr
# Rows of partial sums a column-sum program adds per step.
COLUMN_BLOCK_ROWS = 64


def given(t, dummy):
    """An optional pointer argument: the tensor, or a placeholder the kernel never reads."""
    return dummy if t is None else t


def launch(kernel, grid, *args, **options) -> None:
    """``kernel[grid](*args, **options)`` on the CUDA device of the first argument (Triton
    launches on the current device); nothing for an empty grid (an empty input)."""
    if math.prod(grid) == 0:
        return
    first = args[0]
    on_device = torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext()
    with on_device:
        kernel[grid](*args, **options)


@triton.jit
def finite_or_zero(v):
    """v where it is finite, else 0 (a NaN/Inf pivot would poison every shifted sum)."""
    return tl.where(tl.abs(v) <= FLOAT32_MAX, v, 0.0)


@triton.jit
def block_moments(d, real, axis: tl.constexpr):
    """(count, mean, M2) of the real entries of d along ``axis`` (two-pass in registers)."""
    count = tl.sum(real.to(tl.float32), axis=axis)
    mean = tl.sum(tl.where(real, d, 0.0), axis=axis) / tl.maximum(count, 1.0)
    if axis == 0:
        centred = d - mean[None, :]
    else:
        centred = d - mean[:, None]
    m2 = tl.sum(tl.where(real, centred * centred, 0.0), axis=axis)
    return count, mean, m2


@triton.jit
def chan_merge(n, mean, m2, nb, mb, qb):
    """Chan et al.'s pairwise update: (n, mean, M2) and a block's (nb, mb, qb) combined.
    A block with nb == 0 leaves the moments unchanged."""
    total = n + nb
    weight = nb / tl.maximum(total, 1.0)
    delta = mb - mean
    return total, mean + delta * weight, m2 + qb + delta * delta * (n * weight)


@triton.jit
def _column_sums_kernel(
    parts_ptr, out_ptr, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    cs = pid * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    c_ok = cs < cols
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], tl.float32)
    for r0 in range(0, rows, BLOCK_ROWS):
        rs = r0 + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        ok = (rs < rows)[:, None] & c_ok[None, :]
        acc += tl.load(parts_ptr + rs[:, None] * cols + cs[None, :], mask=ok, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + cs, total.to(out_ptr.dtype.element_ty), mask=c_ok)


def column_sums(parts: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[j] = sum_i parts[i, j] (float32 ``parts``, contiguous), in a fixed order: the
    same bits every run. Written into ``out`` (any float dtype), which is returned."""
    rows, cols = parts.shape
    block_cols = min(triton.next_power_of_2(max(cols, 1)), 128)
    block_rows = min(COLUMN_BLOCK_ROWS, triton.next_power_of_2(max(rows, 1)))
    grid = (triton.cdiv(cols, block_cols),)
    launch(
        _column_sums_kernel,
        grid,
        parts,
        out,
        rows,
        cols,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
    )
    return out
