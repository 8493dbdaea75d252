"""LayerNorm and RMSNorm over a non-trailing axis (channels-first, the ConvNeXt case): x is
viewed as (A, C, B) contiguous, each (a, b) column of C values has its own statistics and
weight and bias vary along C. No permute and no copy: the loops run along b (contiguous, one
float64 accumulator per b), for each c in turn.

The work is split into tasks (a, block of b): a block of ``_block_len`` positions keeps its C
rows of x (and dy) in cache for the passes over them, so that the statistics are two-pass
(mean, then the sum of squared deviations from it) in float64 as in the row kernels, which
keeps the accuracy of data far from zero (1e4 + 1e-3 noise). ``center`` False: RMSNorm
(mean 0, var = mean(x^2)).

Backward per column, with xhat = (x - mean) * rstd and g = dy * weight[c]:

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (no mean(g) without centring)
    dweight[c] = sum_(a, b) dy * xhat      dbias[c] = sum_(a, b) dy

dweight and dbias are summed per fixed chunk of tasks (``runtime.chunk_bounds``, at most
``CHUNKS``), then the chunks in order: the result does not depend on the thread count. A
column's output depends on that column alone (NaN and Inf stay in their columns).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.kernels.cpu.common import div, rsqrt, serial_chunk_bounds
from normlab.kernels.cpu.pointers import array_at
from normlab.kernels.cpu.runtime import kernel, serial, serial_kernel

# The C rows of one block of positions of one input array fit in about this many bytes: the
# block's second and third passes read it from L2.
BLOCK_BYTES = 96 * 1024
MIN_BLOCK = 16
MAX_BLOCK = 2048


@serial
def _block_len(C, B, itemsize):
    """Positions per block: the block's C rows are at most ``BLOCK_BYTES`` (at least
    ``MIN_BLOCK`` positions, a multiple of 16 below B), blocks of about equal length."""
    n = BLOCK_BYTES // max(1, C * itemsize)
    n = max(MIN_BLOCK, min(MAX_BLOCK, n))
    if n >= B:
        return max(B, 1)
    blocks = -(-B // n)
    n = -(-B // blocks)
    return -(-n // 16) * 16


@serial
def _check(x, per_channel, mean, rstd):
    A, C, B = x.shape
    if per_channel < C:
        raise ValueError("columns: weight and bias need x.shape[1] elements")
    if mean.shape[0] != A or mean.shape[1] != B or rstd.shape[0] != A or rstd.shape[1] != B:
        raise ValueError("columns: mean and rstd must have shape (A, B)")


@serial
def _add_chunks(partial, out):
    """out = partial[0] + partial[1] + ... in chunk order. A serial loop: np.zeros in a
    parallel kernel is a parallel region of its own (a wake-up and a barrier, costly on a
    loaded machine)."""
    acc = np.empty(partial.shape[1])
    for j in range(acc.shape[0]):
        acc[j] = 0.0
    for k in range(partial.shape[0]):
        p = partial[k]
        for j in range(acc.shape[0]):
            acc[j] += p[j]
    for j in range(acc.shape[0]):
        out[j] = acc[j]


@serial
def _normalize_block(xa, ya, weight, bias, eps, center, m, r, b0, b1):
    """Normalizes the columns b0:b1 of one (C, B) slab ``xa`` into ``ya``; writes their mean
    and rstd (float64) into ``m`` and ``r`` (b1 - b0 elements each)."""
    C = xa.shape[0]
    inv = div(1.0, C)
    n = b1 - b0
    for j in range(n):
        m[j] = 0.0
        r[j] = 0.0
    if center:
        for c in range(C):
            xc = xa[c, b0:b1]
            for j in range(n):
                m[j] += xc[j]
        for j in range(n):
            m[j] *= inv
    for c in range(C):
        xc = xa[c, b0:b1]
        for j in range(n):
            d = xc[j] - m[j]
            r[j] += d * d
    for j in range(n):
        r[j] = rsqrt(r[j] * inv + eps)
    for c in range(C):
        xc = xa[c, b0:b1]
        yc = ya[c, b0:b1]
        wc = np.float64(weight[c])
        bc = np.float64(bias[c])
        for j in range(n):
            yc[j] = (xc[j] - m[j]) * r[j] * wc + bc


@kernel
def column_norm_forward(x, weight, bias, eps, center, y, mean, rstd):
    """y = (x - mean) * rstd * weight[c] + bias[c] per column (a, b) of x (A, C, B); writes
    y, mean (A, B) and rstd (A, B) (float64 statistics)."""
    A, C, B = x.shape
    _check(x, min(weight.shape[0], bias.shape[0]), mean, rstd)
    bl = _block_len(C, B, x.itemsize)
    nb = -(-B // bl) if B > 0 else 0
    for t in prange(A * nb):
        a = t // nb
        b0 = (t - a * nb) * bl
        b1 = min(B, b0 + bl)
        _normalize_block(
            x[a], y[a], weight, bias, eps, center, mean[a, b0:b1], rstd[a, b0:b1], b0, b1
        )


# Inference (no statistics kept) at the cost of the call alone: the tensors come as
# addresses (``normlab.kernels.cpu.pointers``; x and y (A, C, B), weight and bias (C,) of
# x's element type, ``witness`` a scalar of it), y is written in place.


@serial_kernel
def column_norm_inference_serial(x_at, weight_at, bias_at, y_at, A, C, B, eps, center, witness):
    """``column_norm_forward``'s y, on the calling thread, without mean and rstd."""
    x, y = array_at(x_at, (A, C, B), witness), array_at(y_at, (A, C, B), witness)
    weight, bias = array_at(weight_at, (C,), witness), array_at(bias_at, (C,), witness)
    bl = _block_len(C, B, x.itemsize)
    nb = -(-B // bl) if B > 0 else 0
    m, r = np.empty(bl), np.empty(bl)
    for t in range(A * nb):
        a = t // nb
        b0 = (t - a * nb) * bl
        b1 = min(B, b0 + bl)
        _normalize_block(x[a], y[a], weight, bias, eps, center, m, r, b0, b1)


@kernel
def column_norm_inference(x_at, weight_at, bias_at, y_at, A, C, B, eps, center, witness):
    """``column_norm_forward``'s y, one parallel task per block, without mean and rstd."""
    x, y = array_at(x_at, (A, C, B), witness), array_at(y_at, (A, C, B), witness)
    weight, bias = array_at(weight_at, (C,), witness), array_at(bias_at, (C,), witness)
    bl = _block_len(C, B, x.itemsize)
    nb = -(-B // bl) if B > 0 else 0
    for t in prange(A * nb):
        a = t // nb
        b0 = (t - a * nb) * bl
        b1 = min(B, b0 + bl)
        m, r = np.empty(b1 - b0), np.empty(b1 - b0)
        _normalize_block(x[a], y[a], weight, bias, eps, center, m, r, b0, b1)


@kernel
def column_norm_backward(dy, x, weight, mean, rstd, center, dx, dweight, dbias):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) per column, g = dy * weight[c]
    (no mean(g) term unless ``center``); dweight[c] = sum dy * xhat, dbias[c] = sum dy over
    all columns, summed over fixed chunks of tasks (deterministic)."""
    A, C, B = x.shape
    _check(x, weight.shape[0], mean, rstd)
    bl = _block_len(C, B, x.itemsize)
    nb = -(-B // bl) if B > 0 else 0
    tasks = A * nb
    chunks, size = serial_chunk_bounds(tasks)
    inv = div(1.0, C)
    partial = np.empty((chunks, 2, C))  # each chunk zeroes its own (no parallel np.zeros)
    for k in prange(chunks):
        pw = partial[k, 0]
        pb = partial[k, 1]
        for c in range(C):
            pw[c] = 0.0
            pb[c] = 0.0
        sd = np.empty(bl)
        sg = np.empty(bl)
        sgd = np.empty(bl)
        for t in range(k * size, min(tasks, (k + 1) * size)):
            a = t // nb
            b0 = (t - a * nb) * bl
            b1 = min(B, b0 + bl)
            n = b1 - b0
            xa, da, dxa = x[a], dy[a], dx[a]
            m = mean[a, b0:b1]
            r = rstd[a, b0:b1]
            for j in range(n):
                sd[j] = 0.0
                sg[j] = 0.0
                sgd[j] = 0.0
            # The stored mean may be rounded (float32 statistics): its float64 value
            # m + delta, delta = mean(x - m), comes in the same pass as the gradient sums,
            # and sum(g * xhat) = rstd * (sum(g * (x - m)) - delta * sum(g)).
            for c in range(C):
                xc = xa[c, b0:b1]
                dc = da[c, b0:b1]
                wc = np.float64(weight[c])
                for j in range(n):
                    d = xc[j] - np.float64(m[j])
                    g = dc[j] * wc
                    sd[j] += d
                    sg[j] += g
                    sgd[j] += g * d
            # sd <- the float64 mean, sg <- mean(g) (0 without centring),
            # sgd <- rstd * mean(g * xhat)
            for j in range(n):
                delta = sd[j] * inv if center else 0.0
                rs = np.float64(r[j])
                sd[j] = np.float64(m[j]) + delta
                sgd[j] = rs * (sgd[j] - delta * sg[j]) * inv
                sg[j] = sg[j] * inv if center else 0.0
            for c in range(C):
                xc = xa[c, b0:b1]
                dc = da[c, b0:b1]
                dxc = dxa[c, b0:b1]
                wc = np.float64(weight[c])
                sw = 0.0
                sb = 0.0
                for j in range(n):
                    rs = np.float64(r[j])
                    xh = (xc[j] - sd[j]) * rs
                    e = np.float64(dc[j])
                    dxc[j] = rs * (e * wc - sg[j] - xh * sgd[j])
                    sw += e * xh
                    sb += e
                pw[c] += sw
                pb[c] += sb
    _add_chunks(partial[:, 0], dweight)
    _add_chunks(partial[:, 1], dbias)
