"""LayerNorm and RMSNorm over the last axis of a (rows, features) array, and the fused
residual add: one parallel task per row.

float32 input, and float16/bfloat16 arrays, which come as integer views of their bits
(``normlab.kernels.cpu.half``: every element is read with ``load``, widened exactly to
float32, and written with ``store``, rounded once to nearest even), are computed in float32
(``compute``): arithmetic and per-block sums, with the deviations taken from the row's
first element k (``_shift``): x - k is exact for x near k, so the float32 mean of x - k
keeps the spread of rows far from zero (1e4 + 1e-3 noise). float32 arithmetic vectorizes
twice as wide as float64, which bound these kernels before (2026-12-07, 2 cores: forward
and backward 15-25% faster), at a few float32 ulps of error. float64 input is computed in
float64 (k = 0).

Per row of N features (``center``: LayerNorm; otherwise RMSNorm, whose mean is 0):

    mean = (1/N) sum x                  var = (1/N) sum (x - mean)^2   (two passes, cached)
    rstd = 1 / sqrt(var + eps)          y   = (x - mean) * rstd * weight + bias

Backward, with xhat = (x - mean) * rstd and g = dy * weight:

    dx      = rstd * (g - mean(g) - xhat * mean(g * xhat))    (no mean(g) without centring)
    dweight = sum_rows dy * xhat        dbias = sum_rows dy

Rows never interact in the forward (a row's output is the same whatever the other rows are).
dweight and dbias are summed per fixed block of rows (``runtime.chunk_bounds``), then the
blocks in order: the result is bit-identical for any thread count.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.kernels.cpu.common import (
    add_blocks,
    div,
    rsqrt,
    serial_chunk_bounds,
    shifted_squares,
    shifted_sum,
)
from normlab.kernels.cpu.half import compute, load, pivot, scratch, store
from normlab.kernels.cpu.pointers import array_at
from normlab.kernels.cpu.runtime import kernel, serial, serial_kernel


@serial
def _affine(row, k, mu, rs, weight, bias, out):
    """out = ((row - k) - mu) * rs * weight + bias, computed in ``compute``'s dtype, rounded
    once."""
    for j in range(row.shape[0]):
        store(out, j, ((load(row, j) - k) - mu) * rs * load(weight, j) + load(bias, j))


@serial
def _shift(row, center):
    """The pivot k that the row kernels subtract first (``half.pivot``; 0 for RMSNorm, whose
    deviations are from 0): x - k is exact, and the mean of x - k keeps the spread of data
    far from zero in float32."""
    return pivot(row) if center else compute(row, 0.0)


@serial
def _normalize_row(row, k, total, weight, bias, eps, center, out):
    """Normalizes ``row`` (whose sum of row - k is ``total``) into ``out``; returns (mean,
    rstd) in float64."""
    n = row.shape[0]
    mu = compute(row, div(total, n)) if center else compute(row, 0.0)  # mean of row - k
    rs = compute(row, rsqrt(div(shifted_squares(row, k, mu), n) + eps))
    _affine(row, k, mu, rs, weight, bias, out)
    return np.float64(k) + np.float64(mu), np.float64(rs)


@serial
def _row(xr, weight, bias, eps, center, yr):
    """Normalizes the row ``xr`` into ``yr``; returns its (mean, rstd) in float64."""
    k = _shift(xr, center)
    total = shifted_sum(xr, k) if center else compute(xr, 0.0)
    return _normalize_row(xr, k, total, weight, bias, eps, center, yr)


@kernel
def row_norm_forward(x, weight, bias, eps, center, y, mean, rstd):
    """y = (x - mean) * rstd * weight + bias per row of x (R, N); writes y, mean, rstd (R,).

    ``center``: LayerNorm, var = mean((x - mean)^2); else RMSNorm, mean = 0, var = mean(x^2).
    rstd = 1 / sqrt(var + eps).
    """
    for r in prange(x.shape[0]):
        mean[r], rstd[r] = _row(x[r], weight, bias, eps, center, y[r])


# Inference (no statistics kept) at the cost of the call alone: the tensors come as
# addresses (``normlab.kernels.cpu.pointers``), the weight and bias as (N,) arrays of x's
# element type (``witness``: a scalar of it), y (rows, N) C-contiguous is written in place.
# Row r of x starts ``step`` bytes after row r - 1 (N elements for a contiguous x; more for
# a view of every row's first features, as a split of a fused projection; any step, 0 for
# an expanded row): each row is read where it lies, without a copy.


@serial
def _row_at(x_at, step, r, weight, bias, eps, center, y, witness):
    """Normalizes the row of x at ``x_at + r * step`` into row r of y."""
    xr = array_at(x_at + r * step, (y.shape[1],), witness)
    _row(xr, weight, bias, eps, center, y[r])


@serial_kernel
def row_norm_inference_serial(x_at, step, weight_at, bias_at, y_at, rows, n, eps, center, witness):
    """``row_norm_forward``'s y, on the calling thread, without mean and rstd."""
    y = array_at(y_at, (rows, n), witness)
    weight, bias = array_at(weight_at, (n,), witness), array_at(bias_at, (n,), witness)
    for r in range(rows):
        _row_at(x_at, step, r, weight, bias, eps, center, y, witness)


