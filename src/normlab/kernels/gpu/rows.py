"""LayerNorm and RMSNorm over the last axis of a (rows, features) tensor, and the fused
residual add, in Triton: the GPU counterparts of ``normlab.kernels.cpu.rows``.

Per row of N features (``center``: LayerNorm; otherwise RMSNorm, whose mean is 0):

    mean = (1/N) sum x                  var = (1/N) sum (x - mean)^2
    rstd = 1 / sqrt(var + eps)          y   = (x - mean) * rstd * weight + bias

Backward, with xhat = (x - mean) * rstd and g = dy * weight:

    dx      = rstd * (g - mean(g) - xhat * mean(g * xhat))    (no mean(g) without centring)
    dweight = sum_rows dy * xhat        dbias = sum_rows dy

Inputs are float32, float16 or bfloat16; everything is computed in float32 and rounded once
to the input dtype; the statistics are float32.

Memory traffic, the cost that matters (the kernels are bandwidth-bound):

- Forward, row in registers (N up to ``MAX_FUSED_FORWARD``): one program per row
  reads x once and writes y. Statistics are two-pass in registers around a pivot k (the
  row's first element): with d = x - k, mean = k + mean(d), var = mean((d - mean(d))^2).
  x - k is exact for x near k, so data far from zero (1e4 + 1e-3 noise) keeps its noise.
- Forward, longer rows (looped): a first sweep reads x in blocks and merges the blocks'
  (count, mean, M2) with Chan's formula; a second sweep reads x again (mostly from L2) and
  writes y. With the residual add, the first sweep writes s = x + residual and the second
  reads s: x and residual are read once, s twice.
- Backward: a persistent grid of about one program per SM (``programs``); each program takes
  rows pid, pid + P, ... and keeps its partial sums of dy * xhat and dy in float32. Rows in
  registers (N up to ``MAX_FUSED_BACKWARD``): x and dy are read once, the weight per row
  from L1. Looped rows: a first sweep per row computes its three
  row sums, a second sweep, block of columns by block of columns across the program's rows,
  writes dx and keeps that block's partial sums in registers (x and dy read twice). A
  second small kernel adds the P partial rows in a fixed order: dweight and dbias are
  bit-identical from run to run, with no atomics.

The saved mean is a float32 rounding of the exact one; the backward recovers the
difference, delta = mean(x - mean_saved), in the same sweep as its other sums (as the CPU
kernel does). Row offsets are 64-bit: rows * features may exceed 2^31.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Block sizes and warps by feature count. The limits keep every variant free of register
# spills on sm_90 (64 registers a thread at 32 warps, 128 at 16, 255 at 8), as ptxas
# reports them (cuobjdump --dump-resource-usage) for float32 and bfloat16. The backward's
# warps, grid and looped block were chosen from a sweep on an H200 (scripts/triton_sweep.py,
# docs/benchmarks.md, 2026-12-04): 32768 rows, GB/s of the kernels alone.
MAX_FUSED_FORWARD = 16384  # features kept in registers by the forward (32 warps)
MAX_FUSED_BACKWARD = 8192  # the backward also holds dy and two partial sums a thread
LOOP_BLOCK_FORWARD_BYTES = 16384  # looped forward: 8192 bf16 / 4096 fp32 columns a block
LOOP_BLOCK_BACKWARD = 2048  # looped backward: columns a block
LOOP_WARPS_BACKWARD = 8  # 4 programs a SM: 2456 / 2312 GB/s (fp32 / bf16) at 16384 features,
# where 16 warps and 2 programs a SM gave 2426 / 1923
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)  # a global a kernel reads: constexpr


def forward_block(n_cols: int, element_size: int) -> int:
    """The forward's block of columns: the whole row (next power of two) up to
    ``MAX_FUSED_FORWARD``, else the looped variant's block."""
    whole = triton.next_power_of_2(n_cols)
    if whole <= MAX_FUSED_FORWARD:
        return whole
    return LOOP_BLOCK_FORWARD_BYTES // element_size


