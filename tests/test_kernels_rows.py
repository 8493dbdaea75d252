"""The Numba row kernels (LayerNorm, RMSNorm, fused residual add) called directly on NumPy
arrays, against the float64 reference: forward, statistics, dx, dweight, dbias."""

from __future__ import annotations

import numba
import numpy as np
import pytest

import kernel_data
from normlab.axes import feature_norm_axes
from normlab.kernels.cpu.rows import add_row_norm_forward, row_norm_backward, row_norm_forward
from normlab.reference import normalize, normalize_backward, statistics
from tolerances import np_grad_tol, np_tol

DTYPES = [np.float32, np.float64]
SHAPES = [(r, n) for r in (1, 3, 37) for n in (1, 7, 769, 4097)]
EPS = 1e-5


def _tol(dtype):
    return np_tol(dtype)


def _grad_tol(dtype):
    return np_grad_tol(dtype)


def _rng(*key):
    return kernel_data.rng(*key)


def _inputs(rng, shape, dtype):
    """x, weight, bias, dy in ``dtype`` (weight not ones, bias not zero)."""
    return kernel_data.inputs(rng, shape, dtype, shape[1])


def _forward(x, weight, bias, center, eps=EPS):
    rows = x.shape[0]
    y, mean, rstd = np.empty_like(x), np.empty(rows, x.dtype), np.empty(rows, x.dtype)
    row_norm_forward(x, weight, bias, eps, center, y, mean, rstd)
    return y, mean, rstd


def _backward(dy, x, weight, mean, rstd, center, extra=None):
    n = x.shape[1]
    extra = np.empty((0, n), x.dtype) if extra is None else extra
    dx, dweight, dbias = np.empty_like(x), np.empty(n, x.dtype), np.empty(n, x.dtype)
    row_norm_backward(dy, x, weight, mean, rstd, center, extra, dx, dweight, dbias)
    return dx, dweight, dbias


def _axes(x):
    return feature_norm_axes(2, (x.shape[1],), None)


