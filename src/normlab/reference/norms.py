"""The norms of torch.nn, each written as its axes plus the one normalization of ``core``.

Signatures follow ``torch.nn.functional`` (plus normlab's ``dim``); every ``*_backward``
takes the upstream gradient ``dy`` first and returns ``(dx, dweight, dbias)``.
"""

from __future__ import annotations

import numpy as np

from normlab.axes import (
    as_dims,
    as_shape,
    channel_norm_axes,
    feature_norm_axes,
    group_norm_axes,
    grouped_shape,
    instance_norm_axes,
)
from normlab.reference.core import _f64, normalize, normalize_backward, statistics


def _default_rms_eps(x, eps):
    # torch.nn.functional.rms_norm: eps=None means the machine epsilon of the input's dtype.
    return float(np.finfo(np.asarray(x).dtype).eps) if eps is None else eps


# --- LayerNorm: all features of one sample -----------------------------------------------


def _feature_axes(x, normalized_shape, dim):
    shape = as_shape(normalized_shape)
    return feature_norm_axes(np.ndim(x), shape, as_dims(dim, len(shape)))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, dim=None):
    return normalize(x, _feature_axes(x, normalized_shape, dim), weight, bias, eps)


def layer_norm_backward(dy, x, normalized_shape, weight=None, bias=None, eps=1e-5, dim=None):
    return normalize_backward(dy, x, _feature_axes(x, normalized_shape, dim), weight, bias, eps)


# --- RMSNorm: LayerNorm without centring and without bias --------------------------------


def rms_norm(x, normalized_shape, weight=None, eps=None, dim=None):
    axes = _feature_axes(x, normalized_shape, dim)
    return normalize(x, axes, weight, None, _default_rms_eps(x, eps), center=False)


def rms_norm_backward(dy, x, normalized_shape, weight=None, eps=None, dim=None):
    axes = _feature_axes(x, normalized_shape, dim)
    dx, dweight, _ = normalize_backward(
        dy, x, axes, weight, None, _default_rms_eps(x, eps), center=False
    )
    return dx, dweight, None


# --- BatchNorm: one feature over all samples (and positions) -----------------------------


def batch_norm_train(x, weight=None, bias=None, eps=1e-5, dim=1):
    """Training mode: normalize with the batch statistics."""
    return normalize(x, channel_norm_axes(np.ndim(x), dim), weight, bias, eps)


def batch_norm_train_backward(dy, x, weight=None, bias=None, eps=1e-5, dim=1):
    return normalize_backward(dy, x, channel_norm_axes(np.ndim(x), dim), weight, bias, eps)


def _running_stats(x, running_mean, running_var, dim):
    axes = channel_norm_axes(np.ndim(x), dim)
    shape = axes.stat_shape(np.shape(x))
    return axes, _f64(running_mean).reshape(shape), _f64(running_var).reshape(shape)


def batch_norm_eval(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, dim=1):
    """Eval mode: normalize with the running statistics."""
    axes, mean, var = _running_stats(x, running_mean, running_var, dim)
    return normalize(x, axes, weight, bias, eps, mean=mean, var=var)


def batch_norm_eval_backward(
    dy, x, running_mean, running_var, weight=None, bias=None, eps=1e-5, dim=1
):
    axes, mean, var = _running_stats(x, running_mean, running_var, dim)
    return normalize_backward(dy, x, axes, weight, bias, eps, mean=mean, var=var)


def updated_running_stats(running_mean, running_var, batch_mean, batch_var, count, momentum):
    """One step of torch's running statistics: an exponential moving average with factor
    ``momentum`` of the batch mean and the *unbiased* batch variance (``count`` values)."""
    unbiased_var = _f64(batch_var) * count / (count - 1)
    new_mean = (1 - momentum) * _f64(running_mean) + momentum * _f64(batch_mean)
    new_var = (1 - momentum) * _f64(running_var) + momentum * unbiased_var
    return new_mean, new_var


def batch_norm_update_running_stats(x, running_mean, running_var, momentum=0.1, dim=1):
    """The running statistics after one training step of BatchNorm on ``x``."""
    axes = channel_norm_axes(np.ndim(x), dim)
    mean, var = statistics(x, axes)
    return updated_running_stats(
        running_mean,
        running_var,
        mean.ravel(),
        var.ravel(),
        axes.reduced_count(np.shape(x)),
        momentum,
    )


# --- InstanceNorm: one channel of one sample, over positions -----------------------------


def instance_norm(x, weight=None, bias=None, eps=1e-5):
    return normalize(x, instance_norm_axes(np.ndim(x)), weight, bias, eps)


def instance_norm_backward(dy, x, weight=None, bias=None, eps=1e-5):
    return normalize_backward(dy, x, instance_norm_axes(np.ndim(x)), weight, bias, eps)


def instance_norm_update_running_stats(x, running_mean, running_var, momentum=0.1):
    """torch averages the per-instance statistics over the batch before the update."""
    axes = instance_norm_axes(np.ndim(x))
    mean, var = statistics(x, axes)
    n, c = np.shape(x)[:2]
    return updated_running_stats(
        running_mean,
        running_var,
        mean.reshape(n, c).mean(axis=0),
        var.reshape(n, c).mean(axis=0),
        axes.reduced_count(np.shape(x)),
        momentum,
    )


# --- GroupNorm: a group of channels of one sample, over positions -------------------------


def _grouped(x, num_groups, dy=None):
    shape = grouped_shape(np.shape(x), num_groups)
    return _f64(x).reshape(shape), None if dy is None else _f64(dy).reshape(shape)


def _grouped_param(param, num_groups):
    return None if param is None else _f64(param).reshape(num_groups, -1)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    xg, _ = _grouped(x, num_groups)
    y = normalize(
        xg,
        group_norm_axes(),
        _grouped_param(weight, num_groups),
        _grouped_param(bias, num_groups),
        eps,
    )
    return y.reshape(np.shape(x))


def group_norm_backward(dy, x, num_groups, weight=None, bias=None, eps=1e-5):
    xg, dyg = _grouped(x, num_groups, dy)
    dx, dweight, dbias = normalize_backward(
        dyg,
        xg,
        group_norm_axes(),
        _grouped_param(weight, num_groups),
        _grouped_param(bias, num_groups),
        eps,
    )
    return (
        dx.reshape(np.shape(x)),
        None if dweight is None else dweight.ravel(),
        None if dbias is None else dbias.ravel(),
    )
