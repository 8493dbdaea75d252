"""BatchNorm in Triton: per-channel statistics over every other axis, the affine apply, the
backward. The launchers ``batch_norm_train``, ``batch_norm_given`` and
``batch_norm_backward`` have the signatures and outputs of the Numba launchers of
``normlab.kernels.cpu.launchers``.

x is viewed as (A, C, B) as in ``kernels/cpu/channels.py``: C channels, A the product of the
axes before the channel axis, B of those after it (NCHW: (N, C, H*W); channels last:
(N*L, C, 1)); the mask, when given, is uint8 (A, B), 1 = real element. A channel's R = A * B
elements are walked as r = a * B + b (the mask's own flat index). A block is a tile of
BLOCK_R of those times BLOCK_C channels: with B == 1 the tile's rows are contiguous runs of
channels (read along C), with B > 1 a tile is one channel and its runs of positions.

The reduction over R is split into ``partials`` fixed spans of rows, one program per (channel
tile, span), each writing float32 partial sums; a small kernel merges the spans in order.
The split is a function of the shape alone: every run gives the same bits, and there are
no atomics. Statistics are float32 (moments of x minus a pivot, ``moments``); inputs may be
float32, float16 or bfloat16, accumulation is float32, outputs have the input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from normlab.kernels.gpu.moments import block_moments, chan_merge, finite_or_zero, given, launch

# Elements of x per block (a power of two).
TILE = 4096
# Channels per block when B == 1 (channels last): the rows of a block are this many
# contiguous channels.
MAX_TILE_CHANNELS = 128
# A span (one program's share of a channel's R elements) is at least this many blocks of
# rows, and there are at most MAX_PARTIALS spans unless a span would exceed MAX_SPAN rows
# (float32 counts are exact up to 2**24).
PARTIAL_TILES = 8
MAX_PARTIALS = 512
MAX_SPAN = 1 << 24
# Warps of the kernels that stream x: 16 elements of a 4096-element block per thread, so the
# backward's three block-shaped accumulators fit in registers (ptxas: no spills on sm_90).
WARPS = 8


@dataclass(frozen=True)
class Layout:
    """How an (A, C, B) reduction is cut: blocks of ``block_r`` x ``block_c``, spans of
    ``span`` rows, ``partials`` spans per channel."""

    rows: int  # R = A * B elements per channel
    channels: int
    positions: int  # B
    block_r: int
    block_c: int
    span: int
    partials: int

    @property
    def channels_last(self) -> bool:
        return self.positions == 1

    @property
    def channel_tiles(self) -> int:
        return triton.cdiv(self.channels, self.block_c)

    @property
    def row_tiles(self) -> int:
        return triton.cdiv(self.rows, self.block_r)


def layout(shape) -> Layout:
    """The blocks and spans for an (A, C, B) view (module constants decide; tests shrink
    them so that every loop runs several times on small inputs)."""
    a, c, b = shape
    rows = a * b
    block_c = min(triton.next_power_of_2(max(c, 1)), MAX_TILE_CHANNELS) if b == 1 else 1
    block_r = max(1, min(TILE // block_c, triton.next_power_of_2(max(rows, 1))))
    tiles = triton.cdiv(rows, block_r)
    per_span = max(PARTIAL_TILES, triton.cdiv(tiles, MAX_PARTIALS))
    per_span = max(1, min(per_span, MAX_SPAN // block_r))
    span = per_span * block_r
    return Layout(rows, c, b, block_r, block_c, span, max(1, triton.cdiv(rows, span)))


# --- shared pieces -------------------------------------------------------------------------


@triton.jit
def offsets(rs, cs, C, B, CHANNELS_LAST: tl.constexpr):
    """Offsets of x[a, c, b] for the tile rows rs (r = a * B + b) times channels cs."""
    if CHANNELS_LAST:
        offs = rs[:, None] * C + cs[None, :]
    else:
        a = rs // B
        offs = (a * C * B + (rs - a * B))[:, None] + (cs * B)[None, :]
    return offs


@triton.jit
def real_rows(mask_ptr, rs, in_range, MASKED: tl.constexpr):
    """Which of the rows rs are real elements (in range and, with a mask, not padding)."""
    if MASKED:
        real = in_range & (tl.load(mask_ptr + rs, mask=in_range, other=0) != 0)
    else:
        real = in_range
    return real


@triton.jit
def _pivot(x_ptr, first_ptr, cs, c_ok, C, B, MASKED: tl.constexpr):
    """x at the first real element of each channel cs (0 where not finite)."""
    if MASKED:
        first = tl.load(first_ptr).to(tl.int64)
    else:
        first = tl.full([], 0, tl.int64)
    a = first // B
    k = tl.load(x_ptr + a * C * B + cs * B + (first - a * B), mask=c_ok, other=0.0)
    return finite_or_zero(k.to(tl.float32))


@triton.jit
def channel_block(pid_c, BLOCK_C: tl.constexpr, C):
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    return cs, cs < C


# --- statistics ----------------------------------------------------------------------------


@triton.jit
def _moments_kernel(
    x_ptr,
    mask_ptr,
    first_ptr,
    pn_ptr,
    pmean_ptr,
    pm2_ptr,
    R,
    C,
    B,
    span,
    MASKED: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(count, mean of x - pivot, M2) of one span of rows, per channel of one tile."""
    pid_c = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    cs, c_ok = channel_block(pid_c, BLOCK_C, C)
    k = _pivot(x_ptr, first_ptr, cs, c_ok, C, B, MASKED)
    r_start = pid_p * span
    r_end = tl.minimum(r_start + span, R)
    n = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        real = real_rows(mask_ptr, rs, rs < r_end, MASKED)[:, None] & c_ok[None, :]
        offs = offsets(rs, cs, C, B, CHANNELS_LAST)
        v = tl.load(x_ptr + offs, mask=real, other=0.0).to(tl.float32)
        nb, mb, qb = block_moments(v - k[None, :], real, 0)
        n, mean, m2 = chan_merge(n, mean, m2, nb, mb, qb)
    out = pid_p * C + cs
    tl.store(pn_ptr + out, n, mask=c_ok)
    tl.store(pmean_ptr + out, mean, mask=c_ok)
    tl.store(pm2_ptr + out, m2, mask=c_ok)