def _reference(x, weight, bias, center, eps=EPS):
    """(y, mean, rstd) of the float64 reference on the same input values."""
    axes = _axes(x)
    mean, var = statistics(x, axes, center=center)
    y = normalize(x, axes, weight, bias, eps, center=center)
    return y, mean.ravel(), 1 / np.sqrt(var.ravel() + eps)


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_forward(dtype, shape, center):
    x, weight, bias, _ = _inputs(_rng(1, *shape), shape, dtype)
    y, mean, rstd = _forward(x, weight, bias, center)
    y_ref, mean_ref, rstd_ref = _reference(x, weight, bias, center)
    np.testing.assert_allclose(y, y_ref, **_tol(dtype))
    np.testing.assert_allclose(mean, mean_ref, **_tol(dtype))
    np.testing.assert_allclose(rstd, rstd_ref, **_tol(dtype))
    if not center:
        assert (mean == 0).all()


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_backward(dtype, shape, center):
    x, weight, bias, dy = _inputs(_rng(2, *shape), shape, dtype)
    _, mean, rstd = _forward(x, weight, bias, center)
    dx, dweight, dbias = _backward(dy, x, weight, mean, rstd, center)
    refs = normalize_backward(dy, x, _axes(x), weight, bias, EPS, center=center)
    for got, want in zip((dx, dweight, dbias), refs, strict=True):
        np.testing.assert_allclose(got, want, **_grad_tol(dtype))


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_backward_adds_extra(dtype, center):
    """``extra`` (the gradient of the fused add's sum output) is added to dx."""
    rng = _rng(3)
    x, weight, bias, dy = _inputs(rng, (37, 769), dtype)
    extra = rng.standard_normal(x.shape).astype(dtype)
    _, mean, rstd = _forward(x, weight, bias, center)
    dx, dweight, dbias = _backward(dy, x, weight, mean, rstd, center, extra)
    dx_ref, dweight_ref, dbias_ref = normalize_backward(
        dy, x, _axes(x), weight, bias, EPS, center=center
    )
    np.testing.assert_allclose(dx, dx_ref + extra, **_grad_tol(dtype))
    np.testing.assert_allclose(dweight, dweight_ref, **_grad_tol(dtype))
    np.testing.assert_allclose(dbias, dbias_ref, **_grad_tol(dtype))


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("shape", [(1, 7), (37, 769), (3, 4097)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_add_forward(dtype, shape, center):
    """sum_out = x + residual in x's dtype, y = the norm of that rounded sum."""
    rng = _rng(4, *shape)
    x, weight, bias, _ = _inputs(rng, shape, dtype)
    residual = rng.standard_normal(shape).astype(dtype)
    rows = shape[0]
    y, total = np.empty_like(x), np.empty_like(x)
    mean, rstd = np.empty(rows, dtype), np.empty(rows, dtype)
    add_row_norm_forward(x, residual, weight, bias, EPS, center, y, total, mean, rstd)
    np.testing.assert_array_equal(total, x + residual)
    y_ref, mean_ref, rstd_ref = _reference(x + residual, weight, bias, center)
    np.testing.assert_allclose(y, y_ref, **_tol(dtype))
    np.testing.assert_allclose(mean, mean_ref, **_tol(dtype))
    np.testing.assert_allclose(rstd, rstd_ref, **_tol(dtype))


def _conditioned(tolerance, condition):
    """``tolerance`` widened by what float64 itself loses on data of that condition
    (|mean| / std): both the kernel and the reference round x - mean at ~2^-52 |mean|."""
    extra = 16 * condition * np.finfo(np.float64).eps
    return {"atol": tolerance["atol"] + extra, "rtol": tolerance["rtol"] + extra}


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_large_mean(dtype, center):
    """x = 1e4 + 1e-3 * noise: two-pass variance in float64 matches the reference (E[x^2] -
    E[x]^2 would lose every digit), and the backward recovers the float64 mean although the
    stored mean is rounded to x's dtype."""
    rng = _rng(5)
    shape = (3, 769)
    x = (1e4 + 1e-3 * rng.standard_normal(shape)).astype(dtype)
    _, weight, bias, dy = _inputs(rng, shape, dtype)
    eps = 1e-12
    condition = 1e4 / 1e-3
    y, mean, rstd = _forward(x, weight, bias, center, eps)
    y_ref, mean_ref, rstd_ref = _reference(x, weight, bias, center, eps)
    np.testing.assert_allclose(y, y_ref, **_conditioned(_tol(dtype), condition))
    np.testing.assert_allclose(mean, mean_ref, **_tol(dtype))
    np.testing.assert_allclose(rstd, rstd_ref, **_conditioned(_tol(dtype), condition))
    if center:
        assert rstd.min() > 100  # 1 / std of the rounded values, not 1 / sqrt(eps)
    dx, dweight, dbias = _backward(dy, x, weight, mean, rstd, center)
    refs = normalize_backward(dy, x, _axes(x), weight, bias, eps, center=center)
    for got, want in zip((dx, dweight, dbias), refs, strict=True):
        scale = np.abs(want).max()  # dx is O(rstd) = O(1e3)
        np.testing.assert_allclose(
            got / scale, want / scale, **_conditioned(_grad_tol(dtype), condition)
        )


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_identity_affine_equals_no_affine(dtype, center):
    x, _, _, dy = _inputs(_rng(6), (37, 769), dtype)
    n = x.shape[1]
    ones, zeros = np.ones(n, dtype), np.zeros(n, dtype)
    y, mean, rstd = _forward(x, ones, zeros, center)
    np.testing.assert_allclose(
        y, normalize(x, _axes(x), None, None, EPS, center=center), **_tol(dtype)
    )
    dx, _, _ = _backward(dy, x, ones, mean, rstd, center)
    dx_ref, _, _ = normalize_backward(dy, x, _axes(x), None, None, EPS, center=center)
    np.testing.assert_allclose(dx, dx_ref, **_grad_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_rows_are_independent(dtype):
    """A row's outputs do not depend on the other rows: dropping the last row changes
    nothing else, bit for bit."""
    x, weight, bias, dy = _inputs(_rng(7), (37, 769), dtype)
    for center in (True, False):
        full = _forward(x, weight, bias, center)
        part = _forward(x[:-1].copy(), weight, bias, center)
        for a, b in zip(full, part, strict=True):
            np.testing.assert_array_equal(a[:-1], b)
        dx_full = _backward(dy, x, weight, full[1], full[2], center)[0]
        dx_part = _backward(dy[:-1].copy(), x[:-1].copy(), weight, part[1], part[2], center)[0]
        np.testing.assert_array_equal(dx_full[:-1], dx_part)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_nan_stays_in_its_row(dtype):
    x, weight, bias, dy = _inputs(_rng(8), (5, 33), dtype)
    x[2, 7] = np.nan
    x[3, 0] = np.inf
    for center in (True, False):
        y, mean, rstd = _forward(x, weight, bias, center)
        dx, _, _ = _backward(dy, x, weight, mean, rstd, center)
        for out in (y, dx):
            assert np.isnan(out[2]).all()
            assert np.isfinite(out[[0, 1, 4]]).all()
        if center:
            assert np.isnan(y[3]).all()


def _threads():
    return min(2, numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_deterministic(dtype):
    """Same bits on a second run and with one thread instead of two."""
    x, weight, bias, dy = _inputs(_rng(9), (301, 769), dtype)
    extra = dy[::-1].copy()
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (_threads(), _threads(), 1):
            numba.set_num_threads(threads)
            y, mean, rstd = _forward(x, weight, bias, True)
            results.append((y, mean, rstd, *_backward(dy, x, weight, mean, rstd, True, extra)))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
