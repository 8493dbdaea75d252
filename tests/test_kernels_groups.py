"""The Numba GroupNorm / InstanceNorm kernels called directly on NumPy arrays (B, C, S),
with and without a padding mask, against the float64 reference: forward, statistics, dx,
dweight, dbias."""

from __future__ import annotations

import numba
import numpy as np
import pytest

import kernel_data
from normlab.kernels.cpu.groups import group_norm_backward, group_norm_forward
from normlab.reference import (
    group_norm,
    instance_norm,
    instance_norm_backward,
)
from normlab.reference import (
    group_norm_backward as reference_backward,
)
from tolerances import np_grad_tol, np_tol

DTYPES = [np.float32, np.float64]
SHAPES = [(1, 1, 1), (3, 6, 7), (2, 8, 1), (2, 4, 33), (4, 6, 260)]
CASES = [(shape, g) for shape in SHAPES for g in sorted({1, 2, shape[1]}) if shape[1] % g == 0]
EPS = 1e-5
NO_MASK = np.zeros((0, 0), np.uint8)


def _tol(dtype):
    return np_tol(dtype)


def _grad_tol(dtype):
    return np_grad_tol(dtype)


def _rng(*key):
    return kernel_data.rng(*key)


def _inputs(rng, shape, dtype):
    """x, weight, bias, dy in ``dtype`` (weight not ones, bias not zero)."""
    return kernel_data.inputs(rng, shape, dtype, shape[1])


def _mask(rng, batch, positions):
    """Random padding; sample 0 keeps a single real position (mostly padding)."""
    mask = (rng.random((batch, positions)) < 0.6).astype(np.uint8)
    mask[:, 0] = 1
    mask[0, 1:] = 0
    return mask


def _forward(x, weight, bias, groups, mask=NO_MASK, eps=EPS):
    batch = x.shape[0]
    y = np.empty_like(x)
    mean, var, rstd = (np.empty((batch, groups), x.dtype) for _ in range(3))
    group_norm_forward(x, weight, bias, groups, eps, mask, y, mean, var, rstd)
    return y, mean, var, rstd


def _backward(dy, x, weight, mean, rstd, groups, mask=NO_MASK):
    channels = x.shape[1]
    dx = np.empty_like(x)
    dweight, dbias = np.empty(channels, x.dtype), np.empty(channels, x.dtype)
    group_norm_backward(dy, x, weight, mean, rstd, groups, mask, dx, dweight, dbias)
    return dx, dweight, dbias


