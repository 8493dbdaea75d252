"""GroupNorm / InstanceNorm (InstanceNorm = one channel per group) in Triton; the launchers
``group_norm_forward`` and ``group_norm_backward`` have the signatures and outputs of
the Numba launchers of ``normlab.kernels.cpu.launchers``.

x is a contiguous (N, C, S) view, G groups of C // G channels; the mask, when given, is
uint8 (N, S), 1 = real position (the same for every channel). One program per (sample,
group) walks the group in tiles of BLOCK_C channels x BLOCK_S positions, in a fixed order:

    forward:  moments of x - pivot per tile, merged with Chan's formula (one read of x),
              then y = (x - mean) * rstd * weight[c] + bias[c] for every position
    backward: sums over the group, then dx and each channel's sum dy * xhat and sum dy,
              written per sample and added over the samples in order (no atomics)

as ``kernels/cpu/groups.py`` does (same masking rules, same backward formula). Statistics
and accumulation are float32; x, weight, bias may be float32, float16 or bfloat16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from normlab.kernels.gpu.moments import chan_merge, column_sums, finite_or_zero, given, launch

# Elements per tile (a power of two).
TILE = 4096
# Warps a program: 16 elements of a full tile per thread (the backward's block-shaped
# accumulators then fit in registers; ptxas: no spills on sm_90).
WARPS = 8


def tiles(per: int, positions: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) for groups of ``per`` channels of ``positions`` positions."""
    block_s = min(triton.next_power_of_2(positions), TILE)
    block_c = max(1, min(triton.next_power_of_2(per), TILE // block_s))
    return block_c, block_s


@triton.jit
def _group_start(C, S, groups, per):
    """(program's sample n, offset of its group's first element)."""
    t = tl.program_id(0).to(tl.int64)
    n = t // groups
    return n, n * C * S + (t - n * groups) * per * S


@triton.jit
def _real_positions(mask_row, ss, in_range, MASKED: tl.constexpr):
    if MASKED:
        real = in_range & (tl.load(mask_row + ss, mask=in_range, other=0) != 0)
    else:
        real = in_range
    return real


@triton.jit
def _group_pivot(x_group, mask_row, S, MASKED: tl.constexpr, BLOCK_S: tl.constexpr):
    """x at the group's first real position of its first channel (0 if none or not
    finite): the shift that keeps the float32 moments exact for a large mean."""
    first = tl.zeros([], tl.int64)
    if MASKED:
        first += S  # typed before the loop carries it (S may be a constant)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            real = _real_positions(mask_row, ss, ss < S, MASKED)
            first = tl.minimum(first, tl.min(tl.where(real, ss, S), axis=0).to(tl.int64))
        first = tl.where(first < S, first, 0)
    return finite_or_zero(tl.load(x_group + first).to(tl.float32))


@triton.jit
def _tile_moments(d, real):
    """(count, mean, M2) of the real entries of the 2-D tile d."""
    count = tl.sum(tl.sum(real.to(tl.float32), axis=1), axis=0)
    mean = tl.sum(tl.sum(tl.where(real, d, 0.0), axis=1), axis=0) / tl.maximum(count, 1.0)
    centred = d - mean
    m2 = tl.sum(tl.sum(tl.where(real, centred * centred, 0.0), axis=1), axis=0)
    return count, mean, m2


@triton.jit
def _group_norm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    mask_ptr,
    y_ptr,
    mean_ptr,
    var_ptr,
    rstd_ptr,
    C,
    S,
    groups,
    per,
    eps,
    MASKED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    n, start = _group_start(C, S, groups, per)
    c0 = (t - n * groups) * per
    mask_row = mask_ptr + n * S
    k = _group_pivot(x_ptr + start, mask_row, S, MASKED, BLOCK_S)
    count = tl.zeros([], tl.float32)
    mean = tl.zeros([], tl.float32)
    m2 = tl.zeros([], tl.float32)
    for ci in range(0, per, BLOCK_C):
        cs = ci + tl.arange(0, BLOCK_C)
        c_ok = cs < per
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            real = c_ok[:, None] & _real_positions(mask_row, ss, ss < S, MASKED)[None, :]
            offs = start + cs[:, None] * S + ss[None, :]
            v = tl.load(x_ptr + offs, mask=real, other=0.0).to(tl.float32)
            nb, mb, qb = _tile_moments(v - k, real)
            count, mean, m2 = chan_merge(count, mean, m2, nb, mb, qb)
    var = m2 / count  # 0 / 0 = NaN without real positions
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + t, tl.where(count > 0, k + mean, var))
    tl.store(var_ptr + t, var)
    tl.store(rstd_ptr + t, rstd)
    for ci in range(0, per, BLOCK_C):
        cs = ci + tl.arange(0, BLOCK_C)
        c_ok = cs < per
        scale = tl.zeros([BLOCK_C], tl.float32) + rstd
        if HAS_WEIGHT:
            scale = scale * tl.load(w_ptr + c0 + cs, mask=c_ok, other=0.0).to(tl.float32)
        shift = tl.zeros([BLOCK_C], tl.float32)
        if HAS_BIAS:
            shift = tl.load(b_ptr + c0 + cs, mask=c_ok, other=0.0).to(tl.float32)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            ok = c_ok[:, None] & (ss < S)[None, :]
            offs = start + cs[:, None] * S + ss[None, :]
            v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            y = ((v - k) - mean) * scale[:, None] + shift[:, None]
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


def group_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: int,
    eps: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var, rstd), statistics (N, groups) in float32 over real positions."""
    n, c, s = x.shape
    per = c // groups
    y = torch.empty_like(x)
    mean, var, rstd = (
        torch.empty((n, groups), dtype=torch.float32, device=x.device) for _ in range(3)
    )
    if x.numel() == 0:  # no element: NaN statistics, as without a real one
        return y, mean.fill_(float("nan")), var.fill_(float("nan")), rstd.fill_(float("nan"))
    block_c, block_s = tiles(per, s)
    launch(
        _group_norm_kernel,
        (n * groups,),
        x,
        given(weight, x),
        given(bias, x),
        given(mask, x),
        y,
        mean,
        var,
        rstd,
        c,
        s,
        groups,
        per,
        eps,
        MASKED=mask is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        num_warps=WARPS,
    )
    return y, mean, var, rstd


@triton.jit
def _group_norm_backward_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    mask_ptr,
    dx_ptr,
    pw_ptr,
    pb_ptr,
    C,
    S,
    groups,
    per,
    MASKED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """dx = rstd * (g - m * (sum g + xhat * sum g xhat) / n) over one group, g = dy *
    weight[c]; pw[n, c] = sum_s dy * xhat and pb[n, c] = sum_s dy. The stored mean m0 is
    float32: the exact mean m0 + delta, delta = mean(m * (x - m0)), is recovered in the
    first pass."""
    t = tl.program_id(0).to(tl.int64)
    n, start = _group_start(C, S, groups, per)
    c0 = (t - n * groups) * per
    mask_row = mask_ptr + n * S
    m0 = tl.load(mean_ptr + t).to(tl.float32)
    rs = tl.load(rstd_ptr + t).to(tl.float32)
    sd = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    sg = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    sgd = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    real_count = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for ci in range(0, per, BLOCK_C):
        cs = ci + tl.arange(0, BLOCK_C)
        c_ok = cs < per
        w = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + c0 + cs, mask=c_ok, other=0.0).to(tl.float32)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            s_ok = ss < S
            ok = c_ok[:, None] & s_ok[None, :]
            real = c_ok[:, None] & _real_positions(mask_row, ss, s_ok, MASKED)[None, :]
            offs = start + cs[:, None] * S + ss[None, :]
            centred = tl.where(
                ok, tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - m0, 0.0
            )
            g = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32) * w[:, None]
            sd += tl.where(real, centred, 0.0)
            sg += g
            term = g * centred
            if MASKED:
                term = tl.where(g != 0, term, 0.0)  # NaN x in padding with g == 0 adds 0
            sgd += term
            real_count += real.to(tl.float32)
    inv_n = 1.0 / tl.sum(tl.sum(real_count, axis=1), axis=0)
    sum_g = tl.sum(tl.sum(sg, axis=1), axis=0)
    delta = tl.sum(tl.sum(sd, axis=1), axis=0) * inv_n
    c1 = sum_g * inv_n
    c2 = rs * (tl.sum(tl.sum(sgd, axis=1), axis=0) - delta * sum_g) * inv_n
    for ci in range(0, per, BLOCK_C):
        cs = ci + tl.arange(0, BLOCK_C)
        c_ok = cs < per
        w = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + c0 + cs, mask=c_ok, other=0.0).to(tl.float32)
        sw = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        sb = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            s_ok = ss < S
            ok = c_ok[:, None] & s_ok[None, :]
            offs = start + cs[:, None] * S + ss[None, :]
            v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            e = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            xh = ((v - m0) - delta) * rs
            correction = c1 + xh * c2
            if MASKED:
                real = _real_positions(mask_row, ss, s_ok, MASKED)
                correction = tl.where(real[None, :], correction, 0.0)
            dx = rs * (e * w[:, None] - correction)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
            term = e * xh
            if MASKED:
                term = tl.where(e != 0, term, 0.0)
            sw += tl.where(ok, term, 0.0)
            sb += e
        at = n * C + c0 + cs
        tl.store(pw_ptr + at, tl.sum(sw, axis=1), mask=c_ok)
        tl.store(pb_ptr + at, tl.sum(sb, axis=1), mask=c_ok)


def group_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); dweight is written even without a weight (as for weight 1)."""
    n, c, s = x.shape
    per = c // groups
    dx, dweight, dbias = torch.empty_like(x), x.new_empty(c), x.new_empty(c)
    if x.numel() == 0:  # sums over no element
        return dx, dweight.zero_(), dbias.zero_()
    pw, pb = (torch.empty((n, c), dtype=torch.float32, device=x.device) for _ in range(2))
    block_c, block_s = tiles(per, s)
    launch(
        _group_norm_backward_kernel,
        (n * groups,),
        dy,
        x,
        given(weight, x),
        mean,
        rstd,
        given(mask, x),
        dx,
        pw,
        pb,
        c,
        s,
        groups,
        per,
        MASKED=mask is not None,
        HAS_WEIGHT=weight is not None,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        num_warps=WARPS,
    )
    column_sums(pw, dweight)
    column_sums(pb, dbias)
    return dx, dweight, dbias
