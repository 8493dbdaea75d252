"""GroupNorm (and InstanceNorm: groups == channels) on x (B, C, S), optionally masked: one
parallel task per (sample, group), float64 accumulation for float32 input too.

A group is C // groups channels times the S positions of one sample. With a mask m (B, S)
(1 = real position, the same for every channel) only real positions count, n = (C // groups)
* sum_s m (n = (C // groups) * S unmasked), and every position is normalized:

    mean = (1/n) sum m * x          var = (1/n) sum m * (x - mean)^2      (two passes)
    rstd = 1 / sqrt(var + eps)      y   = (x - mean) * rstd * weight[c] + bias[c]

Backward, with xhat = (x - mean) * rstd, g = dy * weight[c] and sums over the whole group
(padding included; where g == 0, g * xhat counts 0 even if x is NaN there):

    dx      = rstd * (g - m * (sum g + xhat * sum g * xhat) / n)
    dweight = sum_{b, s} dy * xhat  dbias = sum_{b, s} dy

Masked entries are selected away, never multiplied by 0, so NaN/Inf in padding stays out of
the statistics. dweight and dbias are summed per fixed block of samples, then over the
blocks in order: bit-identical for any thread count.
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
    zeros,
)
from normlab.kernels.cpu.half import compute, pivot
from normlab.kernels.cpu.pointers import array_at
from normlab.kernels.cpu.runtime import CHUNKS, kernel, serial, serial_kernel


@serial
def _real_positions(mask, b):
    """How many positions of sample b are real: sum_s mask[b, s]."""
    n = 0
    for s in range(mask.shape[1]):
        n += mask[b, s]
    return n


@serial
def _statistics(x, seg, b, c0, per, mask, masked, count):
    """(mean, var) of channels c0 .. c0 + per - 1 of sample b of x (B, C, S) over the real
    positions; ``seg`` is the same group as one contiguous 1-D run (used when unmasked).

    Inner loops index with their own counter from 0 (``seg[i]``, ``x[b, c, s]``): an offset
    index such as ``xf[b, start + i]`` keeps LLVM from vectorizing.
    """
    positions = x.shape[2]
    total = 0.0
    if masked:
        for c in range(c0, c0 + per):
            for s in range(positions):
                v = np.float64(x[b, c, s])
                total += v if mask[b, s] != 0 else 0.0
    else:
        for i in range(seg.shape[0]):
            total += seg[i]
    mu = div(total, count)
    sq = 0.0
    if masked:
        for c in range(c0, c0 + per):
            for s in range(positions):
                d = x[b, c, s] - mu
                sq += d * d if mask[b, s] != 0 else 0.0
    else:
        for i in range(seg.shape[0]):
            d = seg[i] - mu
            sq += d * d
    return mu, div(sq, count)


@serial
def _normalize_group(x, xf, y, yf, weight, bias, eps, mask, masked, count, b, grp, per):
    """Normalizes group ``grp`` (channels grp * per .. + per - 1) of sample b of x (B, C, S)
    (``xf``, ``yf``: x and y as (B, C * S)) into y; returns its (mean, var, rstd) in float64.

    Unmasked, the group is one contiguous run and is computed as the rows kernels compute a
    row: in ``half.compute``'s dtype (float32 for float32 input), deviations taken from the
    run's first element k (x - k is exact near k, so 1e4 + 1e-3 noise keeps its spread).
    Masked, in float64 over the real positions (``_statistics``)."""
    positions = x.shape[2]
    c0 = grp * per
    seg = xf[b, c0 * positions : (c0 + per) * positions]
    if masked:
        mu, v = _statistics(x, seg, b, c0, per, mask, masked, count)
        rs = rsqrt(v + eps)
        for c in range(c0, c0 + per):
            scale = rs * weight[c]
            shift = np.float64(bias[c])
            for s in range(positions):
                y[b, c, s] = (x[b, c, s] - mu) * scale + shift
        return mu, v, rs
    k = pivot(seg)
    m = compute(seg, div(shifted_sum(seg, k), count))  # the mean of x - k
    v = div(shifted_squares(seg, k, m), count)
    rs = compute(seg, rsqrt(v + eps))
    if positions == 1:  # one contiguous loop over the channels
        ys, ws, bs = yf[b, c0 : c0 + per], weight[c0 : c0 + per], bias[c0 : c0 + per]
        for i in range(per):
            ys[i] = ((seg[i] - k) - m) * (rs * ws[i]) + bs[i]
    else:
        for c in range(c0, c0 + per):
            scale = rs * weight[c]
            shift = bias[c]
            xc, yc = x[b, c], y[b, c]
            for s in range(positions):
                yc[s] = ((xc[s] - k) - m) * scale + shift
    return np.float64(k) + np.float64(m), np.float64(v), np.float64(rs)


@kernel
def group_norm_forward(x, weight, bias, groups, eps, mask, y, mean, var, rstd):
    """y = (x - mean) * rstd * weight[c] + bias[c] per (sample, group) of x (B, C, S);
    writes y and mean, var (biased), rstd (B, groups). ``mask`` uint8 (B, S), or shape
    (0, 0) for none: the statistics count real positions only."""
    batch, channels, positions = x.shape
    per = channels // groups
    masked = mask.shape[0] != 0
    xf = x.reshape(batch, channels * positions)
    yf = y.reshape(batch, channels * positions)
    real = np.empty(batch, np.int64)  # real positions per sample (a serial fill: np.full
    for b in range(batch):  # would be a parallel region of its own)
        real[b] = positions
    if masked:
        for b in prange(batch):
            real[b] = _real_positions(mask, b)
    for t in prange(batch * groups):
        b = t // groups
        grp = t - b * groups
        mu, v, rs = _normalize_group(
            x, xf, y, yf, weight, bias, eps, mask, masked, per * real[b], b, grp, per
        )
        mean[b, grp] = mu
        var[b, grp] = v
        rstd[b, grp] = rs


# Inference without a mask, by address (``normlab.kernels.cpu.pointers``; x and y (B, C, S),
# weight and bias (C,), all of x's element type ``witness``): ``group_norm_forward``'s y at
# the cost of the call alone, for a diffusion UNet or a CNN at batch 1.


@serial_kernel
def group_norm_inference_serial(x_at, weight_at, bias_at, y_at, B, C, S, groups, eps, witness):
    """``group_norm_forward``'s y without a mask, on the calling thread."""
    x, y = array_at(x_at, (B, C, S), witness), array_at(y_at, (B, C, S), witness)
    weight, bias = array_at(weight_at, (C,), witness), array_at(bias_at, (C,), witness)
    xf, yf = x.reshape(B, C * S), y.reshape(B, C * S)
    per = C // groups
    mask = np.empty((0, 0), np.uint8)
    for t in range(B * groups):
        b = t // groups
        _normalize_group(
            x, xf, y, yf, weight, bias, eps, mask, False, per * S, b, t - b * groups, per
        )