def backward_block(n_cols: int) -> int:
    """The backward's block of columns: the whole row up to ``MAX_FUSED_BACKWARD``, else
    ``LOOP_BLOCK_BACKWARD``."""
    whole = triton.next_power_of_2(n_cols)
    return whole if whole <= MAX_FUSED_BACKWARD else LOOP_BLOCK_BACKWARD


def num_warps(block: int) -> int:
    """The forward: 16 elements a thread (two 16-byte loads of a 16-bit row), 4 to 32 warps."""
    return min(32, max(4, block // 512))


def backward_warps(block: int, looped: bool) -> int:
    """The backward, row in registers: 16 elements a thread up to 4096 features (4 to 8
    warps; at 4096, 8 warps and 2 programs a SM gave 3593 / 2534 GB/s fp32 / bf16 on an H200,
    16 warps and 1 program 2941 / 1830), 8 a thread beyond (32 warps at 8192)."""
    if looped:
        return LOOP_WARPS_BACKWARD
    return max(4, block // 512) if block <= 4096 else min(32, block // 256)


def programs_per_device(x: torch.Tensor, per_sm: int) -> int:
    """The persistent grid: ``per_sm`` programs on every SM (what their registers let stay
    resident together). Without a GPU (the interpreter) a handful, so that each program
    takes several rows."""
    if x.device.type == "cuda":
        return torch.cuda.get_device_properties(x.device).multi_processor_count * per_sm
    return 4


def _on_device_of(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _finite_or_zero(v):
    """v where it is finite, else 0 (a NaN/Inf pivot would turn every difference NaN)."""
    return tl.where(tl.abs(v) <= FLOAT32_MAX, v, 0.0)


@triton.jit
def _load_row_block(X, RESIDUAL, S, offsets, real, HAS_RESIDUAL: tl.constexpr):
    """x (+ residual, added in float32 and rounded to x's dtype as torch does, stored in S)
    as float32; 0 past the row."""
    v = tl.load(X + offsets, mask=real, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(RESIDUAL + offsets, mask=real, other=0.0).to(tl.float32)
        s = (v + r).to(S.dtype.element_ty)
        tl.store(S + offsets, s, mask=real)
        v = s.to(tl.float32)
    return v


@triton.jit
def _pivot(X, RESIDUAL, start, HAS_RESIDUAL: tl.constexpr):
    """The row's first element (of x + residual, rounded as stored), finite or 0."""
    k = tl.load(X + start).to(tl.float32)
    if HAS_RESIDUAL:
        k = (k + tl.load(RESIDUAL + start).to(tl.float32)).to(X.dtype.element_ty).to(tl.float32)
    return _finite_or_zero(k)


@triton.jit
def _affine_store(
    Y, W, B, offsets, cols, real, xhat, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr
):
    y = xhat
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=real, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=real, other=0.0).to(tl.float32)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=real)


@triton.jit
def _row_norm_forward_kernel(
    X,
    RESIDUAL,
    W,
    B,
    Y,
    S,
    MEAN,
    RSTD,
    n_cols,
    eps,
    CENTER: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    LOOPED: tl.constexpr,
):
    """One program per row: y (and s = x + residual), mean and rstd (float32) of the row."""
    row = tl.program_id(0).to(tl.int64)
    start = row * n_cols
    cols = tl.arange(0, BLOCK)
    k = 0.0
    if CENTER:
        k = _pivot(X, RESIDUAL, start, HAS_RESIDUAL)
    if not LOOPED:
        real = cols < n_cols
        d = tl.where(
            real, _load_row_block(X, RESIDUAL, S, start + cols, real, HAS_RESIDUAL) - k, 0.0
        )
        shift = 0.0
        if CENTER:
            shift = tl.sum(d, axis=0) / n_cols
            d = tl.where(real, d - shift, 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=0) / n_cols + eps)
        _affine_store(Y, W, B, start + cols, cols, real, d * rstd, HAS_WEIGHT, HAS_BIAS)
    else:
        # Sweep 1: the statistics of d = x - k, block by block. LayerNorm merges each
        # block's (count, mean, M2) into the running one (Chan et al.): no cancellation.
        count = 0.0
        shift = 0.0
        m2 = 0.0
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        for col0 in tl.range(0, n_cols, BLOCK):
            block_cols = col0 + cols
            real = block_cols < n_cols
            v = _load_row_block(X, RESIDUAL, S, start + block_cols, real, HAS_RESIDUAL)
            if CENTER:
                d = tl.where(real, v - k, 0.0)
                block_count = tl.minimum(n_cols - col0, BLOCK).to(tl.float32)
                block_mean = tl.sum(d, axis=0) / block_count
                e = tl.where(real, d - block_mean, 0.0)
                total = count + block_count
                delta = block_mean - shift
                shift += delta * (block_count / total)
                m2 += tl.sum(e * e, axis=0) + delta * delta * (count * block_count / total)
                count = total
            else:
                squares += v * v
        if CENTER:
            rstd = tl.rsqrt(m2 / n_cols + eps)
        else:
            rstd = tl.rsqrt(tl.sum(squares, axis=0) / n_cols + eps)
        # Sweep 2: normalize (s, already rounded, when there is a residual).
        for col0 in tl.range(0, n_cols, BLOCK):
            block_cols = col0 + cols
            real = block_cols < n_cols
            if HAS_RESIDUAL:
                v = tl.load(S + start + block_cols, mask=real, other=0.0).to(tl.float32)
            else:
                v = tl.load(X + start + block_cols, mask=real, other=0.0).to(tl.float32)
            xhat = ((v - k) - shift) * rstd
            _affine_store(Y, W, B, start + block_cols, block_cols, real, xhat, HAS_WEIGHT, HAS_BIAS)
    tl.store(MEAN + row, k + shift)
    tl.store(RSTD + row, rstd)


def _forward(x, residual, weight, bias, eps, center, block):
    n_rows, n_cols = x.shape
    block = block or forward_block(n_cols, x.element_size())
    y = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else None
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, total, mean, rstd
    with _on_device_of(x):
        _row_norm_forward_kernel[(n_rows,)](
            x,
            residual if residual is not None else x,
            weight if weight is not None else x,
            bias if bias is not None else x,
            y,
            total if total is not None else y,
            mean,
            rstd,
            n_cols,
            eps,
            CENTER=center,
            HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            BLOCK=block,
            LOOPED=block < n_cols,
            num_warps=num_warps(block),
        )
    return y, total, mean, rstd


def row_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
    *,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) of LayerNorm (``center``) or RMSNorm over each row of the contiguous
    (rows, features) x; weight and bias (features,) or None; statistics float32.

    ``block``: the block of columns (a power of two); the looped variant runs when it is
    smaller than the row (default: ``forward_block``)."""
    y, _, mean, rstd = _forward(x, None, weight, bias, eps, center, block)
    return y, mean, rstd


def add_row_norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
    *,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, mean, rstd): s = x + residual rounded to x's dtype, y its norm (statistics
    of the rounded s), in one kernel."""
    return _forward(x, residual, weight, bias, eps, center, block)


@triton.jit
def _row_norm_backward_kernel(
    DY,
    X,
    W,
    MEAN,
    RSTD,
    EXTRA,
    DX,
    PARTIAL_DW,
    PARTIAL_DB,
    ROW_SUMS,
    n_rows,
    n_cols,
    CENTER: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    BLOCK: tl.constexpr,
    LOOPED: tl.constexpr,
):
    """Program p: dx of rows p, p + P, ... and its partial dweight/dbias (float32) in row p
    of PARTIAL_DW/PARTIAL_DB (P, N). ROW_SUMS (rows, 3) is the looped variant's scratch."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    part = pid.to(tl.int64) * n_cols
    cols = tl.arange(0, BLOCK)
    if not LOOPED:
        real = cols < n_cols
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        for row in tl.range(pid, n_rows, programs):
            start = tl.cast(row, tl.int64) * n_cols
            x = tl.load(X + start + cols, mask=real, other=0.0).to(tl.float32)
            dy = tl.load(DY + start + cols, mask=real, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row).to(tl.float32)
            rstd = tl.load(RSTD + row).to(tl.float32)
            d = tl.where(real, x - mean, 0.0)
            g = dy
            if HAS_WEIGHT:  # reloaded per row (from L1): fewer registers held across rows
                g = dy * tl.load(W + cols, mask=real, other=0.0).to(tl.float32)
            c1 = 0.0
            if CENTER:
                d = tl.where(real, d - tl.sum(d, axis=0) / n_cols, 0.0)
                c1 = tl.sum(g, axis=0) / n_cols
            xhat = d * rstd
            c2 = tl.sum(g * xhat, axis=0) / n_cols
            dx = rstd * (g - c1 - xhat * c2)
            if HAS_EXTRA:
                dx += tl.load(EXTRA + start + cols, mask=real, other=0.0).to(tl.float32)
            tl.store(DX + start + cols, dx.to(DX.dtype.element_ty), mask=real)
            dw += dy * xhat
            db += dy
        tl.store(PARTIAL_DW + part + cols, dw, mask=real)
        tl.store(PARTIAL_DB + part + cols, db, mask=real)
    else:
        # Sweep 1, row by row: delta = mean(x - mean_saved), mean(g), mean(g * xhat).
        for row in tl.range(pid, n_rows, programs):
            start = tl.cast(row, tl.int64) * n_cols
            mean = tl.load(MEAN + row).to(tl.float32)
            rstd = tl.load(RSTD + row).to(tl.float32)
            sum_d = tl.zeros([BLOCK], dtype=tl.float32)
            sum_g = tl.zeros([BLOCK], dtype=tl.float32)
            sum_gd = tl.zeros([BLOCK], dtype=tl.float32)
            for col0 in tl.range(0, n_cols, BLOCK):
                block_cols = col0 + cols
                real = block_cols < n_cols
                x = tl.load(X + start + block_cols, mask=real, other=0.0).to(tl.float32)
                g = tl.load(DY + start + block_cols, mask=real, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    g *= tl.load(W + block_cols, mask=real, other=0.0).to(tl.float32)
                d = tl.where(real, x - mean, 0.0)
                sum_d += d
                sum_g += g
                sum_gd += g * d
            delta = 0.0
            c1 = 0.0
            if CENTER:
                delta = tl.sum(sum_d, axis=0) / n_cols
                c1 = tl.sum(sum_g, axis=0) / n_cols
            # sum(g * xhat) = rstd * (sum(g * (x - mean)) - delta * sum(g))
            c2 = rstd * (tl.sum(sum_gd, axis=0) - delta * tl.sum(sum_g, axis=0)) / n_cols
            tl.store(ROW_SUMS + row * 3, delta)
            tl.store(ROW_SUMS + row * 3 + 1, c1)
            tl.store(ROW_SUMS + row * 3 + 2, c2)
        # Sweep 2, a block of columns at a time across the program's rows: dx, and the
        # block's partial sums in registers.
        for col0 in tl.range(0, n_cols, BLOCK):
            block_cols = col0 + cols
            real = block_cols < n_cols
            w = tl.full([BLOCK], 1.0, tl.float32)
            if HAS_WEIGHT:
                w = tl.load(W + block_cols, mask=real, other=0.0).to(tl.float32)
            dw = tl.zeros([BLOCK], dtype=tl.float32)
            db = tl.zeros([BLOCK], dtype=tl.float32)
            for row in tl.range(pid, n_rows, programs):
                start = tl.cast(row, tl.int64) * n_cols
                # (x - mean) - delta: mean + delta would round delta away in float32.
                mean = tl.load(MEAN + row).to(tl.float32)
                delta = tl.load(ROW_SUMS + row * 3)
                rstd = tl.load(RSTD + row).to(tl.float32)
                c1 = tl.load(ROW_SUMS + row * 3 + 1)
                c2 = tl.load(ROW_SUMS + row * 3 + 2)
                x = tl.load(X + start + block_cols, mask=real, other=0.0).to(tl.float32)
                dy = tl.load(DY + start + block_cols, mask=real, other=0.0).to(tl.float32)
                xhat = tl.where(real, ((x - mean) - delta) * rstd, 0.0)
                dx = rstd * (dy * w - c1 - xhat * c2)
                if HAS_EXTRA:
                    dx += tl.load(EXTRA + start + block_cols, mask=real, other=0.0).to(tl.float32)
                tl.store(DX + start + block_cols, dx.to(DX.dtype.element_ty), mask=real)
                dw += dy * xhat
                db += dy
            tl.store(PARTIAL_DW + part + block_cols, dw, mask=real)
            tl.store(PARTIAL_DB + part + block_cols, db, mask=real)


@triton.jit
def _sum_partials_kernel(
    PARTIAL_DW,
    PARTIAL_DB,
    DW,
    DB,
    n_partials,
    n_cols,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """DW = sum of PARTIAL_DW's rows, DB likewise, in a fixed order (deterministic)."""
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    real_cols = cols < n_cols
    dw = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    db = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for row0 in tl.range(0, n_partials, BLOCK_ROWS):
        rows = row0 + tl.arange(0, BLOCK_ROWS)
        offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        real = (rows[:, None] < n_partials) & real_cols[None, :]
        dw += tl.load(PARTIAL_DW + offsets, mask=real, other=0.0)
        db += tl.load(PARTIAL_DB + offsets, mask=real, other=0.0)
    tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=real_cols)
    tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=real_cols)


