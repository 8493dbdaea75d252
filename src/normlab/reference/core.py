"""The one normalization every norm is: statistics over reduction axes, affine over feature axes.

Forward, with R the reduction axes and M the number of elements they hold:

    mean = (1/M) sum_R x                       (0 for RMSNorm: no centring)
    var  = (1/M) sum_R (x - mean)^2            (two-pass: never E[x^2] - E[x]^2)
    xhat = (x - mean) / sqrt(var + eps)
    y    = weight * xhat + bias                (weight, bias vary along the feature axes)

Backward, with g = weight * dy and the statistics computed from x:

    dx      = (g - mean_R(g) - xhat * mean_R(g * xhat)) / sqrt(var + eps)
    dx      = (g - xhat * mean_R(g * xhat)) / sqrt(var + eps)        (no centring)
    dx      = g / sqrt(var + eps)                (statistics given, e.g. BatchNorm in eval)
    dweight = sum over the non-feature axes of dy * xhat
    dbias   = sum over the non-feature axes of dy

With a mask m (1 = real element, 0 = padding) the statistics count real elements only,
with n = sum_R m in place of M, and every element (padding too) is normalized with them:

    mean = (1/n) sum_R m * x        var = (1/n) sum_R m * (x - mean)^2
    dx   = (g - m * sum_R(g) / n - m * xhat * sum_R(g * xhat) / n) / sqrt(var + eps)

Everything is float64 NumPy: this module is the oracle the fast paths are tested against.
"""

from __future__ import annotations

import numpy as np

from normlab.axes import NormAxes


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _broadcast_param(param, axes: NormAxes, shape):
    """A parameter of the feature axes, reshaped to broadcast against ``shape``."""
    if param is None:
        return None
    return _f64(param).reshape(axes.param_shape(shape))


def statistics(x, axes: NormAxes, *, center: bool = True, mask=None):
    """Per-group mean and biased variance (keepdims), two-pass, over real elements."""
    x = _f64(x)
    m = np.ones_like(x) if mask is None else np.broadcast_to(_f64(mask), x.shape)
    count = m.sum(axis=axes.reduction, keepdims=True)
    real = m != 0  # padding is selected away, not multiplied by 0: NaN/Inf there stays out
    if center:
        mean = np.where(real, x, 0).sum(axis=axes.reduction, keepdims=True) / count
    else:
        mean = np.zeros(axes.stat_shape(x.shape))
    var = np.where(real, np.square(x - mean), 0).sum(axis=axes.reduction, keepdims=True) / count
    return mean, var


def normalize(
    x,
    axes: NormAxes,
    weight=None,
    bias=None,
    eps=1e-5,
    *,
    center=True,
    mean=None,
    var=None,
    mask=None,
):
    """y = weight * (x - mean) / sqrt(var + eps) + bias; statistics from x unless given."""
    x = _f64(x)
    if mean is None or var is None:
        mean, var = statistics(x, axes, center=center, mask=mask)
    xhat = (x - mean) / np.sqrt(var + eps)
    y = xhat
    if weight is not None:
        y = y * _broadcast_param(weight, axes, x.shape)
    if bias is not None:
        y = y + _broadcast_param(bias, axes, x.shape)
    return y


def normalize_backward(
    dy,
    x,
    axes: NormAxes,
    weight=None,
    bias=None,
    eps=1e-5,
    *,
    center=True,
    mean=None,
    var=None,
    mask=None,
):
    """Gradients (dx, dweight, dbias) of :func:`normalize`; dweight/dbias are None when the
    parameter is None. Given statistics are constants (no gradient flows through them)."""
    x, dy = _f64(x), _f64(dy)
    stats_given = mean is not None and var is not None
    if not stats_given:
        mean, var = statistics(x, axes, center=center, mask=mask)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    g = dy if weight is None else dy * _broadcast_param(weight, axes, x.shape)
    m = np.ones_like(x) if mask is None else np.broadcast_to(_f64(mask), x.shape)
    count = m.sum(axis=axes.reduction, keepdims=True)

    def sum_r(t):
        return t.sum(axis=axes.reduction, keepdims=True)

    # Selected, not multiplied: NaN/Inf in padding (where dy = 0) stays out of the sums.
    real = m != 0
    g_xhat = np.where(g == 0, 0, g * xhat) if mask is not None else g * xhat
    if stats_given:
        dx = g * rstd
    elif center:
        dx = (g - np.where(real, sum_r(g) / count + xhat * sum_r(g_xhat) / count, 0)) * rstd
    else:
        dx = (g - np.where(real, xhat * sum_r(g_xhat) / count, 0)) * rstd

    batch_axes = tuple(a for a in range(x.ndim) if a not in axes.feature)
    dy_xhat = np.where(dy == 0, 0, dy * xhat) if mask is not None else dy * xhat
    dweight = None if weight is None else dy_xhat.sum(axis=batch_axes).reshape(np.shape(weight))
    dbias = None if bias is None else dy.sum(axis=batch_axes).reshape(np.shape(bias))
    return dx, dweight, dbias
