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


def _offset_weight(weight, offset):
    """The weight the norm multiplies by: ``offset + weight`` (Gemma's ``1 + w``, Nemotron's
    LayerNorm1P). d(offset + weight) / d weight is 1, so dweight is unchanged by the offset.
    An offset needs a weight (normlab raises for one without)."""
    if offset == 0:
        return weight
    if weight is None:
        raise ValueError("offset needs a weight")
    return _f64(weight) + offset


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, dim=None, offset=0.0):
    """``(x - mean) / sqrt(var + eps) * (offset + weight) + bias``."""
    weight = _offset_weight(weight, offset)
    return normalize(x, _feature_axes(x, normalized_shape, dim), weight, bias, eps)


def layer_norm_backward(
    dy, x, normalized_shape, weight=None, bias=None, eps=1e-5, dim=None, offset=0.0
):
    weight = _offset_weight(weight, offset)
    return normalize_backward(dy, x, _feature_axes(x, normalized_shape, dim), weight, bias, eps)


# --- RMSNorm: LayerNorm without centring and without bias --------------------------------


def rms_norm(x, normalized_shape, weight=None, eps=None, dim=None, offset=0.0):
    """``x / sqrt(mean(x^2) + eps) * (offset + weight)``."""
    axes = _feature_axes(x, normalized_shape, dim)
    weight = _offset_weight(weight, offset)
    return normalize(x, axes, weight, None, _default_rms_eps(x, eps), center=False)


def rms_norm_backward(dy, x, normalized_shape, weight=None, eps=None, dim=None, offset=0.0):
    axes = _feature_axes(x, normalized_shape, dim)
    weight = _offset_weight(weight, offset)
    dx, dweight, _ = normalize_backward(
        dy, x, axes, weight, None, _default_rms_eps(x, eps), center=False
    )
    return dx, dweight, None


# --- BatchNorm: one feature over all samples (and positions) -----------------------------
#
# ``mask`` (1 = real, 0 = padding) is shaped like x without the channel axis; it gets a
# size-1 channel axis so it broadcasts. Ghost BatchNorm (``virtual_batch_size``) is literally
# BatchNorm applied to each consecutive group of samples.


def _channel_mask(mask, channel_axis):
    return None if mask is None else np.expand_dims(_f64(mask), channel_axis)


def _bn_axes_and_mask(x, dim, mask):
    axes = channel_norm_axes(np.ndim(x), dim)
    return axes, _channel_mask(mask, axes.feature[0])


def _virtual_batches(x, mask, virtual_batch_size, *arrays):
    """Split x (and mask, dy, ... along axis 0) into consecutive virtual batches."""
    if virtual_batch_size is None:  # one batch, whole: the mask's axis 0 may be a channel's
        yield (np.asarray(x), mask, *(np.asarray(a) for a in arrays))
        return
    size = virtual_batch_size
    for start in range(0, np.shape(x)[0], size):
        rows = slice(start, start + size)
        part_mask = None
        if mask is not None:
            part_mask = mask if np.shape(mask)[0] == 1 else np.asarray(mask)[rows]
        yield (np.asarray(x)[rows], part_mask, *(np.asarray(a)[rows] for a in arrays))


def batch_norm_train(
    x, weight=None, bias=None, eps=1e-5, dim=1, mask=None, virtual_batch_size=None
):
    """Training mode: normalize with the batch statistics (of real elements, per virtual
    batch)."""
    parts = []
    for xv, mv in _virtual_batches(x, mask, virtual_batch_size):
        axes, m = _bn_axes_and_mask(xv, dim, mv)
        parts.append(normalize(xv, axes, weight, bias, eps, mask=m))
    return np.concatenate(parts, axis=0)


