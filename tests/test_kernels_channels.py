"""The BatchNorm Numba kernels (normlab.kernels.cpu.channels) on NumPy arrays vs the float64
reference: statistics (masked or not), apply, backward (training and statistics given),
large means, NaN in padding, empty channels and determinism across thread counts."""

import numba
import numpy as np
import pytest
import torch

from normlab.axes import channel_norm_axes
from normlab.kernels.cpu.channels import channel_apply, channel_backward, channel_statistics
from normlab.reference import core
from normlab.reference.norms import (
    batch_norm_eval,
    batch_norm_eval_backward,
    batch_norm_train,
    batch_norm_train_backward,
)
from tolerances import grad_tol, tol

# (data dtype, dtype of statistics and scale/shift): the contract's same-dtype case and the
# float32-data-with-float64-statistics case the torch ops use.
DTYPES = [(np.float32, np.float32), (np.float32, np.float64), (np.float64, np.float64)]
DTYPE_IDS = ["f32", "f32-stats64", "f64"]
# (5, 4097, 1): several channel blocks; (2, 3, 70_001): several position blocks.
SHAPES = [(2, 1, 1), (3, 7, 1), (37, 5, 1), (4, 3, 769), (16, 64, 49), (5, 4097, 1), (2, 3, 70_001)]
# Masked: enough real positions per channel that float32 stays well-conditioned; (300, 7, 1)
# has row blocks that are all real, all padding or mixed.
MASKED_SHAPES = [(37, 5, 1), (300, 7, 1), (4, 3, 769), (16, 64, 49)]
EPS = 1e-5
NO_MASK = np.zeros((0, 0), np.uint8)


def _tol(dtype, grad=False):
    torch_dtype = torch.float32 if dtype == np.float32 else torch.float64
    return grad_tol(torch_dtype) if grad else tol(torch_dtype)


def _close(actual, expected, dtype, grad=False):
    np.testing.assert_allclose(actual, expected, **_tol(dtype, grad))


def stats(x, mask=NO_MASK, stat_dtype=None):
    """(mean, var, count) from the kernel."""
    C = x.shape[1]
    stat_dtype = stat_dtype or x.dtype
    mean, var, count = np.empty(C, stat_dtype), np.empty(C, stat_dtype), np.empty(1)
    channel_statistics(x, mask, mean, var, count)
    return mean, var, count


def forward(x, weight, bias, mask=NO_MASK, stat_dtype=None):
    """Training forward the way the caller does it: scale/shift computed in float64, passed in
    the statistics' dtype. Returns (y, mean, rstd, count)."""
    stat_dtype = stat_dtype or x.dtype
    mean, var, count = stats(x, mask, stat_dtype)
    rstd = 1.0 / np.sqrt(var.astype(np.float64) + EPS)
    scale = weight * rstd
    shift = bias - mean * scale
    y = np.empty_like(x)
    channel_apply(x, scale.astype(stat_dtype), shift.astype(stat_dtype), y)
    return y, mean, rstd.astype(stat_dtype), count


def backward(dy, x, mean, rstd, weight, mask, count, stats_given):
    C = x.shape[1]
    dx, dweight, dbias = np.empty_like(x), np.empty(C, x.dtype), np.empty(C, x.dtype)
    channel_backward(dy, x, mean, rstd, weight, mask, count, stats_given, dx, dweight, dbias)
    return dx, dweight, dbias


