"""Batch Renormalization (Ioffe 2017) in float64 NumPy, training step and its gradient.

    sigma_B = sqrt(var_B + eps)                 sigma = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1/r_max, r_max)   d = clip((mean_B - running_mean) / sigma,
                                                         -d_max, d_max)
    y = weight * ((x - mean_B) / sigma_B * r + d) + bias

r and d are constants for the gradient, so dx is BatchNorm's with weight * r in place of
weight, and dweight collects dy * (xhat * r + d).
"""

from __future__ import annotations

import numpy as np

from normlab.reference.core import _f64, normalize, normalize_backward, statistics
from normlab.reference.norms import _bn_axes_and_mask


def renorm_correction(
    x, running_mean, running_var, eps=1e-5, r_max=3.0, d_max=5.0, dim=1, mask=None
):
    """(r, d) per channel, shaped like the statistics (keepdims)."""
    axes, m = _bn_axes_and_mask(x, dim, mask)
    mean, var = statistics(x, axes, mask=m)
    shape = axes.stat_shape(np.shape(x))
    sigma = np.sqrt(_f64(running_var).reshape(shape) + eps)
    r = np.clip(np.sqrt(var + eps) / sigma, 1.0 / r_max, r_max)
    d = np.clip((mean - _f64(running_mean).reshape(shape)) / sigma, -d_max, d_max)
    return r, d


def batch_renorm_train(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    eps=1e-5,
    r_max=3.0,
    d_max=5.0,
    dim=1,
    mask=None,
):
    axes, m = _bn_axes_and_mask(x, dim, mask)
    r, d = renorm_correction(x, running_mean, running_var, eps, r_max, d_max, dim, mask)
    xhat = normalize(x, axes, eps=eps, mask=m)
    y = xhat * r + d
    shape = axes.param_shape(np.shape(x))
    if weight is not None:
        y = y * _f64(weight).reshape(shape)
    if bias is not None:
        y = y + _f64(bias).reshape(shape)
    return y


def batch_renorm_train_backward(
    dy,
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    eps=1e-5,
    r_max=3.0,
    d_max=5.0,
    dim=1,
    mask=None,
):
    axes, m = _bn_axes_and_mask(x, dim, mask)
    r, d = renorm_correction(x, running_mean, running_var, eps, r_max, d_max, dim, mask)
    shape = axes.param_shape(np.shape(x))
    w = np.ones(np.shape(r)) if weight is None else _f64(weight).reshape(shape)
    dx, _, _ = normalize_backward(_f64(dy) * w * r, x, axes, eps=eps, mask=m)
    xhat = normalize(x, axes, eps=eps, mask=m)
    batch_axes = tuple(a for a in range(np.ndim(x)) if a not in axes.feature)
    dweight = None
    if weight is not None:
        dweight = (_f64(dy) * (xhat * r + d)).sum(axis=batch_axes).reshape(np.shape(weight))
    dbias = None if bias is None else _f64(dy).sum(axis=batch_axes).reshape(np.shape(bias))
    return dx, dweight, dbias