def _statistics(x, groups, mask):
    """(mean, var) per (sample, group), float64, over the real positions."""
    batch, channels, positions = x.shape
    xg = x.astype(np.float64).reshape(batch, groups, channels // groups, positions)
    m = np.ones((batch, positions)) if mask is None else mask.astype(np.float64)
    m = np.broadcast_to(m[:, None, None, :], xg.shape)
    xg = np.where(m > 0, xg, 0.0)
    count = m.sum(axis=(2, 3))
    mean = xg.sum(axis=(2, 3)) / count
    var = (m * (xg - mean[:, :, None, None]) ** 2).sum(axis=(2, 3)) / count
    return mean, var


def _ref_mask(mask):
    return None if mask is None else mask.astype(np.float64)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize(("shape", "groups"), CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_forward(dtype, shape, groups, masked):
    rng = _rng(1, *shape, groups)
    x, weight, bias, _ = _inputs(rng, shape, dtype)
    mask = _mask(rng, shape[0], shape[2]) if masked else None
    y, mean, var, rstd = _forward(x, weight, bias, groups, NO_MASK if mask is None else mask)
    y_ref = group_norm(x, groups, weight, bias, EPS, mask=_ref_mask(mask))
    mean_ref, var_ref = _statistics(x, groups, mask)
    np.testing.assert_allclose(y, y_ref, **_tol(dtype))
    np.testing.assert_allclose(mean, mean_ref, **_tol(dtype))
    np.testing.assert_allclose(var, var_ref, **_tol(dtype))
    np.testing.assert_allclose(rstd, 1 / np.sqrt(var_ref + EPS), **_tol(dtype))


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize(("shape", "groups"), CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_backward(dtype, shape, groups, masked):
    """Padded positions get a nonzero dy too: their outputs depend on the statistics."""
    rng = _rng(2, *shape, groups)
    x, weight, bias, dy = _inputs(rng, shape, dtype)
    mask = _mask(rng, shape[0], shape[2]) if masked else None
    kernel_mask = NO_MASK if mask is None else mask
    _, mean, _, rstd = _forward(x, weight, bias, groups, kernel_mask)
    got = _backward(dy, x, weight, mean, rstd, groups, kernel_mask)
    want = reference_backward(dy, x, groups, weight, bias, EPS, mask=_ref_mask(mask))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, **_grad_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_instance_norm(dtype):
    """groups == channels is InstanceNorm."""
    rng = _rng(3)
    shape = (3, 5, 40)
    x, weight, bias, dy = _inputs(rng, shape, dtype)
    mask = _mask(rng, shape[0], shape[2])
    for m in (None, mask):
        kernel_mask = NO_MASK if m is None else m
        y, mean, _, rstd = _forward(x, weight, bias, shape[1], kernel_mask)
        np.testing.assert_allclose(
            y, instance_norm(x, weight, bias, EPS, mask=_ref_mask(m)), **_tol(dtype)
        )
        got = _backward(dy, x, weight, mean, rstd, shape[1], kernel_mask)
        want = instance_norm_backward(dy, x, weight, bias, EPS, mask=_ref_mask(m))
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, **_grad_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_nan_in_padding_stays_out(dtype):
    """NaN in padded positions: real outputs, the statistics, dx and the parameter
    gradients stay finite and equal the reference on the same input with the padding
    zeroed (padded outputs get dy = 0, as a masked loss gives them)."""
    rng = _rng(4)
    shape, groups = (3, 6, 50), 2
    x, weight, bias, dy = _inputs(rng, shape, dtype)
    mask = _mask(rng, shape[0], shape[2])
    padding = np.broadcast_to(mask[:, None, :] == 0, shape)
    clean = np.where(padding, 0, x).astype(dtype)
    x = np.where(padding, np.nan, x).astype(dtype)
    dy = np.where(padding, 0, dy).astype(dtype)

    y, mean, var, rstd = _forward(x, weight, bias, groups, mask)
    for stat in (mean, var, rstd):
        assert np.isfinite(stat).all()
    assert np.isnan(y[padding]).all()
    y_ref = group_norm(clean, groups, weight, bias, EPS, mask=_ref_mask(mask))
    np.testing.assert_allclose(y[~padding], y_ref[~padding], **_tol(dtype))

    got = _backward(dy, x, weight, mean, rstd, groups, mask)
    want = reference_backward(dy, clean, groups, weight, bias, EPS, mask=_ref_mask(mask))
    for a, b in zip(got, want, strict=True):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, **_grad_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_nan_stays_in_its_group(dtype):
    x, weight, bias, dy = _inputs(_rng(5), (2, 6, 9), dtype)
    x[1, 2, 4] = np.nan  # sample 1, group 1 of 3
    y, mean, _, rstd = _forward(x, weight, bias, 3)
    dx, _, _ = _backward(dy, x, weight, mean, rstd, 3)
    for out in (y, dx):
        assert np.isnan(out[1, 2:4]).all()
        assert np.isfinite(out[0]).all()
        assert np.isfinite(out[1, :2]).all() and np.isfinite(out[1, 4:]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_empty_group_gives_nan_statistics(dtype):
    """A sample that is all padding divides by a zero count, as the composite does (the
    Python layer rejects it before calling); the other samples are unaffected."""
    x, weight, bias, _ = _inputs(_rng(6), (2, 4, 5), dtype)
    mask = np.ones((2, 5), np.uint8)
    mask[0] = 0
    _, mean, var, rstd = _forward(x, weight, bias, 2, mask)
    assert np.isnan(mean[0]).all() and np.isnan(var[0]).all() and np.isnan(rstd[0]).all()
    assert np.isfinite(mean[1]).all() and np.isfinite(rstd[1]).all()


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_large_mean(dtype, masked):
    """x = 1e4 + 1e-3 * noise: two-pass float64 variance matches the reference, and the
    backward recovers the float64 mean from the rounded stored one."""
    rng = _rng(7)
    shape, groups = (3, 4, 200), 2
    x = (1e4 + 1e-3 * rng.standard_normal(shape)).astype(dtype)
    _, weight, bias, dy = _inputs(rng, shape, dtype)
    mask = None
    if masked:
        mask = _mask(rng, shape[0], shape[2])
        mask[0, :5] = 1  # a few real positions in sample 0: a nonzero variance
    kernel_mask = NO_MASK if mask is None else mask
    eps = 1e-12
    # Both sides round x - mean at ~2^-52 * |mean|, i.e. ~1e-9 of the 1e-3 spread.
    widen = 16 * 1e7 * np.finfo(np.float64).eps

    def close(tolerance):
        return {k: v + widen for k, v in tolerance.items()}

    y, mean, var, rstd = _forward(x, weight, bias, groups, kernel_mask, eps)
    mean_ref, var_ref = _statistics(x, groups, mask)
    assert (var > 0).all()
    np.testing.assert_allclose(mean, mean_ref, **_tol(dtype))
    np.testing.assert_allclose(var, var_ref, **close(_tol(dtype)))
    y_ref = group_norm(x, groups, weight, bias, eps, mask=_ref_mask(mask))
    np.testing.assert_allclose(y, y_ref, **close(_tol(dtype)))
    got = _backward(dy, x, weight, mean, rstd, groups, kernel_mask)
    want = reference_backward(dy, x, groups, weight, bias, eps, mask=_ref_mask(mask))
    for a, b in zip(got, want, strict=True):
        scale = np.abs(b).max()  # dx is O(rstd) = O(1e3)
        np.testing.assert_allclose(a / scale, b / scale, **close(_grad_tol(dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_identity_affine_equals_no_affine(dtype):
    rng = _rng(8)
    shape, groups = (3, 6, 7), 2
    x, _, _, dy = _inputs(rng, shape, dtype)
    mask = _mask(rng, shape[0], shape[2])
    ones, zeros = np.ones(shape[1], dtype), np.zeros(shape[1], dtype)
    for m in (None, mask):
        kernel_mask = NO_MASK if m is None else m
        y, mean, _, rstd = _forward(x, ones, zeros, groups, kernel_mask)
        np.testing.assert_allclose(y, group_norm(x, groups, mask=_ref_mask(m)), **_tol(dtype))
        dx, _, _ = _backward(dy, x, ones, mean, rstd, groups, kernel_mask)
        dx_ref, _, _ = reference_backward(dy, x, groups, eps=EPS, mask=_ref_mask(m))
        np.testing.assert_allclose(dx, dx_ref, **_grad_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_deterministic(dtype):
    """Same bits on a second run and with one thread instead of two."""
    rng = _rng(9)
    shape, groups = (70, 8, 30), 4
    x, weight, bias, dy = _inputs(rng, shape, dtype)
    mask = _mask(rng, shape[0], shape[2])
    threads = min(2, numba.config.NUMBA_NUM_THREADS)
    before = numba.get_num_threads()
    results = []
    try:
        for n in (threads, threads, 1):
            numba.set_num_threads(n)
            out = []
            for m in (NO_MASK, mask):
                y, mean, var, rstd = _forward(x, weight, bias, groups, m)
                out += [y, mean, var, rstd, *_backward(dy, x, weight, mean, rstd, groups, m)]
            results.append(out)
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