def _data(shape, dtype, seed=0, loc=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = (1 + 0.5 * rng.standard_normal(C)).astype(dtype)
    bias = rng.standard_normal(C).astype(dtype)
    return x, dy, weight, bias


def _mask(shape, kind="random", seed=1):
    """uint8 (A, B) mask, 1 = real. "random": 70% real at random; "tails": padding at the end
    of each sequence (B == 1: rows are (sequence, position) with 25 positions per sequence;
    B > 1: positions along B). The first row is padded but for one position."""
    A, _, B = shape
    rng = np.random.default_rng(seed)
    if kind == "random":
        mask = (rng.random((A, B)) < 0.7).astype(np.uint8)
    elif B == 1:
        position = np.arange(A) % 25
        length = rng.integers(5, 26, size=-(-A // 25)).repeat(25)[:A]
        mask = (position < length).astype(np.uint8)[:, None]
    else:
        mask = (np.arange(B)[None, :] < rng.integers(1, B + 1, size=(A, 1))).astype(np.uint8)
    mask[0] = 0
    mask[0, 0] = 1
    return mask


def _ref_mask(mask):
    return None if mask.size == 0 else mask


def _ref_stats(x, mask):
    mean, var = core.statistics(x, channel_norm_axes(3, 1), mask=_ref_mask_axes(mask))
    return mean.ravel(), var.ravel()


def _ref_mask_axes(mask):
    return None if mask.size == 0 else mask[:, None, :].astype(np.float64)


def _check_training(stat_dtype, x, dy, weight, bias, mask):
    dtype = x.dtype.type
    A, _, B = x.shape
    mean, var, count = stats(x, mask, stat_dtype)
    ref_mean, ref_var = _ref_stats(x, mask)
    assert count[0] == (A * B if mask.size == 0 else mask.sum())
    _close(mean, ref_mean, dtype)
    _close(var, ref_var, dtype)

    y, mean, rstd, count = forward(x, weight, bias, mask, stat_dtype)
    ref_y = batch_norm_train(x, weight, bias, EPS, dim=1, mask=_ref_mask(mask))
    _close(y, ref_y, dtype)

    got = backward(dy, x, mean, rstd, weight, mask, count, False)
    ref = batch_norm_train_backward(dy, x, weight, bias, EPS, dim=1, mask=_ref_mask(mask))
    for g, r in zip(got, ref, strict=True):
        _close(g, r, dtype, grad=True)


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_train(shape, dtypes):
    _check_training(dtypes[1], *_data(shape, dtypes[0]), NO_MASK)


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", MASKED_SHAPES)
@pytest.mark.parametrize("kind", ["random", "tails"])
def test_train_masked(shape, dtypes, kind):
    _check_training(dtypes[1], *_data(shape, dtypes[0]), _mask(shape, kind))


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(3, 7, 1), (16, 64, 49), (5, 4097, 1)])
def test_eval_forward_and_backward(shape, dtypes):
    dtype, stat_dtype = dtypes
    x, dy, weight, bias = _data(shape, dtype)
    rng = np.random.default_rng(5)
    running_mean = rng.standard_normal(shape[1]).astype(dtype)
    running_var = (0.5 + rng.random(shape[1])).astype(dtype)
    rstd = 1.0 / np.sqrt(running_var.astype(np.float64) + EPS)
    scale, shift = weight * rstd, bias - running_mean * (weight * rstd)
    y = np.empty_like(x)
    channel_apply(x, scale.astype(stat_dtype), shift.astype(stat_dtype), y)
    _close(y, batch_norm_eval(x, running_mean, running_var, weight, bias, EPS), dtype)

    mean, rstd = running_mean.astype(stat_dtype), rstd.astype(stat_dtype)
    got = backward(dy, x, mean, rstd, weight, NO_MASK, np.ones(1), True)
    ref = batch_norm_eval_backward(dy, x, running_mean, running_var, weight, bias, EPS)
    for g, r in zip(got, ref, strict=True):
        _close(g, r, dtype, grad=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4096, 3, 1), (8, 3, 2000)])
@pytest.mark.parametrize("masked", [False, True])
def test_large_mean(shape, dtype, masked):
    """x = 1e4 + 1e-3 noise: the variance is the reference's (no E[x^2] - E[x]^2)."""
    x, dy, weight, bias = _data(shape, dtype, loc=1e4, scale=1e-3)
    mask = _mask(shape) if masked else NO_MASK
    mean, var, count = stats(x, mask)
    ref_mean, ref_var = _ref_stats(x, mask)
    _close(var, ref_var, dtype)
    np.testing.assert_allclose(var, ref_var, rtol=1e-5 if dtype == np.float32 else 1e-10)
    _close(mean, ref_mean, dtype)
    # float64 statistics and scale/shift keep float32 data exact too (the caller's choice).
    mean64, var64, _ = stats(x, mask, np.float64)
    np.testing.assert_allclose(var64, ref_var, rtol=1e-10)
    rstd = 1.0 / np.sqrt(var64 + EPS)
    scale = weight * rstd
    shift = bias - mean64 * scale
    y = np.empty_like(x)
    channel_apply(x, scale, shift, y)
    # y = x * scale + shift (as torch's CPU BatchNorm) rounds x * scale: the error is
    # eps * |x * scale|, here ~1e4 * 300 times float64 eps, before y's own rounding.
    ref_y = batch_norm_train(x, weight, bias, EPS, dim=1, mask=_ref_mask(mask))
    bound = 8 * np.finfo(np.float64).eps * np.abs(x * scale[None, :, None]).max()
    np.testing.assert_allclose(y, ref_y, rtol=_tol(dtype)["rtol"], atol=_tol(dtype)["atol"] + bound)
    if dtype == np.float64:
        # The gradients are shift-invariant; the reference on the exactly shifted x is
        # accurate (its plain sum of 1e4s is not: its mean is off by ~1e-11). The mean passed
        # in is rounded (by d = 1e4 * eps / 2); through xhat = (x - mean) * rstd that moves
        # dweight by rstd * d * sum(dy) and dx by rstd^2 * d * (|sum g xhat| + |xhat sum g|)/n.
        shifted = x - x[:1, :, :1]
        got = backward(dy, x, mean64, rstd, weight, mask, count, False)
        ref = batch_norm_train_backward(dy, shifted, weight, bias, EPS, dim=1, mask=_ref_mask(mask))
        shift_err = np.finfo(dtype).eps * np.abs(mean64).max() * rstd.max()
        g_max = np.abs(dy).max() * np.abs(weight).max()
        xhat_max = np.abs(shifted).max() * 2 * rstd.max()
        slack = [
            shift_err * rstd.max() * g_max * (1 + 2 * xhat_max),
            shift_err * np.abs(dy).sum(axis=(0, 2)).max(),
            0.0,
        ]
        for g, r, extra in zip(got, ref, slack, strict=True):
            tolerance = _tol(dtype, grad=True)
            np.testing.assert_allclose(g, r, rtol=tolerance["rtol"], atol=tolerance["atol"] + extra)


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(37, 5, 1), (300, 7, 1), (6, 5, 300)])
@pytest.mark.parametrize("kind", ["random", "tails"])
def test_nan_in_padding_does_not_leak(shape, dtypes, kind):
    """NaN/Inf at padded positions (with dy = 0 there): real outputs finite and equal to the
    reference on the same data with zeros in the padding."""
    dtype, stat_dtype = dtypes
    x, dy, weight, bias = _data(shape, dtype)
    mask = _mask(shape, kind)
    pad = np.broadcast_to(mask[:, None, :] == 0, shape)
    clean = np.where(pad, 0, x).astype(dtype)
    x = np.where(pad, np.nan, x).astype(dtype)
    x[tuple(i[0] for i in np.nonzero(pad))] = np.inf
    dy = np.where(pad, 0, dy).astype(dtype)

    y, mean, rstd, count = forward(x, weight, bias, mask, stat_dtype)
    assert np.isfinite(mean).all() and np.isfinite(rstd).all()
    ref_y = batch_norm_train(clean, weight, bias, EPS, dim=1, mask=mask)
    real = ~pad
    _close(y[real], ref_y[real], dtype)

    dx, dweight, dbias = backward(dy, x, mean, rstd, weight, mask, count, False)
    ref = batch_norm_train_backward(dy, clean, weight, bias, EPS, dim=1, mask=mask)
    assert np.isfinite(dx).all() and np.isfinite(dweight).all() and np.isfinite(dbias).all()
    for g, r in zip((dx, dweight, dbias), ref, strict=True):
        _close(g, r, dtype, grad=True)