def row_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    center: bool,
    extra: torch.Tensor | None = None,
    *,
    block: int | None = None,
    programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of ``row_norm_forward``; dweight and dbias in x's dtype (both
    computed, whether or not the norm has the parameters). ``mean`` and ``rstd`` are the
    forward's (any float dtype); ``extra`` (rows, features), the fused add's gradient of s,
    is added to dx. ``block`` as in the forward (default ``backward_block``), ``programs``
    the persistent grid (default ``programs_per_device``)."""
    n_rows, n_cols = x.shape
    block = block or backward_block(n_cols)
    looped = block < n_cols
    warps = backward_warps(block, looped)
    # Programs a SM: 16 warps' worth when the row is in registers, 32 looped (measured
    # faster than fewer, larger programs; see backward_warps).
    per_sm = 32 // warps if looped else max(1, 16 // warps)
    programs = max(1, min(n_rows, programs or programs_per_device(x, per_sm)))
    dx = torch.empty_like(x)
    dweight = torch.empty(n_cols, dtype=x.dtype, device=x.device)
    dbias = torch.empty(n_cols, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx, dweight.zero_(), dbias.zero_()
    partial_dw = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
    partial_db = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
    row_sums = torch.empty(n_rows if looped else 1, 3, dtype=torch.float32, device=x.device)
    with _on_device_of(x):
        _row_norm_backward_kernel[(programs,)](
            dy,
            x,
            weight if weight is not None else x,
            mean,
            rstd,
            extra if extra is not None else x,
            dx,
            partial_dw,
            partial_db,
            row_sums,
            n_rows,
            n_cols,
            CENTER=center,
            HAS_WEIGHT=weight is not None,
            HAS_EXTRA=extra is not None,
            BLOCK=block,
            LOOPED=looped,
            num_warps=warps,
        )
        block_cols = 128
        _sum_partials_kernel[(triton.cdiv(n_cols, block_cols),)](
            partial_dw,
            partial_db,
            dweight,
            dbias,
            programs,
            n_cols,
            BLOCK_ROWS=32,
            BLOCK_COLS=block_cols,
            num_warps=4,
        )
    return dx, dweight, dbias
