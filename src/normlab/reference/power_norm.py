"""PowerNorm (Shen et al., ICML 2020, Algorithm 1) in float64 NumPy.

Per channel, over real elements, with psi^2 the running quadratic mean and nu the running
gradient statistic (both from the previous step):

    forward (after warmup):  xhat = x / sqrt(psi^2 + eps),  y = weight * xhat + bias
    running update:          psi^2 <- psi^2 + momentum * (mean(x^2) - psi^2)
    backward (approximate):  g = weight * dy
                             dx = (g - m * nu * xhat) / sqrt(psi^2 + eps)   (m: real = 1)
                             nu <- nu * (1 - (1 - alpha) * mean(xhat^2))
                                   + (1 - alpha) * mean(g * xhat)
    warmup:                  the batch's own mean(x^2) normalizes (an uncentred BatchNorm)
    eval:                    xhat = x / sqrt(psi^2 + eps)
"""

from __future__ import annotations

import numpy as np

from normlab.reference.core import _f64, normalize, normalize_backward, statistics
from normlab.reference.norms import _bn_axes_and_mask


def _affine(xhat, axes, shape, weight, bias):
    y = xhat
    if weight is not None:
        y = y * _f64(weight).reshape(axes.param_shape(shape))
    if bias is not None:
        y = y + _f64(bias).reshape(axes.param_shape(shape))
    return y


def batch_quadratic_mean(x, dim=-1, mask=None):
    """psi_B^2: mean of x^2 per channel over real elements."""
    axes, m = _bn_axes_and_mask(x, dim, mask)
    return statistics(x, axes, center=False, mask=m)[1].ravel()


def power_norm_forward(x, running_phi, weight=None, bias=None, eps=1e-5, dim=-1):
    """Training after warmup, and eval: divide by the running quadratic mean."""
    axes, _ = _bn_axes_and_mask(x, dim, None)
    phi = _f64(running_phi).reshape(axes.stat_shape(np.shape(x)))
    return _affine(_f64(x) / np.sqrt(phi + eps), axes, np.shape(x), weight, bias)


def power_norm_backward(
    dy,
    x,
    running_phi,
    running_grad_stat,
    weight=None,
    bias=None,
    eps=1e-5,
    alpha_bkw=0.9,
    dim=-1,
    mask=None,
):
    """The approximate backward; returns (dx, dweight, dbias, new_running_grad_stat)."""
    axes, m = _bn_axes_and_mask(x, dim, mask)
    shape = axes.stat_shape(np.shape(x))
    rstd = 1.0 / np.sqrt(_f64(running_phi).reshape(shape) + eps)
    nu = _f64(running_grad_stat).reshape(shape)
    x, dy = _f64(x), _f64(dy)
    xhat = x * rstd
    g = dy if weight is None else dy * _f64(weight).reshape(axes.param_shape(np.shape(x)))
    real = np.ones(np.shape(x)) if m is None else np.broadcast_to(m, np.shape(x))
    count = real.sum(axis=axes.reduction, keepdims=True)
    selected = real != 0  # selected, not multiplied: NaN/Inf in padding stays out
    gamma = np.where(selected, xhat**2, 0).sum(axis=axes.reduction, keepdims=True) / count
    lam = np.where(selected, g * xhat, 0).sum(axis=axes.reduction, keepdims=True) / count
    new_nu = nu * (1 - (1 - alpha_bkw) * gamma) + (1 - alpha_bkw) * lam
    dx = (g - np.where(selected, nu * xhat, 0)) * rstd
    batch_axes = tuple(a for a in range(np.ndim(x)) if a not in axes.feature)
    dy_xhat = dy * xhat if m is None else np.where(dy == 0, 0, dy * xhat)
    dweight = None if weight is None else dy_xhat.sum(axis=batch_axes)
    dbias = None if bias is None else dy.sum(axis=batch_axes)
    return dx, dweight, dbias, new_nu.ravel()


def power_norm_warmup(x, weight=None, bias=None, eps=1e-5, dim=-1, mask=None):
    axes, m = _bn_axes_and_mask(x, dim, mask)
    return normalize(x, axes, weight, bias, eps, center=False, mask=m)


def power_norm_warmup_backward(dy, x, weight=None, bias=None, eps=1e-5, dim=-1, mask=None):
    axes, m = _bn_axes_and_mask(x, dim, mask)
    return normalize_backward(dy, x, axes, weight, bias, eps, center=False, mask=m)


def power_norm_update_running_phi(x, running_phi, momentum, dim=-1, mask=None):
    phi = _f64(running_phi)
    return phi + momentum * (batch_quadratic_mean(x, dim, mask) - phi)