def batch_norm_train_backward(
    dy, x, weight=None, bias=None, eps=1e-5, dim=1, mask=None, virtual_batch_size=None
):
    dxs, dweight, dbias = [], None, None
    for xv, mv, dyv in _virtual_batches(x, mask, virtual_batch_size, dy):
        axes, m = _bn_axes_and_mask(xv, dim, mv)
        dx, dw, db = normalize_backward(dyv, xv, axes, weight, bias, eps, mask=m)
        dxs.append(dx)
        dweight = dw if dweight is None else dweight + dw
        dbias = db if dbias is None else dbias + db
    return np.concatenate(dxs, axis=0), dweight, dbias


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
    ``momentum`` of the batch mean and the *unbiased* batch variance (``count`` values).
    With several sets of statistics (rows of ``batch_mean``), their average is used."""
    unbiased_var = _f64(batch_var) * count / (count - 1)
    if np.ndim(unbiased_var) == 2:
        batch_mean, unbiased_var = np.mean(batch_mean, axis=0), unbiased_var.mean(axis=0)
    new_mean = (1 - momentum) * _f64(running_mean) + momentum * _f64(batch_mean)
    new_var = (1 - momentum) * _f64(running_var) + momentum * unbiased_var
    return new_mean, new_var


def batch_norm_update_running_stats(
    x, running_mean, running_var, momentum=0.1, dim=1, mask=None, virtual_batch_size=None
):
    """The running statistics after one training step of BatchNorm on ``x`` (real elements
    only; with virtual batches, the average of their statistics)."""
    means, variances, counts = [], [], []
    for xv, mv in _virtual_batches(x, mask, virtual_batch_size):
        axes, m = _bn_axes_and_mask(xv, dim, mv)
        mean, var = statistics(xv, axes, mask=m)
        full = np.ones(np.shape(xv)) if m is None else np.broadcast_to(m, np.shape(xv))
        means.append(mean.ravel())
        variances.append(var.ravel())
        counts.append(full.sum(axis=axes.reduction).ravel())
    return updated_running_stats(
        running_mean, running_var, np.stack(means), np.stack(variances), np.stack(counts), momentum
    )


# --- InstanceNorm: one channel of one sample, over positions -----------------------------


def instance_norm(x, weight=None, bias=None, eps=1e-5, mask=None):
    return normalize(
        x, instance_norm_axes(np.ndim(x)), weight, bias, eps, mask=_channel_mask(mask, 1)
    )


def instance_norm_backward(dy, x, weight=None, bias=None, eps=1e-5, mask=None):
    return normalize_backward(
        dy, x, instance_norm_axes(np.ndim(x)), weight, bias, eps, mask=_channel_mask(mask, 1)
    )


def instance_norm_update_running_stats(x, running_mean, running_var, momentum=0.1, mask=None):
    """torch averages the per-instance statistics over the batch before the update."""
    axes = instance_norm_axes(np.ndim(x))
    m = _channel_mask(mask, 1)
    mean, var = statistics(x, axes, mask=m)
    n, c = np.shape(x)[:2]
    full = np.ones(np.shape(x)) if m is None else np.broadcast_to(m, np.shape(x))
    count = full.sum(axis=axes.reduction).reshape(n, c)
    return updated_running_stats(
        running_mean, running_var, mean.reshape(n, c), var.reshape(n, c), count, momentum
    )


# --- GroupNorm: a group of channels of one sample, over positions -------------------------


def _grouped(x, num_groups, dy=None):
    shape = grouped_shape(np.shape(x), num_groups)
    return _f64(x).reshape(shape), None if dy is None else _f64(dy).reshape(shape)


def _grouped_param(param, num_groups):
    return None if param is None else _f64(param).reshape(num_groups, -1)


def _grouped_mask(mask, x):
    """(N, *spatial) -> (N, 1, 1, S), the grouped view's shape."""
    if mask is None:
        return None
    n, spatial = np.shape(x)[0], np.shape(x)[2:]
    return np.broadcast_to(_f64(mask), (n, *spatial)).reshape(n, 1, 1, -1)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, mask=None):
    xg, _ = _grouped(x, num_groups)
    y = normalize(
        xg,
        group_norm_axes(),
        _grouped_param(weight, num_groups),
        _grouped_param(bias, num_groups),
        eps,
        mask=_grouped_mask(mask, x),
    )
    return y.reshape(np.shape(x))


def group_norm_backward(dy, x, num_groups, weight=None, bias=None, eps=1e-5, mask=None):
    xg, dyg = _grouped(x, num_groups, dy)
    dx, dweight, dbias = normalize_backward(
        dyg,
        xg,
        group_norm_axes(),
        _grouped_param(weight, num_groups),
        _grouped_param(bias, num_groups),
        eps,
        mask=_grouped_mask(mask, x),
    )
    return (
        dx.reshape(np.shape(x)),
        None if dweight is None else dweight.ravel(),
        None if dbias is None else dbias.ravel(),
    )
