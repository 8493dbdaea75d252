"""PowerNorm after warmup in Triton: the forward and the paper's approximate backward (Shen
et al. 2020, Algorithm 1). ``power_norm_forward`` and ``power_norm_backward`` have the
signatures and outputs of ``normlab.ops.power_norm``'s Numba launchers (of ``plan`` they
use ``view`` and ``kernel_mask``).

x is an (A, C, B) view as in ``channels`` (PowerNorm's default channels-last layout is
(N*L, C, 1)), the mask uint8 (A, B). With rstd = 1 / sqrt(phi + eps) from the running
quadratic mean phi, nu the running gradient statistic (the previous step's), xhat = x * rstd
and g = weight * dy, one pass over x and dy gives (as ``kernels/cpu/power_norm.py``):

    dx      = (g - m * nu * xhat) * rstd          (m = 1 at real elements, else 0)
    dweight = sum dy * xhat,  dbias = sum dy      (all elements; masked, dy = 0 adds 0)
    gamma   = sum_real xhat^2,  lam = sum_real g * xhat     (divided by the count after)

The sums are per (channel tile, span of rows) as in ``channels``, then added in span order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from normlab.kernels.gpu.channels import (
    WARPS,
    channel_apply,
    channel_block,
    layout,
    offsets,
    real_rows,
)
from normlab.kernels.gpu.moments import column_sums, given, launch

SUMS = 4  # dweight, dbias, gamma, lam


def _rstd(phi, eps):
    return torch.rsqrt(phi.reshape(-1).float() + eps)


def power_norm_forward(plan, x, weight, bias, phi, eps):
    """y = x * rstd * weight + bias on the (A, C, B) view ``plan.view``."""
    view = x.reshape(plan.view)
    w = None if weight is None else weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    return channel_apply(view, None, None, _rstd(phi, eps), w, b).reshape(x.shape)


@triton.jit
def _power_norm_backward_kernel(
    dy_ptr,
    x_ptr,
    rstd_ptr,
    w_ptr,
    nu_ptr,
    mask_ptr,
    dx_ptr,
    parts_ptr,
    R,
    C,
    B,
    span,
    MASKED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_SUMS: tl.constexpr,
):
    """dx of one span of rows and channel tile; its four sums to parts[span, k, c]."""
    pid_c = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    cs, c_ok = channel_block(pid_c, BLOCK_C, C)
    r = tl.load(rstd_ptr + cs, mask=c_ok, other=0.0)[None, :]
    nu = tl.load(nu_ptr + cs, mask=c_ok, other=0.0)[None, :]
    w = tl.full([1, BLOCK_C], 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    r_start = pid_p * span
    r_end = tl.minimum(r_start + span, R)
    sdw = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    sdb = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    sgamma = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    slam = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        in_range = rs < r_end
        ok = in_range[:, None] & c_ok[None, :]
        real = real_rows(mask_ptr, rs, in_range, MASKED)[:, None] & c_ok[None, :]
        offs = offsets(rs, cs, C, B, CHANNELS_LAST)
        d = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        xh = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) * r
        g = d * w
        dx = (g - tl.where(real, nu * xh, 0.0)) * r  # selected: NaN padding stays out
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        term = d * xh
        if MASKED:
            term = tl.where(d != 0, term, 0.0)
        sdw += term
        sdb += d
        sgamma += tl.where(real, xh * xh, 0.0)
        slam += tl.where(real, g * xh, 0.0)
    out = pid_p * NUM_SUMS * C + cs
    tl.store(parts_ptr + out, tl.sum(sdw, axis=0), mask=c_ok)
    tl.store(parts_ptr + out + C, tl.sum(sdb, axis=0), mask=c_ok)
    tl.store(parts_ptr + out + 2 * C, tl.sum(sgamma, axis=0), mask=c_ok)
    tl.store(parts_ptr + out + 3 * C, tl.sum(slam, axis=0), mask=c_ok)


def power_norm_backward(plan, dy, x, weight, bias, phi, nu, eps, alpha_bkw, mask):
    """The one-pass kernel; returns (dx, dweight, dbias, new_nu), new_nu float32."""
    lay = layout(plan.view)
    c = lay.channels
    rstd = _rstd(phi, eps)
    m = plan.kernel_mask(x, mask)
    nu32 = nu.reshape(-1).float()
    dx = torch.empty_like(x)
    if x.numel() == 0:  # no element: no gradient, nu unchanged
        zeros = torch.zeros(c, dtype=torch.float32, device=x.device)
        dweight = None if weight is None else zeros.to(weight.dtype).reshape(weight.shape)
        dbias = None if bias is None else zeros.to(bias.dtype).reshape(bias.shape)
        return dx, dweight, dbias, nu32.clone()
    parts = torch.empty((lay.partials, SUMS * c), dtype=torch.float32, device=x.device)
    launch(
        _power_norm_backward_kernel,
        (lay.channel_tiles, lay.partials),
        dy.contiguous().reshape(plan.view),
        x.reshape(plan.view),
        rstd,
        given(None if weight is None else weight.reshape(-1), x),
        nu32,
        given(m, x),
        dx.view(plan.view),
        parts,
        lay.rows,
        c,
        lay.positions,
        lay.span,
        MASKED=m is not None,
        HAS_WEIGHT=weight is not None,
        CHANNELS_LAST=lay.channels_last,
        BLOCK_R=lay.block_r,
        BLOCK_C=lay.block_c,
        NUM_SUMS=SUMS,
        num_warps=WARPS,
    )
    sums = column_sums(parts, torch.empty(SUMS * c, dtype=torch.float32, device=x.device))
    sums = sums.reshape(SUMS, c)
    count = lay.rows if m is None else m.sum()
    gamma, lam = sums[2] / count, sums[3] / count
    new_nu = nu32 * (1 - (1 - alpha_bkw) * gamma) + (1 - alpha_bkw) * lam
    dweight = None if weight is None else sums[0].to(weight.dtype).reshape(weight.shape)
    dbias = None if bias is None else sums[1].to(bias.dtype).reshape(bias.shape)
    return dx, dweight, dbias, new_nu
