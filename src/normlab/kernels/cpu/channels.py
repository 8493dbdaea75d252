"""BatchNorm kernels: per-channel statistics over every other axis, the affine apply, the backward.

x is viewed as (A, C, B): C channels, A the product of the axes before the channel axis, B of
those after it (NCHW: (N, C, H*W); channels last: (N*L, C, 1)). The mask, when given, is uint8
(A, B), 1 = real element (the same for every channel); an array of shape (0, 0) means none.
Sums are accumulated in float64 over fixed blocks of the data (``_plan``: a function of the
shape and dtype only) and the blocks are merged in block order, so every result is the same
for any thread count. B == 1 and B > 1 have separate loops whose innermost loop is contiguous
(over channels, respectively over positions).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.kernels.cpu.common import rsqrt, zeros
from normlab.kernels.cpu.pointers import array_at
from normlab.kernels.cpu.runtime import CHUNKS, kernel, serial, serial_kernel

# A block of work (rows x positions x channels) is at most this many bytes of x, so the
# statistics' second pass over it hits the cache (L2 is 1 MB per core).
BLOCK_BYTES = 256 * 1024
# Channels per block when B == 1: the per-channel accumulators stay in L1.
MAX_TILE = 1024
# Rows per block are at least this many (if A allows): the per-block partial sums, C float64
# per block, stay small next to x.
MIN_ROWS = 16


@serial
def _cdiv(a, b):
    return -(-a // b)


@serial
def _plan(A, C, B, itemsize):
    """Fixed blocks: (rows, row_blocks, positions, position_blocks, channels, channel_blocks).

    At least ``CHUNKS`` row blocks when A allows (as ``runtime.chunk_bounds``), more when a
    block would exceed ``BLOCK_BYTES``. Channel blocks only split the work (each channel's
    sum order depends on rows and positions alone)."""
    elems = max(1, BLOCK_BYTES // itemsize)
    b_len = B if B <= elems else _cdiv(B, _cdiv(B, elems))
    b_blocks = _cdiv(B, b_len) if B > 0 else 0
    b_len = max(b_len, 1)
    r_max = max(1, _cdiv(A, CHUNKS))
    r_min = min(r_max, MIN_ROWS)
    c_len = max(1, min(C, elems // (b_len * r_min)))
    if B == 1:
        c_len = min(c_len, MAX_TILE)
    rows = max(r_min, min(r_max, elems // (c_len * b_len)))
    r_blocks = _cdiv(A, rows) if A > 0 else 0
    c_blocks = max(1, _cdiv(C, c_len))  # one even for C == 0: the count is still written
    return rows, r_blocks, b_len, b_blocks, c_len, c_blocks


@serial
def _block(w, A, C, B, plan):
    """Block ``w`` of the plan: (partial index, a0, a1, b0, b1, c0, c1, first channel block)."""
    rows, _, b_len, b_blocks, c_len, c_blocks = plan
    p = w // c_blocks
    t = w - p * c_blocks
    rb = p // b_blocks
    bb = p - rb * b_blocks
    a0 = rb * rows
    b0 = bb * b_len
    c0 = t * c_len
    return p, a0, min(A, a0 + rows), b0, min(B, b0 + b_len), c0, min(C, c0 + c_len), t == 0


@serial
def _div(a, b):
    """a / b with IEEE semantics at b == 0 (Numba's default error model would raise)."""
    if b != 0:
        return a / b
    if a != a or a == 0:
        return np.nan
    return np.inf if (a > 0) == (b >= 0) else -np.inf


@serial
def _check(x, mask, per_channel, count):
    """Shapes the loops rely on (Numba does not bounds-check): ``per_channel`` is the smallest
    size among the (C,) arrays, ``count`` the size of the count array."""
    A, C, B = x.shape
    if per_channel < C:
        raise ValueError("channels: per-channel arrays need x.shape[1] elements")
    if count < 1:
        raise ValueError("channels: count needs one element")
    if mask.size != 0 and (mask.shape[0] != A or mask.shape[1] != B):
        raise ValueError("channels: mask must have shape (A, B) or (0, 0)")


@serial
def _real_count(mask, masked, a0, a1, b0, b1):
    """Real (a, b) positions in the block."""
    if not masked:
        return float((a1 - a0) * (b1 - b0))
    n = 0
    for a in range(a0, a1):
        for b in range(b0, b1):
            n += mask[a, b] != 0
    return float(n)


# --- statistics ------------------------------------------------------------------------------


@serial
def _pivots(x, mask, masked):
    """Per channel, x at the first real position (0 if none or not finite): every block sums
    x - pivot, so the block means that Chan's merge compares are small and exact even when
    |mean| >> std (a float64 mean of 1e4 is only known to 2e-12)."""
    A, C, B = x.shape
    k = zeros(C)
    first = -1
    if not masked:
        first = 0 if A * B > 0 else -1
    else:
        flat = mask.reshape(A * B)
        for i in range(A * B):
            if flat[i] != 0:
                first = i
                break
    if first >= 0:
        a = first // B
        b = first - a * B
        for c in range(C):
            v = np.float64(x[a, c, b])
            k[c] = v if np.isfinite(v) else 0.0
    return k


@serial
def _runs(mask, a0, a1):
    """True if the row mask (B == 1) changes at most once per 16 rows in a0:a1: a branch per
    row is then predictable (padding at the end of sequences). For random masks the input
    gradient goes branch-free (a mispredicted branch per row costs more than the select)."""
    changes = 0
    for a in range(a0 + 1, a1):
        changes += (mask[a, 0] != 0) != (mask[a - 1, 0] != 0)
    return changes * 16 <= a1 - a0


@serial
def _centers(s, kc, n):
    """s /= n (block means of x - k); returns the centres k + s of the second pass. Their
    rounding (|k| eps) changes sum (x - centre)^2 only to second order."""
    cen = np.empty(s.size)
    for j in range(s.size):
        s[j] /= n
        cen[j] = kc[j] + s[j]
    return cen


@serial
def _moments_rows(x2, mask, masked, n, k, a0, a1, c0, c1, s, q):
    """B == 1: s = mean of x - k, q = sum (x - k - s)^2 per channel over the n real rows of
    a0:a1 (two passes; the block is in cache for the second). Each step reads four rows, one
    from each quarter of the block's (real) rows: the accumulators are loaded and stored once
    per four rows, and four distant streams prefetch well (adjacent rows read in lockstep
    halve the bandwidth). Padded rows are never read: the loops run over a list of the real
    rows (no branch per row)."""
    if n == 0:
        return
    width = c1 - c0
    kc = k[c0:c1]
    real = np.empty(a1 - a0, np.int64)
    count = 0
    for a in range(a0, a1):
        if not masked or mask[a, 0] != 0:
            real[count] = a
            count += 1
    quarter = count // 4
    for i in range(quarter):
        r0, r1 = x2[real[i], c0:c1], x2[real[quarter + i], c0:c1]
        r2, r3 = x2[real[2 * quarter + i], c0:c1], x2[real[3 * quarter + i], c0:c1]
        for j in range(width):
            kj = kc[j]
            s[j] += ((r0[j] - kj) + (r1[j] - kj)) + ((r2[j] - kj) + (r3[j] - kj))
    for i in range(4 * quarter, count):
        r0 = x2[real[i], c0:c1]
        for j in range(width):
            s[j] += r0[j] - kc[j]
    cen = _centers(s, kc, n)
    for i in range(quarter):
        r0, r1 = x2[real[i], c0:c1], x2[real[quarter + i], c0:c1]
        r2, r3 = x2[real[2 * quarter + i], c0:c1], x2[real[3 * quarter + i], c0:c1]
        for j in range(width):
            cj = cen[j]
            d0 = r0[j] - cj
            d1 = r1[j] - cj
            d2 = r2[j] - cj
            d3 = r3[j] - cj
            q[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for i in range(4 * quarter, count):
        r0 = x2[real[i], c0:c1]
        for j in range(width):
            d0 = r0[j] - cen[j]
            q[j] += d0 * d0


@serial
def _moments_segments(x, mask, masked, n, k, a0, a1, b0, b1, c0, c1, s, q):
    """B > 1: as ``_moments_rows``, each (a, c) segment of positions b0:b1 summed contiguously;
    padded positions are selected out (NaN there does not leak)."""
    if n == 0:
        return
    if masked:
        for a in range(a0, a1):
            m = mask[a, b0:b1]
            for c in range(c0, c1):
                seg = x[a, c, b0:b1]
                kc = k[c]
                acc = 0.0
                for b in range(b1 - b0):
                    acc += seg[b] - kc if m[b] != 0 else 0.0
                s[c - c0] += acc
        for j in range(c1 - c0):
            s[j] /= n
        for a in range(a0, a1):
            m = mask[a, b0:b1]
            for c in range(c0, c1):
                seg = x[a, c, b0:b1]
                cen = k[c] + s[c - c0]
                acc = 0.0
                for b in range(b1 - b0):
                    d = seg[b] - cen
                    acc += d * d if m[b] != 0 else 0.0
                q[c - c0] += acc
    else:
        for a in range(a0, a1):
            for c in range(c0, c1):
                seg = x[a, c, b0:b1]
                kc = k[c]
                acc = 0.0
                for b in range(b1 - b0):
                    acc += seg[b] - kc
                s[c - c0] += acc
        for j in range(c1 - c0):
            s[j] /= n
        for a in range(a0, a1):
            for c in range(c0, c1):
                seg = x[a, c, b0:b1]
                cen = k[c] + s[c - c0]
                acc = 0.0
                for b in range(b1 - b0):
                    d = seg[b] - cen
                    acc += d * d
                q[c - c0] += acc


@kernel
def channel_statistics(x, mask, mean, var, count):
    """Per-channel mean and biased variance of x (A, C, B) over its real elements.

    mean[c] = sum_{a,b} m x / n, var[c] = sum_{a,b} m (x - mean)^2 / n, count[0] = n = sum m
    (m = 1 without a mask). Each fixed block is two-pass (mean, then squared deviations from
    it) on x shifted by a per-channel pivot; the blocks are merged in order with Chan's
    formula. n = 0 gives NaN."""
    A, C, B = x.shape
    _check(x, mask, min(mean.size, var.size), count.size)
    masked = mask.size != 0
    plan = _plan(A, C, B, x.itemsize)
    parts = plan[1] * plan[3]
    # Every entry is written by exactly one block (np.empty: np.zeros outside the prange
    # would be a parallel region of its own, a thread wake-up and barrier each).
    pn = np.empty(parts)
    pmean = np.empty((parts, C))
    pm2 = np.empty((parts, C))
    k = _pivots(x, mask, masked)
    x2 = x.reshape(A, C * B)
    for w in prange(parts * plan[5]):
        p, a0, a1, b0, b1, c0, c1, first = _block(w, A, C, B, plan)
        n = _real_count(mask, masked, a0, a1, b0, b1)
        s = np.zeros(c1 - c0)
        q = np.zeros(c1 - c0)
        if B == 1:
            if masked:
                _moments_rows(x2, mask, True, n, k, a0, a1, c0, c1, s, q)
            else:
                _moments_rows(x2, mask, False, n, k, a0, a1, c0, c1, s, q)
        elif masked:
            _moments_segments(x, mask, True, n, k, a0, a1, b0, b1, c0, c1, s, q)
        else:
            _moments_segments(x, mask, False, n, k, a0, a1, b0, b1, c0, c1, s, q)
        pmean[p, c0:c1] = s
        pm2[p, c0:c1] = q
        if first:
            pn[p] = n
    # Chan's merge, block by block in order; the block count is the same for every channel,
    # so the weights are scalars and the loop over channels vectorizes.
    n = 0.0
    mu = zeros(C)
    m2 = zeros(C)
    for p in range(parts):
        nb = pn[p]
        if nb == 0:
            continue
        tot = n + nb
        f_mean = nb / tot
        f_m2 = n * nb / tot
        for c in range(C):
            d = pmean[p, c] - mu[c]
            mu[c] += d * f_mean
            m2[c] += pm2[p, c] + d * d * f_m2
        n = tot
    count[0] = n
    for c in range(C):
        if n == 0:
            mean[c] = np.nan
            var[c] = np.nan
        else:
            mean[c] = k[c] + mu[c]
            var[c] = m2[c] / n


# --- apply -------------------------------------------------------------------------------------


@kernel
def channel_apply(x, scale, shift, y):
    """y[a, c, b] = x[a, c, b] * scale[c] + shift[c], computed in the dtype of scale/shift
    (float64 scale/shift with float32 x are accepted and keep large-mean data exact)."""
    A, C, B = x.shape
    if scale.size < C or shift.size < C or y.shape != x.shape:
        raise ValueError("channel_apply: scale/shift need C elements, y the shape of x")
    plan = _plan(A, C, B, x.itemsize)
    x2 = x.reshape(A, C * B)
    y2 = y.reshape(A, C * B)
    for w in prange(plan[1] * plan[3] * plan[5]):
        _, a0, a1, b0, b1, c0, c1, _ = _block(w, A, C, B, plan)
        if B == 1:
            sc = scale[c0:c1]
            sh = shift[c0:c1]
            for a in range(a0, a1):
                xr = x2[a, c0:c1]
                yr = y2[a, c0:c1]
                for j in range(c1 - c0):
                    yr[j] = xr[j] * sc[j] + sh[j]
        else:
            for a in range(a0, a1):
                for c in range(c0, c1):
                    xs = x[a, c, b0:b1]
                    ys = y[a, c, b0:b1]
                    k = scale[c]
                    h = shift[c]
                    for b in range(b1 - b0):
                        ys[b] = xs[b] * k + h


# --- given statistics (eval) ---------------------------------------------------------------------


@serial
def _given_coefficients(weight, bias, mean, var, eps, shift, scale, offset):
    """Per channel: the mean to subtract (``shift``), rstd * weight (``scale``, computed in
    float64 and rounded once to the arrays' dtype) and the bias (``offset``)."""
    for c in range(scale.shape[0]):
        shift[c] = mean[c]
        scale[c] = rsqrt(np.float64(var[c]) + eps) * np.float64(weight[c])
        offset[c] = bias[c]


@serial
def _given_task(x, y, shift, scale, offset, t):
    """Task t of ``_given_tasks``: y = (x - mean) * scale + bias in the coefficients' dtype,
    x's (the statistics have it too): x - mean is exact for x near the mean (1e4 + 1e-3
    noise keeps its digits in float32), then two roundings of an O(1) value."""
    B = x.shape[2]
    if B == 1:  # channels last: one row of C channels
        xr, yr = x[t, :, 0], y[t, :, 0]
        for c in range(xr.shape[0]):
            yr[c] = (xr[c] - shift[c]) * scale[c] + offset[c]
    else:
        C = x.shape[1]
        a, c = t // C, t % C
        xs, ys = x[a, c], y[a, c]
        m, k, h = shift[c], scale[c], offset[c]
        for b in range(B):
            ys[b] = (xs[b] - m) * k + h


@serial
def _given_tasks(x):
    """Tasks of the given-statistics apply: the A rows when B == 1, else the A * C
    (row, channel) runs of B positions."""
    A, C, B = x.shape
    return A if B == 1 else A * C


@kernel
def given_apply(x, weight, bias, mean, var, eps, y):
    """BatchNorm with given statistics (C,) of x's dtype of the (A, C, B) view x into y:
    y = (x - mean) * (rsqrt(var + eps) * weight) + bias, in x's dtype (float32 vectors are
    twice as wide), the coefficient computed in float64 and rounded once."""
    C = x.shape[1]
    shift, scale, offset = np.empty(C, x.dtype), np.empty(C, x.dtype), np.empty(C, x.dtype)
    _given_coefficients(weight, bias, mean, var, eps, shift, scale, offset)
    for t in prange(_given_tasks(x)):
        _given_task(x, y, shift, scale, offset, t)


# By address (``normlab.kernels.cpu.pointers``; x and y (A, C, B), weight, bias, mean and
# var (C,), all of x's element type ``witness``): ``given_apply`` at the cost of the call
# alone, for eval BatchNorm at batch 1.


@serial_kernel
def given_inference_serial(x_at, weight_at, bias_at, mean_at, var_at, y_at, A, C, B, eps, witness):
    """``given_apply`` on the calling thread."""
    x, y = array_at(x_at, (A, C, B), witness), array_at(y_at, (A, C, B), witness)
    weight, bias = array_at(weight_at, (C,), witness), array_at(bias_at, (C,), witness)
    mean, var = array_at(mean_at, (C,), witness), array_at(var_at, (C,), witness)
    shift, scale, offset = np.empty(C, x.dtype), np.empty(C, x.dtype), np.empty(C, x.dtype)
    _given_coefficients(weight, bias, mean, var, eps, shift, scale, offset)
    for t in range(_given_tasks(x)):
        _given_task(x, y, shift, scale, offset, t)


@kernel
def given_inference(x_at, weight_at, bias_at, mean_at, var_at, y_at, A, C, B, eps, witness):
    """``given_apply``, one parallel task per row (B == 1) or (row, channel)."""
    x, y = array_at(x_at, (A, C, B), witness), array_at(y_at, (A, C, B), witness)
    weight, bias = array_at(weight_at, (C,), witness), array_at(bias_at, (C,), witness)
    mean, var = array_at(mean_at, (C,), witness), array_at(var_at, (C,), witness)
    shift, scale, offset = np.empty(C, x.dtype), np.empty(C, x.dtype), np.empty(C, x.dtype)
    _given_coefficients(weight, bias, mean, var, eps, shift, scale, offset)
    for t in prange(_given_tasks(x)):
        _given_task(x, y, shift, scale, offset, t)


# --- backward ----------------------------------------------------------------------------------


@serial
def _gx(d, xv, m, masked):
    """dy * (x - mean); masked, 0 where dy == 0 (x may be NaN in the padding)."""
    t = d * (xv - m)
    if masked:
        return t if d != 0 else 0.0
    return t


@serial
def _grad_sums_rows(dy2, x2, dx2, masked, write_dx, mu, ka, blk, sdb, sdw):
    """B == 1: sdb = sum dy, sdw = sum dy (x - mean) over rows a0:a1 (masked: a term with
    dy == 0 is 0 even if x is NaN); with ``write_dx`` also dx = ka dy (statistics given).
    Without ``write_dx`` each step reads a row from each half of the block (two distant
    streams per array; see ``_moments_rows``); one loop per output (few pointers: LLVM
    vectorizes only below a count of run-time alias checks)."""
    a0, a1, _, _, c0, c1 = blk
    width = c1 - c0
    m = mu[c0:c1]
    k = ka[c0:c1]
    if write_dx:  # one pass that also writes: one row at a time streams best
        for a in range(a0, a1):
            d0 = dy2[a, c0:c1]
            x0 = x2[a, c0:c1]
            for j in range(width):
                sdb[j] += d0[j]
            for j in range(width):
                sdw[j] += _gx(d0[j], x0[j], m[j], masked)
            o0 = dx2[a, c0:c1]
            for j in range(width):
                o0[j] = k[j] * d0[j]
        return
    half = (a1 - a0) // 2
    for i in range(half):
        d0, d1 = dy2[a0 + i, c0:c1], dy2[a0 + half + i, c0:c1]
        x0, x1 = x2[a0 + i, c0:c1], x2[a0 + half + i, c0:c1]
        for j in range(width):
            sdb[j] += d0[j] + d1[j]
        for j in range(width):
            sdw[j] += _gx(d0[j], x0[j], m[j], masked) + _gx(d1[j], x1[j], m[j], masked)
    for a in range(a0 + 2 * half, a1):
        d0 = dy2[a, c0:c1]
        x0 = x2[a, c0:c1]
        for j in range(width):
            sdb[j] += d0[j]
        for j in range(width):
            sdw[j] += _gx(d0[j], x0[j], m[j], masked)


@serial
def _grad_sums_segments(dy, x, dx, masked, write_dx, mu, ka, blk, sdb, sdw):
    """B > 1: as ``_grad_sums_rows``, each (a, c) segment of positions b0:b1 contiguously."""
    a0, a1, b0, b1, c0, c1 = blk
    for a in range(a0, a1):
        for c in range(c0, c1):
            d = dy[a, c, b0:b1]
            xs = x[a, c, b0:b1]
            m = mu[c]
            s1 = 0.0
            s2 = 0.0
            for b in range(b1 - b0):
                s1 += d[b]
                s2 += _gx(d[b], xs[b], m, masked)
            sdb[c - c0] += s1
            sdw[c - c0] += s2
            if write_dx:
                o = dx[a, c, b0:b1]
                k = ka[c]
                for b in range(b1 - b0):
                    o[b] = k * d[b]


@serial
def _input_grad_rows(dy2, x2, dx2, mask, masked, coef, blk):
    """B == 1: dx = ka dy + kb (x - mean) + kk at real rows, ka dy at padded rows (a branch
    per row when the mask has long runs, else a select). For float32 x, real rows take
    ka dy + (kb x + kf), kf = kk - kb mean (one array less per element); the float64 rounding
    of kb x, |mean| / std times eps64, stays far below float32's."""
    a0, a1, _, _, c0, c1 = blk
    mu, ka, kb, kk, kf = coef
    width = c1 - c0
    m = mu[c0:c1]
    k1 = ka[c0:c1]
    k2 = kb[c0:c1]
    k3 = kk[c0:c1]
    k4 = kf[c0:c1]
    if masked and not _runs(mask, a0, a1):  # random mask: select, no branch per row
        flag = np.empty(width, np.uint8)
        for a in range(a0, a1):
            d = dy2[a, c0:c1]
            o = dx2[a, c0:c1]
            xr = x2[a, c0:c1]
            flag[:] = mask[a, 0]
            for j in range(width):
                corr = k2[j] * (xr[j] - m[j]) + k3[j]
                o[j] = k1[j] * d[j] + (corr if flag[j] != 0 else 0.0)
        return
    for a in range(a0, a1):
        d = dy2[a, c0:c1]
        o = dx2[a, c0:c1]
        if masked and mask[a, 0] == 0:
            for j in range(width):
                o[j] = k1[j] * d[j]
        elif x2.itemsize == 4:
            xr = x2[a, c0:c1]
            for j in range(width):
                o[j] = k1[j] * d[j] + (k2[j] * xr[j] + k4[j])
        else:
            xr = x2[a, c0:c1]
            for j in range(width):
                o[j] = k1[j] * d[j] + (k2[j] * (xr[j] - m[j]) + k3[j])


@serial
def _input_grad_segments(dy, x, dx, mask, masked, coef, blk):
    """B > 1: as ``_input_grad_rows``; the correction is selected out at padded positions."""
    a0, a1, b0, b1, c0, c1 = blk
    mu, ka, kb, kk, _ = coef
    for a in range(a0, a1):
        for c in range(c0, c1):
            d = dy[a, c, b0:b1]
            xs = x[a, c, b0:b1]
            o = dx[a, c, b0:b1]
            m, k1, k2, k3 = mu[c], ka[c], kb[c], kk[c]
            if masked:
                r = mask[a, b0:b1]
                for b in range(b1 - b0):
                    corr = k2 * (xs[b] - m) + k3
                    o[b] = k1 * d[b] + (corr if r[b] != 0 else 0.0)
            else:
                for b in range(b1 - b0):
                    o[b] = k1 * d[b] + (k2 * (xs[b] - m) + k3)


@kernel
def channel_backward(dy, x, mean, rstd, weight, mask, count, stats_given, dx, dweight, dbias):
    """Gradients of y = weight[c] * xhat + bias[c], xhat = (x - mean[c]) * rstd[c].

    dbias[c] = sum dy, dweight[c] = sum dy * xhat (masked: 0 where dy == 0), written.
    stats_given (eval): dx = g * rstd with g = dy * weight, fused into the single pass.
    Else, with n = count[0], m the mask (1 without one), sum_g = weight * dbias and
    sum_gx = weight * dweight (0 if weight is 0):
    dx = rstd * (g - m * (sum_g + xhat * sum_gx) / n), a second pass over x and dy."""
    A, C, B = x.shape
    _check(x, mask, min(mean.size, rstd.size, weight.size, dweight.size, dbias.size), count.size)
    if dy.shape != x.shape or dx.shape != x.shape:
        raise ValueError("channel_backward: dy and dx must have the shape of x")
    masked = mask.size != 0
    plan = _plan(A, C, B, x.itemsize)
    parts = plan[1] * plan[3]
    blocks = parts * plan[5]
    mu = np.empty(C)
    ka = np.empty(C)
    for c in range(C):
        mu[c] = mean[c]
        ka[c] = np.float64(rstd[c]) * weight[c]
    pdb = np.empty((parts, C))  # every entry written by one block
    pdw = np.empty((parts, C))
    x2 = x.reshape(A, C * B)
    dy2 = dy.reshape(A, C * B)
    dx2 = dx.reshape(A, C * B)
    for w in prange(blocks):
        p, a0, a1, b0, b1, c0, c1, _ = _block(w, A, C, B, plan)
        sdb = np.zeros(c1 - c0)
        sdw = np.zeros(c1 - c0)
        blk = (a0, a1, b0, b1, c0, c1)
        if B == 1 and masked:
            if stats_given:
                _grad_sums_rows(dy2, x2, dx2, True, True, mu, ka, blk, sdb, sdw)
            else:
                _grad_sums_rows(dy2, x2, dx2, True, False, mu, ka, blk, sdb, sdw)
        elif B == 1:
            if stats_given:
                _grad_sums_rows(dy2, x2, dx2, False, True, mu, ka, blk, sdb, sdw)
            else:
                _grad_sums_rows(dy2, x2, dx2, False, False, mu, ka, blk, sdb, sdw)
        elif masked:
            if stats_given:
                _grad_sums_segments(dy, x, dx, True, True, mu, ka, blk, sdb, sdw)
            else:
                _grad_sums_segments(dy, x, dx, True, False, mu, ka, blk, sdb, sdw)
        elif stats_given:
            _grad_sums_segments(dy, x, dx, False, True, mu, ka, blk, sdb, sdw)
        else:
            _grad_sums_segments(dy, x, dx, False, False, mu, ka, blk, sdb, sdw)
        pdb[p, c0:c1] = sdb
        pdw[p, c0:c1] = sdw
    kb = np.empty(C)
    kk = np.empty(C)
    n = count[0]
    s1 = zeros(C)
    s2 = zeros(C)
    for p in range(parts):  # in block order; vectorized over channels
        for c in range(C):
            s1[c] += pdb[p, c]
            s2[c] += pdw[p, c]
    for c in range(C):
        r = np.float64(rstd[c])
        wc = np.float64(weight[c])
        dbias[c] = s1[c]
        dweight[c] = s2[c] * r
        sum_g = wc * s1[c]
        sum_gx = wc * (s2[c] * r) if wc != 0 else 0.0
        kb[c] = _div(-r * r * sum_gx, n)
        kk[c] = _div(-r * sum_g, n)
    if stats_given:
        return
    kf = np.empty(C)
    for c in range(C):
        kf[c] = kk[c] - kb[c] * mu[c]
    coef = (mu, ka, kb, kk, kf)
    for w in prange(blocks):
        _, a0, a1, b0, b1, c0, c1, _ = _block(w, A, C, B, plan)
        blk = (a0, a1, b0, b1, c0, c1)
        if B == 1 and masked:
            _input_grad_rows(dy2, x2, dx2, mask, True, coef, blk)
        elif B == 1:
            _input_grad_rows(dy2, x2, dx2, mask, False, coef, blk)
        elif masked:
            _input_grad_segments(dy, x, dx, mask, True, coef, blk)
        else:
            _input_grad_segments(dy, x, dx, mask, False, coef, blk)