@kernel
def group_norm_inference(x_at, weight_at, bias_at, y_at, B, C, S, groups, eps, witness):
    """``group_norm_forward``'s y without a mask, one parallel task per (sample, group)."""
    x, y = array_at(x_at, (B, C, S), witness), array_at(y_at, (B, C, S), witness)
    weight, bias = array_at(weight_at, (C,), witness), array_at(bias_at, (C,), witness)
    xf, yf = x.reshape(B, C * S), y.reshape(B, C * S)
    per = C // groups
    mask = np.empty((0, 0), np.uint8)
    for t in prange(B * groups):
        b = t // groups
        _normalize_group(
            x, xf, y, yf, weight, bias, eps, mask, False, per * S, b, t - b * groups, per
        )


@serial
def _group_backward(dy, x, weight, b, c0, per, mask, masked, count, m0, rs, dx, pw, pb):
    """dx of channels c0 .. c0 + per - 1 of sample b (one group); adds sum_s dy * xhat and
    sum_s dy of each channel c to pw[c] and pb[c].

    The stored mean m0 may be rounded (float32): the float64 mean m0 + delta, delta =
    mean(m * (x - m0)), is recovered in the pass that sums the gradients.
    """
    positions = x.shape[2]
    sd = 0.0
    sg = 0.0
    sgd = 0.0
    for c in range(c0, c0 + per):
        w = np.float64(weight[c])
        if masked:
            for s in range(positions):
                d = x[b, c, s] - m0
                g = dy[b, c, s] * w
                sd += d if mask[b, s] != 0 else 0.0
                sg += g
                sgd += g * d if g != 0 else 0.0
        else:
            for s in range(positions):
                d = x[b, c, s] - m0
                g = dy[b, c, s] * w
                sd += d
                sg += g
                sgd += g * d
    # One reciprocal with several uses: a lone ``a / n`` would be sunk into the loop below
    # by LLVM's reassociation (a vector division per element).
    inv_n = div(1.0, count)
    delta = sd * inv_n
    mu = m0 + delta
    c1 = sg * inv_n
    c2 = rs * (sgd - delta * sg) * inv_n
    for c in range(c0, c0 + per):
        w = np.float64(weight[c])
        sw = 0.0
        sb = 0.0
        if masked:
            for s in range(positions):
                xh = (x[b, c, s] - mu) * rs
                e = np.float64(dy[b, c, s])
                corr = c1 + xh * c2
                dx[b, c, s] = rs * (e * w - (corr if mask[b, s] != 0 else 0.0))
                sw += e * xh if e != 0 else 0.0
                sb += e
        else:
            for s in range(positions):
                xh = (x[b, c, s] - mu) * rs
                e = np.float64(dy[b, c, s])
                dx[b, c, s] = rs * (e * w - c1 - xh * c2)
                sw += e * xh
                sb += e
        pw[c] += sw
        pb[c] += sb