@pytest.mark.parametrize("shape", [(37, 5, 1), (6, 5, 300)])
def test_nan_stays_in_its_channel(shape):
    x, dy, weight, bias = _data(shape, np.float64)
    x[1, 2, 0] = np.nan
    y, mean, rstd, count = forward(x, weight, bias)
    dx, dweight, dbias = backward(dy, x, mean, rstd, weight, NO_MASK, count, False)
    others = [c for c in range(shape[1]) if c != 2]
    assert np.isnan(mean[2]) and np.isnan(y[:, 2]).all() and np.isnan(dx[:, 2]).all()
    assert np.isnan(dweight[2]) and np.isfinite(dbias).all()
    ref_y = batch_norm_train(x[:, others], weight[others], bias[others], EPS)
    ref = batch_norm_train_backward(dy[:, others], x[:, others], weight[others], bias[others], EPS)
    _close(y[:, others], ref_y, np.float64)
    for g, r in zip((dx[:, others], dweight[others], dbias[others]), ref, strict=True):
        _close(g, r, np.float64, grad=True)


def test_empty_channel_statistics_are_nan():
    x, *_ = _data((4, 3, 5), np.float64)
    mean, var, count = stats(x, np.zeros((4, 5), np.uint8))
    assert count[0] == 0 and np.isnan(mean).all() and np.isnan(var).all()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(4099, 33, 1), (70, 6, 333), (3, 2, 100_003)])
def test_deterministic_across_threads(shape, masked):
    """Bit-identical results for two runs and for 1 vs 2 threads (fixed blocks, in-order)."""
    dtype = np.float32
    x, dy, weight, _ = _data(shape, dtype, loc=3.0)
    mask = _mask(shape) if masked else NO_MASK

    def run():
        mean, var, count = stats(x, mask)
        rstd = (1.0 / np.sqrt(var.astype(np.float64) + EPS)).astype(dtype)
        return (mean, var, count, *backward(dy, x, mean, rstd, weight, mask, count, False))

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        first, second = run(), run()
        numba.set_num_threads(1)
        single = run()
    finally:
        numba.set_num_threads(before)
    for a, b, c in zip(first, second, single, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_bad_shapes_raise():
    x = np.zeros((4, 3, 5))
    with pytest.raises(ValueError):
        stats(x, np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        channel_statistics(x, NO_MASK, np.empty(2), np.empty(3), np.empty(1))
    with pytest.raises(ValueError):
        channel_apply(x, np.ones(2), np.ones(3), np.empty_like(x))
    c = np.ones(3)
    with pytest.raises(ValueError):
        channel_backward(x, x, c, c, c, NO_MASK, np.ones(1), False, x[:2].copy(), c, c)
    with pytest.raises(ValueError):
        channel_backward(x, x, c, c, np.ones(2), NO_MASK, np.ones(1), False, x.copy(), c, c)


def test_empty_input():
    """No positions: count 0, NaN statistics; zero gradients sums and nothing to write."""
    x = np.zeros((0, 3, 4))
    mean, var, count = stats(x)
    assert count[0] == 0 and np.isnan(mean).all() and np.isnan(var).all()
    dx, dweight, dbias = backward(x, x, np.zeros(3), np.ones(3), np.ones(3), NO_MASK, count, False)
    assert dx.shape == x.shape and (dweight == 0).all() and (dbias == 0).all()
