"""Functional API, signature-compatible with ``torch.nn.functional`` (plus normlab's ``dim``).

Each function resolves its norm's axes (``normlab.axes``), validates the input and calls the
one differentiable normalization (``normlab.ops.normalize``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from normlab import axes as _axes
from normlab._checks import (
    check_floating,
    check_min_ndim,
    check_more_than_one_value,
    check_param,
)
from normlab.ops import normalize

__all__ = ["batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm"]


def _feature_norm(fn, x, normalized_shape, weight, bias, eps, dim, center):
    check_floating(x, fn=fn)
    shape = _axes.as_shape(normalized_shape)
    norm_axes = _axes.feature_norm_axes(x.dim(), shape, _axes.as_dims(dim, len(shape)))
    actual = tuple(x.shape[a] for a in norm_axes.reduction)
    if actual != shape:
        where = "trailing shape" if dim is None else f"shape at dim {norm_axes.reduction}"
        raise ValueError(
            f"{fn}: expected input with {where} {list(shape)} (normalized_shape), "
            f"got input of shape {list(x.shape)}"
        )
    check_param(weight, shape, fn=fn, argument="weight")
    check_param(bias, shape, fn=fn, argument="bias")
    param_shape = norm_axes.param_shape(x.shape)
    y, _, _ = normalize(
        x,
        None if weight is None else weight.reshape(param_shape),
        None if bias is None else bias.reshape(param_shape),
        norm_axes.reduction,
        eps,
        center=center,
    )
    return y


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    dim: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Layer normalization over the axes ``dim`` (default: the trailing ``len(normalized_shape)``
    axes, as ``torch.nn.functional.layer_norm``). ``dim=1`` normalizes the channels of an
    NCHW tensor in place of a permute."""
    return _feature_norm("layer_norm", input, normalized_shape, weight, bias, eps, dim, True)


def rms_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    dim: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Root-mean-square normalization: x / sqrt(mean(x^2) + eps) * weight. ``eps=None`` is the
    machine epsilon of the input dtype, as ``torch.nn.functional.rms_norm``."""
    if eps is None and isinstance(input, torch.Tensor) and input.is_floating_point():
        eps = torch.finfo(input.dtype).eps
    return _feature_norm("rms_norm", input, normalized_shape, weight, None, eps, dim, False)


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    dim: int = 1,
) -> torch.Tensor:
    """Batch normalization of the channel axis ``dim`` (default 1, as torch; ``dim=-1`` for
    ``(batch, length, features)``). In training the batch statistics are used and, when
    given, ``running_mean``/``running_var`` are updated in place with factor ``momentum``
    (the variance unbiased); otherwise the running statistics are used."""
    fn = "batch_norm"
    check_floating(input, fn=fn)
    check_min_ndim(input, 1, fn=fn, layout="(..., C, ...)")
    norm_axes = _axes.channel_norm_axes(input.dim(), dim)
    channel = norm_axes.feature[0]
    num_features = input.shape[channel]
    for name, param in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        check_param(param, (num_features,), fn=fn, argument=name)
    count = norm_axes.reduced_count(input.shape)
    param_shape = norm_axes.param_shape(input.shape)

    def as_param(t):
        return None if t is None else t.reshape(param_shape)

    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                f"{fn}: running_mean and running_var are required when "
                f"training=False, got {type(running_mean).__name__} and "
                f"{type(running_var).__name__}"
            )
        y, _, _ = normalize(
            input,
            as_param(weight),
            as_param(bias),
            norm_axes.reduction,
            eps,
            mean=as_param(running_mean),
            var=as_param(running_var),
        )
        return y

    check_more_than_one_value(count, input, fn=fn, per="channel")
    y, mean, var = normalize(input, as_param(weight), as_param(bias), norm_axes.reduction, eps)
    _update_running_stats(
        running_mean, running_var, mean.reshape(-1), var.reshape(-1), count, momentum
    )
    return y


@torch.no_grad()
def _update_running_stats(running_mean, running_var, batch_mean, batch_var, count, momentum):
    """torch's rule: running = (1 - momentum) * running + momentum * batch, variance unbiased."""
    if count < 2:  # an empty batch carries no statistics
        return
    if running_mean is not None:
        running_mean.lerp_(batch_mean.to(running_mean.dtype), momentum)
    if running_var is not None:
        unbiased = batch_var * (count / (count - 1))
        running_var.lerp_(unbiased.to(running_var.dtype), momentum)


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Instance normalization of (N, C, *spatial): each channel of each sample over its
    positions. With ``use_input_stats`` the running statistics (if given) are updated with
    the batch average of the per-instance statistics, as torch."""
    fn = "instance_norm"
    check_floating(input, fn=fn)
    check_min_ndim(input, 2, fn=fn, layout="(N, C, *spatial)")
    norm_axes = _axes.instance_norm_axes(input.dim())
    num_features = input.shape[1]
    for name, param in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        check_param(param, (num_features,), fn=fn, argument=name)
    param_shape = norm_axes.param_shape(input.shape)

    def as_param(t):
        return None if t is None else t.reshape(param_shape)

    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError(
                f"{fn}: running_mean and running_var are required when use_input_stats=False, "
                f"got {type(running_mean).__name__} and {type(running_var).__name__}"
            )
        stat_shape = (1, num_features) + (1,) * (input.dim() - 2)
        y, _, _ = normalize(
            input,
            as_param(weight),
            as_param(bias),
            norm_axes.reduction,
            eps,
            mean=running_mean.reshape(stat_shape),
            var=running_var.reshape(stat_shape),
        )
        return y

    count = norm_axes.reduced_count(input.shape)
    check_more_than_one_value(count, input, fn=fn, per="instance (spatial size 1)")
    y, mean, var = normalize(input, as_param(weight), as_param(bias), norm_axes.reduction, eps)
    n = input.shape[0]
    _update_running_stats(
        running_mean,
        running_var,
        mean.reshape(n, num_features).mean(0),
        var.reshape(n, num_features).mean(0),
        count if n else 0,
        momentum,
    )
    return y


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Group normalization of (N, C, *spatial): the C // num_groups channels of a group and all
    their positions, per sample, share a mean and variance; weight and bias are per channel."""
    fn = "group_norm"
    check_floating(input, fn=fn)
    check_min_ndim(input, 2, fn=fn, layout="(N, C, *spatial)")
    channels = input.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{fn}: num_groups must be a positive int, got {num_groups!r}")
    if channels % num_groups:
        raise ValueError(
            f"{fn}: the channel count must be divisible by num_groups, got "
            f"{channels} channels (input shape {list(input.shape)}) and "
            f"num_groups={num_groups}"
        )
    check_param(weight, (channels,), fn=fn, argument="weight")
    check_param(bias, (channels,), fn=fn, argument="bias")
    grouped = _axes.grouped_shape(input.shape, num_groups)
    check_more_than_one_value(grouped[2] * grouped[3], input, fn=fn, per="group")
    param_shape = (1, num_groups, channels // num_groups, 1)
    y, _, _ = normalize(
        input.reshape(grouped),
        None if weight is None else weight.reshape(param_shape),
        None if bias is None else bias.reshape(param_shape),
        _axes.group_norm_axes().reduction,
        eps,
    )
    y = y.reshape(input.shape)
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)
    return y
