"""What the channel-wise norms share: their preparation (axes, mask) and the running-statistics
update."""

from __future__ import annotations

import torch

from normlab import axes as _axes
from normlab.checks import check_channel_params, check_floating, check_min_ndim
from normlab.masks import channel_mask


def prepare_channel_norm(fn: str, input, dim: int, mask, lengths, **params):
    """Validate a norm over one channel axis ``dim`` (BatchNorm's family) and its mask:
    returns the axes and the mask with a size-1 channel axis (or None)."""
    check_floating(input, fn=fn)
    check_min_ndim(input, 1, fn=fn, layout="(..., C, ...)")
    norm_axes = _axes.channel_norm_axes(input.dim(), dim)
    channel = norm_axes.feature[0]
    check_channel_params(fn, input.shape[channel], **params)
    return norm_axes, channel_mask(input, channel, mask, lengths, fn=fn)


def prepare_batch_norm(fn, input, dim, mask, lengths, running_mean, running_var, weight, bias):
    """``prepare_channel_norm`` with BatchNorm's parameters (batch_norm, batch_renorm,
    sync_batch_norm)."""
    params = dict(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    return prepare_channel_norm(fn, input, dim, mask, lengths, **params)


def as_param(t: torch.Tensor | None, shape) -> torch.Tensor | None:
    return None if t is None else t.reshape(shape)


@torch.no_grad()
def update_running_stats(running_mean, running_var, mean, var, count, momentum) -> None:
    """torch's rule, over real elements: running = (1 - momentum) * running + momentum * batch,
    with the batch variance unbiased by its real count.

    ``mean``/``var`` are (K, C): K sets of per-channel statistics (1 for BatchNorm, one per
    sample for InstanceNorm, one per virtual batch for ghost BatchNorm), averaged over K.
    ``count`` is an int or broadcasts against (K, C).
    """
    if running_mean is None and running_var is None:
        return
    if mean.shape[0] == 0:  # no samples: no (virtual) batch to average
        return
    if isinstance(count, int):
        if count < 2:  # an empty batch carries no statistics
            return
    else:  # keepdim counts, possibly broadcast over samples or channels -> (K, C)
        count = torch.broadcast_to(count.to(var.dtype).reshape(count.shape[0], -1), var.shape)
    if running_mean is not None:
        running_mean.lerp_(mean.mean(0).to(running_mean.dtype), momentum)
    if running_var is not None:
        unbiased = (var * count / (count - 1)).mean(0)
        running_var.lerp_(unbiased.to(running_var.dtype), momentum)