@serial
def _group_backward_s1(dys, xs, ws, count, m0, rs, dxs, pw, pb):
    """``_group_backward`` unmasked with one position: the group's channels are the
    contiguous runs xs, dys, dxs (weights ws, partial sums pw, pb); the same arithmetic."""
    sd = 0.0
    sg = 0.0
    sgd = 0.0
    for i in range(xs.shape[0]):
        d = xs[i] - m0
        g = dys[i] * np.float64(ws[i])
        sd += d
        sg += g
        sgd += g * d
    inv_n = div(1.0, count)
    delta = sd * inv_n
    mu = m0 + delta
    c1 = sg * inv_n
    c2 = rs * (sgd - delta * sg) * inv_n
    for i in range(xs.shape[0]):
        xh = (xs[i] - mu) * rs
        e = np.float64(dys[i])
        dxs[i] = rs * (e * np.float64(ws[i]) - c1 - xh * c2)
        pw[i] += e * xh
        pb[i] += e


@kernel
def group_norm_backward(dy, x, weight, mean, rstd, groups, mask, dx, dweight, dbias):
    """dx = rstd * (g - m * (sum g + xhat * sum g * xhat) / n) per (sample, group), g = dy *
    weight[c]; dweight[c] = sum dy * xhat, dbias[c] = sum dy over samples and positions
    (written). ``mask`` uint8 (B, S) or shape (0, 0) as in the forward.

    The samples are split into fixed blocks (``runtime.chunk_bounds``); each block's
    channels sum its samples in order into the block's partial row, then the blocks are
    added in order. A task is a block times a range of groups (a few ranges only when there
    are few blocks), walking its samples' memory in order.
    """
    batch, channels, positions = x.shape
    per = channels // groups
    masked = mask.shape[0] != 0
    flat = positions == 1 and not masked
    xf = x.reshape(batch, channels * positions)
    dyf = dy.reshape(batch, channels * positions)
    dxf = dx.reshape(batch, channels * positions)
    blocks, size = serial_chunk_bounds(batch)
    span = -(-groups // min(groups, max(1, -(-CHUNKS // max(blocks, 1)))))  # groups per task
    parts = -(-groups // span)
    pw = zeros(blocks * channels).reshape(blocks, channels)
    pb = zeros(blocks * channels).reshape(blocks, channels)
    for t in prange(blocks * parts):
        blk = t // parts
        first = (t - blk * parts) * span
        for b in range(blk * size, min(batch, (blk + 1) * size)):
            count = per * (_real_positions(mask, b) if masked else positions)
            for grp in range(first, min(groups, first + span)):
                c0 = grp * per
                m0 = np.float64(mean[b, grp])
                rs = np.float64(rstd[b, grp])
                if flat:
                    c1 = c0 + per
                    _group_backward_s1(
                        dyf[b, c0:c1],
                        xf[b, c0:c1],
                        weight[c0:c1],
                        count,
                        m0,
                        rs,
                        dxf[b, c0:c1],
                        pw[blk, c0:c1],
                        pb[blk, c0:c1],
                    )
                else:
                    _group_backward(
                        dy, x, weight, b, c0, per, mask, masked, count, m0, rs, dx, pw[blk], pb[blk]
                    )
    add_blocks(pw, dweight)
    add_blocks(pb, dbias)