@kernel
def row_norm_inference(x_at, step, weight_at, bias_at, y_at, rows, n, eps, center, witness):
    """``row_norm_forward``'s y, one parallel task per row, without mean and rstd."""
    y = array_at(y_at, (rows, n), witness)
    weight, bias = array_at(weight_at, (n,), witness), array_at(bias_at, (n,), witness)
    for r in prange(rows):
        _row_at(x_at, step, r, weight, bias, eps, center, y, witness)


@kernel
def add_row_norm_forward(x, residual, weight, bias, eps, center, y, sum_out, mean, rstd):
    """sum_out = x + residual (in x's dtype), y = row_norm(sum_out): one pass over the row
    adds, stores and sums; the statistics and y are computed from the rounded sum."""
    for r in prange(x.shape[0]):
        xr, rr, sr = x[r], residual[r], sum_out[r]
        if xr.shape[0] > 0:
            store(sr, 0, load(xr, 0) + load(rr, 0))
        k = _shift(sr, center)
        total = compute(sr, 0.0)
        for j in range(xr.shape[0]):
            store(sr, j, load(xr, j) + load(rr, j))
            total += load(sr, j) - k
        mu, rs = _normalize_row(sr, k, total, weight, bias, eps, center, y[r])
        mean[r] = mu
        rstd[r] = rs


@serial
def _row_input_gradient(dyr, xr, weight, p, m0, rs, center, extra, has_extra, dxr):
    """dx of one row (plus ``extra`` if ``has_extra``) into ``dxr``; returns the row's mean
    of x - p (p: the row's ``_shift``). Arithmetic in ``compute``'s dtype (p, m0 = the
    stored mean - p, and rs in it).

    The stored mean may be rounded (float32): the mean m0 + delta, with
    delta = mean(x - p - m0), is recovered in the same pass as the gradient sums, and
    sum(g * xhat) = rstd * (sum(g * (x - p - m0)) - delta * sum(g)).
    """
    n = xr.shape[0]
    sd = compute(xr, 0.0)
    sg = compute(xr, 0.0)
    sgd = compute(xr, 0.0)
    for j in range(n):
        d = (load(xr, j) - p) - m0
        g = load(dyr, j) * load(weight, j)
        sd += d
        sg += g
        sgd += g * d
    # One reciprocal with several uses: a lone ``a / n`` would be sunk into the loop below
    # by LLVM's reassociation (a vector division per element).
    inv_n = compute(xr, div(1.0, n))
    delta = sd * inv_n if center else compute(xr, 0.0)
    mu = m0 + delta
    c1 = sg * inv_n if center else compute(xr, 0.0)
    c2 = rs * (sgd - delta * sg) * inv_n
    if has_extra:
        for j in range(n):
            xh = ((load(xr, j) - p) - mu) * rs
            g = load(dyr, j) * load(weight, j)
            store(dxr, j, rs * (g - c1 - xh * c2) + load(extra, j))
    else:
        for j in range(n):
            xh = ((load(xr, j) - p) - mu) * rs
            store(dxr, j, rs * (load(dyr, j) * load(weight, j) - c1 - xh * c2))
    return mu


