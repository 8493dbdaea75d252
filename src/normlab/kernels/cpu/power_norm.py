"""PowerNorm's approximate backward (Shen et al. 2020, Algorithm 1) in one pass.

x is viewed as (A, C, B) as in ``channels`` (PowerNorm's default channels-last layout is
(N*L, C, 1)); the mask is uint8 (A, B) (1 = real) or shape (0, 0) for none. With rstd the
reciprocal root of the running quadratic mean (plus eps), nu the running gradient statistic
(both per channel, before this step's update), xhat = x * rstd and g = weight * dy:

    dx     = (g - m * nu * xhat) * rstd             (m = 1 at real elements, else 0)
    dweight = sum dy * xhat,   dbias = sum dy       (all elements; dy = 0 adds 0)
    gamma  = sum_real xhat^2,  lam = sum_real g * xhat   (the caller divides by the count)

Every term is known before the pass (nu is the previous step's), so x and dy are read once
and dx written once. Sums go over fixed blocks of rows, merged in block order:
bit-identical for any thread count. The forward is ``channels.channel_apply``.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.kernels.cpu.common import zeros
from normlab.kernels.cpu.runtime import CHUNKS, kernel, serial

SUMS = 4  # dweight, dbias, gamma, lam


@serial
def _terms(d, xv, real, masked, r, w_c, nu_c):
    """(dx, dweight term, gamma term, lam term) of one element; padding is selected out,
    never multiplied (NaN/Inf there must not leak), and with a mask dy = 0 adds 0."""
    xh = np.float64(xv) * r
    g = d * w_c
    correction = nu_c * xh if real else 0.0
    dw = 0.0 if masked and d == 0.0 else d * xh
    gamma = xh * xh if real else 0.0
    lam = g * xh if real else 0.0
    return (g - correction) * r, dw, gamma, lam


@serial
def _rows_block(dy, x, dx, mask, masked, rstd, w, nu, a0, a1, part):
    """B == 1: rows of C contiguous channels."""
    for a in range(a0, a1):
        real = (not masked) or mask[a, 0] != 0
        for c in range(x.shape[1]):
            d = np.float64(dy[a, c, 0])
            v, dw, gamma, lam = _terms(d, x[a, c, 0], real, masked, rstd[c], w[c], nu[c])
            dx[a, c, 0] = v
            part[0, c] += dw
            part[1, c] += d
            part[2, c] += gamma
            part[3, c] += lam


@serial
def _segments_block(dy, x, dx, mask, masked, rstd, w, nu, a0, a1, part):
    """B > 1: for each row and channel, B contiguous positions."""
    for a in range(a0, a1):
        for c in range(x.shape[1]):
            sw, sb, sg, sl = 0.0, 0.0, 0.0, 0.0
            for b in range(x.shape[2]):
                real = (not masked) or mask[a, b] != 0
                d = np.float64(dy[a, c, b])
                v, dw, gamma, lam = _terms(d, x[a, c, b], real, masked, rstd[c], w[c], nu[c])
                dx[a, c, b] = v
                sw += dw
                sb += d
                sg += gamma
                sl += lam
            part[0, c] += sw
            part[1, c] += sb
            part[2, c] += sg
            part[3, c] += sl


@kernel
def power_norm_backward(dy, x, rstd, weight, nu, mask, dx, sums):
    """Writes dx (A, C, B) and ``sums`` (4, C) float64: dweight, dbias, gamma, lam."""
    a_count, c_count, b_count = x.shape
    size = max(1, -(-a_count // CHUNKS))
    blocks = -(-a_count // size) if a_count else 0
    masked = mask.shape[0] != 0
    rs = rstd.astype(np.float64)
    w = weight.astype(np.float64)
    nv = nu.astype(np.float64)
    partial = zeros(max(blocks, 1) * SUMS * c_count).reshape(max(blocks, 1), SUMS, c_count)
    for blk in prange(blocks):
        a0 = blk * size
        a1 = min(a_count, a0 + size)
        if b_count == 1:
            _rows_block(dy, x, dx, mask, masked, rs, w, nv, a0, a1, partial[blk])
        else:
            _segments_block(dy, x, dx, mask, masked, rs, w, nv, a0, a1, partial[blk])
    for k in range(SUMS):
        for c in range(c_count):
            sums[k, c] = 0.0
    for blk in range(blocks):
        for k in range(SUMS):
            for c in range(c_count):
                sums[k, c] += partial[blk, k, c]
