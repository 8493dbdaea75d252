"""What the channel-wise norms share: parameter checks, real counts, running statistics."""

from __future__ import annotations

import torch

from normlab import axes as _axes
from normlab._checks import check_floating, check_min_ndim, check_param
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


def check_channel_params(fn: str, num_features: int, **params) -> None:
    """weight, bias and running statistics: None or exactly (num_features,)."""
    for name, param in params.items():
        check_param(param, (num_features,), fn=fn, argument=name)


def as_param(t: torch.Tensor | None, shape) -> torch.Tensor | None:
    return None if t is None else t.reshape(shape)


def check_enough_values(
    count, x: torch.Tensor, *, fn: str, per: str, masked: bool, training: bool = True
) -> None:
    """Statistics of fewer than 2 values are meaningless in training: refuse, as torch does
    for one value (an empty unmasked input is allowed: its output is empty). With a mask,
    every statistic needs 2 real values; the check reads the mask's counts, so it is skipped
    while torch.compile traces (data-dependent). ``training=False``: a norm without running
    statistics (GroupNorm), whose input statistics are used in every mode."""
    when = " when training" if training else ""
    if not masked:
        if count == 1:
            raise ValueError(
                f"{fn}: expected more than 1 value per {per}{when}, got input size {list(x.shape)}"
            )
        return
    if torch.compiler.is_compiling():
        return
    fewest = int(count.min()) if count.numel() else 0
    if fewest < 2:
        raise ValueError(
            f"{fn}: expected more than 1 value per {per}{when}, got "
            f"{fewest} real value(s) in some {per} (mask of input size "
            f"{list(x.shape)})"
        )


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