@serial
def _affine_sums(dy, x, mus, rstd, center, r, k, pw, pb):
    """pw += sum dy * xhat, pb += sum dy over the k rows r, r+1, ... (mus: their means of
    x - ``_shift``), the products in ``compute``'s dtype.

    Four rows per sweep when k == 4: a quarter of the read-modify-writes of pw and pb.
    """
    n = x.shape[1]
    if k == 4:
        x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
        d0, d1, d2, d3 = dy[r], dy[r + 1], dy[r + 2], dy[r + 3]
        m0, m1 = compute(x, mus[0]), compute(x, mus[1])
        m2, m3 = compute(x, mus[2]), compute(x, mus[3])
        p0, p1 = _shift(x0, center), _shift(x1, center)
        p2, p3 = _shift(x2, center), _shift(x3, center)
        s0, s1 = compute(x, rstd[r]), compute(x, rstd[r + 1])
        s2, s3 = compute(x, rstd[r + 2]), compute(x, rstd[r + 3])
        for j in range(n):
            e0 = compute(x, load(d0, j))
            e1 = compute(x, load(d1, j))
            e2 = compute(x, load(d2, j))
            e3 = compute(x, load(d3, j))
            t01 = e0 * (((load(x0, j) - p0) - m0) * s0) + e1 * (((load(x1, j) - p1) - m1) * s1)
            t23 = e2 * (((load(x2, j) - p2) - m2) * s2) + e3 * (((load(x3, j) - p3) - m3) * s3)
            pw[j] += t01 + t23
            pb[j] += (e0 + e1) + (e2 + e3)
    else:
        for q in range(k):
            xq, dq = x[r + q], dy[r + q]
            mq, sq = compute(x, mus[q]), compute(x, rstd[r + q])
            pq = _shift(xq, center)
            for j in range(n):
                e = compute(x, load(dq, j))
                pw[j] += e * (((load(xq, j) - pq) - mq) * sq)
                pb[j] += e


@kernel
def row_norm_backward(dy, x, weight, mean, rstd, center, extra, dx, dweight, dbias):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) [+ extra] per row, g = dy * weight,
    xhat = (x - mean) * rstd (no mean(g) term unless ``center``); ``extra`` (R, N) is added
    to dx, shape (0, N) means none. dweight = sum_rows dy * xhat, dbias = sum_rows dy
    (written), summed deterministically over fixed blocks of rows."""
    rows, n = x.shape
    blocks, size = serial_chunk_bounds(rows)
    has_extra = extra.shape[0] != 0
    # Per block, pw = partial[:n] and pb = partial[n + pad:], half a page apart (no 4K
    # aliasing between their loads and stores).
    pad = (256 - n % 512) % 512
    partial = scratch(x, blocks, 2 * n + pad)  # compute's dtype
    for blk in prange(blocks):
        pw = partial[blk, :n]
        pb = partial[blk, n + pad :]
        for j in range(n):  # each block zeroes its own sums (no parallel region of np.full)
            pw[j] = 0.0
            pb[j] = 0.0
        mus = np.empty(4)
        stop = min(rows, (blk + 1) * size)
        for r in range(blk * size, stop, 4):
            k = min(4, stop - r)
            for q in range(k):
                er = extra[r + q] if has_extra else extra[0:0].ravel()
                xr = x[r + q]
                p = _shift(xr, center)
                m0 = compute(x, mean[r + q] - p)
                rs = compute(x, rstd[r + q])
                mus[q] = _row_input_gradient(
                    dy[r + q], xr, weight, p, m0, rs, center, er, has_extra, dx[r + q]
                )
            _affine_sums(dy, x, mus, rstd, center, r, k, pw, pb)
    add_blocks(partial[:, :n], dweight)
    add_blocks(partial[:, n + pad :], dbias)