@triton.jit
def _moments_finalize_kernel(
    x_ptr,
    first_ptr,
    pn_ptr,
    pmean_ptr,
    pm2_ptr,
    mean_ptr,
    var_ptr,
    rstd_ptr,
    center_ptr,
    offset_ptr,
    count_ptr,
    partials,
    C,
    B,
    eps,
    MASKED: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merges the spans in order: mean, biased var, rstd; the apply's centre (the pivot)
    and offset (the mean of x - pivot); count[0]. No real element gives NaN statistics."""
    cs, c_ok = channel_block(tl.program_id(0).to(tl.int64), BLOCK_C, C)
    k = _pivot(x_ptr, first_ptr, cs, c_ok, C, B, MASKED)
    n = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    at = cs  # partial p, channels cs: p * C + cs (64-bit)
    for _ in range(0, partials):
        nb = tl.load(pn_ptr + at, mask=c_ok, other=0.0)
        mb = tl.load(pmean_ptr + at, mask=c_ok, other=0.0)
        qb = tl.load(pm2_ptr + at, mask=c_ok, other=0.0)
        n, mean, m2 = chan_merge(n, mean, m2, nb, mb, qb)
        at += C
    var = m2 / tl.where(c_ok, n, 1.0)  # 0 / 0 = NaN for a channel without real elements
    tl.store(mean_ptr + cs, tl.where(n > 0, k + mean, var), mask=c_ok)
    tl.store(var_ptr + cs, var, mask=c_ok)
    tl.store(rstd_ptr + cs, 1.0 / tl.sqrt(var + eps), mask=c_ok)
    tl.store(center_ptr + cs, k, mask=c_ok)
    tl.store(offset_ptr + cs, mean, mask=c_ok)
    tl.store(count_ptr + cs * 0, n, mask=cs == 0)


# --- apply ---------------------------------------------------------------------------------


@triton.jit
def _apply_kernel(
    x_ptr,
    y_ptr,
    center_ptr,
    offset_ptr,
    rstd_ptr,
    w_ptr,
    b_ptr,
    R,
    C,
    B,
    channel_tiles,
    HAS_CENTER: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """y = ((x - center) - offset) * rstd * weight + bias, per channel."""
    pid = tl.program_id(0).to(tl.int64)
    pid_r = pid // channel_tiles
    cs, c_ok = channel_block(pid - pid_r * channel_tiles, BLOCK_C, C)
    rs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    scale = tl.load(rstd_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    ok = (rs < R)[:, None] & c_ok[None, :]
    offs = offsets(rs, cs, C, B, CHANNELS_LAST)
    v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_CENTER:
        v = v - tl.load(center_ptr + cs, mask=c_ok, other=0.0)[None, :]
    if HAS_OFFSET:
        v = v - tl.load(offset_ptr + cs, mask=c_ok, other=0.0)[None, :]
    y = v * scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


def channel_apply(x, center, offset, rstd, weight, bias) -> torch.Tensor:
    """y = ((x - center) - offset) * rstd * weight + bias on the (A, C, B) view x; every
    per-channel argument but ``rstd`` may be None (then 0, 0, 1, 0). Returns y (x's dtype)."""
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    lay = layout(x.shape)
    launch(
        _apply_kernel,
        (lay.row_tiles * lay.channel_tiles,),
        x,
        y,
        given(center, x),
        given(offset, x),
        rstd,
        given(weight, x),
        given(bias, x),
        lay.rows,
        lay.channels,
        lay.positions,
        lay.channel_tiles,
        HAS_CENTER=center is not None,
        HAS_OFFSET=offset is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        CHANNELS_LAST=lay.channels_last,
        BLOCK_R=lay.block_r,
        BLOCK_C=lay.block_c,
        num_warps=WARPS,
    )
    return y


def _first_real(mask, x):
    """Index r of the first real element (a (1,) int64 tensor on x's device; no host
    synchronisation), or a placeholder without a mask."""
    if mask is None:
        return x
    return torch.argmax(mask.reshape(-1)).reshape(1)


def _stats(x: torch.Tensor, mask: torch.Tensor | None, eps: float):
    """(mean, var, rstd, center, offset, count): float32 per-channel statistics."""
    lay = layout(x.shape)
    c, parts = lay.channels, lay.partials
    f32 = {"dtype": torch.float32, "device": x.device}
    if x.numel() == 0:  # no element: NaN statistics, as without a real one
        nan = torch.full((c,), float("nan"), **f32)
        zero = torch.zeros(c, **f32)
        return nan, nan.clone(), nan.clone(), zero, zero.clone(), torch.zeros(1, **f32)
    pn, pmean, pm2 = (torch.empty((parts, c), **f32) for _ in range(3))
    first = _first_real(mask, x)
    masked = mask is not None
    launch(
        _moments_kernel,
        (lay.channel_tiles, parts),
        x,
        given(mask, x),
        first,
        pn,
        pmean,
        pm2,
        lay.rows,
        c,
        lay.positions,
        lay.span,
        MASKED=masked,
        CHANNELS_LAST=lay.channels_last,
        BLOCK_R=lay.block_r,
        BLOCK_C=lay.block_c,
        num_warps=WARPS,
    )
    mean, var, rstd, center, offset = (torch.empty(c, **f32) for _ in range(5))
    count = torch.empty(1, **f32)
    block_c = min(triton.next_power_of_2(c), 128)
    launch(
        _moments_finalize_kernel,
        (triton.cdiv(c, block_c),),
        x,
        first,
        pn,
        pmean,
        pm2,
        mean,
        var,
        rstd,
        center,
        offset,
        count,
        parts,
        c,
        lay.positions,
        eps,
        MASKED=masked,
        BLOCK_C=block_c,
    )
    return mean, var, rstd, center, offset, count


def batch_norm_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var, rstd, count): batch statistics (float32, biased var) over the real
    elements of each channel, and every element normalized with them."""
    mean, var, rstd, center, offset, count = _stats(x, mask, eps)
    y = channel_apply(x, center, offset, rstd, weight, bias)
    return y, mean, var, rstd, count


def batch_norm_given(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) with the given statistics (eval mode), which are constants."""
    mean = mean.to(torch.float32, copy=True)
    rstd = torch.rsqrt(var.float() + eps)
    return channel_apply(x, mean, None, rstd, weight, bias), mean, rstd


# --- backward ------------------------------------------------------------------------------


@triton.jit
def _grad_sums_kernel(
    dy_ptr,
    x_ptr,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    mask_ptr,
    dx_ptr,
    pdb_ptr,
    pdw_ptr,
    pd_ptr,
    R,
    C,
    B,
    span,
    MASKED: tl.constexpr,
    STATS_GIVEN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per span and channel: sum dy, sum dy (x - mean) (masked: 0 where dy == 0) and, with
    batch statistics, sum over real elements of x - mean (the float32 mean's rounding,
    recovered by the finalize). With given statistics also dx = rstd * weight * dy."""
    pid_c = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    cs, c_ok = channel_block(pid_c, BLOCK_C, C)
    m0 = tl.load(mean_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    if STATS_GIVEN:
        ka = tl.load(rstd_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            ka = ka * tl.load(w_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    r_start = pid_p * span
    r_end = tl.minimum(r_start + span, R)
    sdb = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    sdw = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    sd = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        in_range = rs < r_end
        ok = in_range[:, None] & c_ok[None, :]
        offs = offsets(rs, cs, C, B, CHANNELS_LAST)
        d = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        centred = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - m0[None, :]
        sdb += d
        term = d * centred
        if MASKED:
            term = tl.where(d != 0, term, 0.0)
        sdw += tl.where(ok, term, 0.0)
        if STATS_GIVEN:
            tl.store(dx_ptr + offs, (ka[None, :] * d).to(dx_ptr.dtype.element_ty), mask=ok)
        else:
            real = real_rows(mask_ptr, rs, in_range, MASKED)[:, None] & c_ok[None, :]
            sd += tl.where(real, centred, 0.0)
    out = pid_p * C + cs
    tl.store(pdb_ptr + out, tl.sum(sdb, axis=0), mask=c_ok)
    tl.store(pdw_ptr + out, tl.sum(sdw, axis=0), mask=c_ok)
    tl.store(pd_ptr + out, tl.sum(sd, axis=0), mask=c_ok)


@triton.jit
def _grad_finalize_kernel(
    pdb_ptr,
    pdw_ptr,
    pd_ptr,
    rstd_ptr,
    w_ptr,
    count_ptr,
    dw_ptr,
    db_ptr,
    delta_ptr,
    kb_ptr,
    kk_ptr,
    partials,
    C,
    STATS_GIVEN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Sums the spans in order: dbias = sum dy, dweight = sum dy * xhat; with batch
    statistics the input gradient's coefficients kb = -rstd^2 sum(g xhat) / n and
    kk = -rstd sum(g) / n (g = weight * dy), and delta, the exact mean minus the stored one."""
    cs, c_ok = channel_block(tl.program_id(0).to(tl.int64), BLOCK_C, C)
    s1 = tl.zeros([BLOCK_C], tl.float32)
    s2 = tl.zeros([BLOCK_C], tl.float32)
    sd = tl.zeros([BLOCK_C], tl.float32)
    at = cs  # partial p, channels cs: p * C + cs (64-bit)
    for _ in range(0, partials):
        s1 += tl.load(pdb_ptr + at, mask=c_ok, other=0.0)
        s2 += tl.load(pdw_ptr + at, mask=c_ok, other=0.0)
        sd += tl.load(pd_ptr + at, mask=c_ok, other=0.0)
        at += C
    r = tl.load(rstd_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    if STATS_GIVEN:
        dweight = s2 * r
    else:
        n = tl.load(count_ptr).to(tl.float32)
        delta = sd / n
        dweight = (s2 - delta * s1) * r
    tl.store(db_ptr + cs, s1.to(db_ptr.dtype.element_ty), mask=c_ok)
    tl.store(dw_ptr + cs, dweight.to(dw_ptr.dtype.element_ty), mask=c_ok)
    if not STATS_GIVEN:
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
            sum_g = w * s1
            sum_gx = tl.where(w != 0, w * dweight, 0.0)  # 0 * Inf must not give NaN
        else:
            sum_g = s1
            sum_gx = dweight
        tl.store(delta_ptr + cs, delta, mask=c_ok)
        tl.store(kb_ptr + cs, -r * r * sum_gx / n, mask=c_ok)
        tl.store(kk_ptr + cs, -r * sum_g / n, mask=c_ok)


@triton.jit
def _input_grad_kernel(
    dy_ptr,
    x_ptr,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    mask_ptr,
    delta_ptr,
    kb_ptr,
    kk_ptr,
    dx_ptr,
    R,
    C,
    B,
    channel_tiles,
    MASKED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dx = rstd * weight * dy + m * (kb * (x - mean) + kk), m = 0 at padding (selected,
    so NaN in the padding's x stays out)."""
    pid = tl.program_id(0).to(tl.int64)
    pid_r = pid // channel_tiles
    cs, c_ok = channel_block(pid - pid_r * channel_tiles, BLOCK_C, C)
    rs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = rs < R
    ok = in_range[:, None] & c_ok[None, :]
    ka = tl.load(rstd_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        ka = ka * tl.load(w_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    m0 = tl.load(mean_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + cs, mask=c_ok, other=0.0)
    kb = tl.load(kb_ptr + cs, mask=c_ok, other=0.0)
    kk = tl.load(kk_ptr + cs, mask=c_ok, other=0.0)
    offs = offsets(rs, cs, C, B, CHANNELS_LAST)
    d = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    correction = kb[None, :] * ((v - m0[None, :]) - delta[None, :]) + kk[None, :]
    if MASKED:
        real = real_rows(mask_ptr, rs, in_range, MASKED)
        correction = tl.where(real[:, None], correction, 0.0)
    dx = ka[None, :] * d + correction
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def batch_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    mask: torch.Tensor | None,
    count: torch.Tensor,
    stats_given: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of y = weight * (x - mean) * rstd + bias; dweight is written even
    without a weight (as for weight 1). ``count`` is read only with batch statistics."""
    lay = layout(x.shape)
    c, parts = lay.channels, lay.partials
    f32 = {"dtype": torch.float32, "device": x.device}
    dx, dweight, dbias = torch.empty_like(x), x.new_empty(c), x.new_empty(c)
    if x.numel() == 0:  # sums over no element
        return dx, dweight.zero_(), dbias.zero_()
    pdb, pdw, pd = (torch.empty((parts, c), **f32) for _ in range(3))
    masked = mask is not None
    has_weight = weight is not None
    common = {
        "CHANNELS_LAST": lay.channels_last,
        "BLOCK_R": lay.block_r,
        "BLOCK_C": lay.block_c,
        "num_warps": WARPS,
    }
    launch(
        _grad_sums_kernel,
        (lay.channel_tiles, parts),
        dy,
        x,
        mean,
        rstd,
        given(weight, x),
        given(mask, x),
        dx,
        pdb,
        pdw,
        pd,
        lay.rows,
        c,
        lay.positions,
        lay.span,
        MASKED=masked,
        STATS_GIVEN=stats_given,
        HAS_WEIGHT=has_weight,
        **common,
    )
    delta, kb, kk = (torch.empty(c, **f32) for _ in range(3))
    block_c = min(triton.next_power_of_2(c), 128)
    launch(
        _grad_finalize_kernel,
        (triton.cdiv(c, block_c),),
        pdb,
        pdw,
        pd,
        rstd,
        given(weight, x),
        rstd if stats_given else count,  # the CPU op passes a CPU count then
        dweight,
        dbias,
        delta,
        kb,
        kk,
        parts,
        c,
        STATS_GIVEN=stats_given,
        HAS_WEIGHT=has_weight,
        BLOCK_C=block_c,
    )
    if stats_given:
        return dx, dweight, dbias
    launch(
        _input_grad_kernel,
        (lay.row_tiles * lay.channel_tiles,),
        dy,
        x,
        mean,
        rstd,
        given(weight, x),
        given(mask, x),
        delta,
        kb,
        kk,
        dx,
        lay.rows,
        c,
        lay.positions,
        lay.channel_tiles,
        MASKED=masked,
        HAS_WEIGHT=has_weight,
        **common,
    )
    return dx, dweight, dbias
