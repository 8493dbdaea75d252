"""GroupNorm: a group of channels of one sample, with all their positions."""

from __future__ import annotations

import torch

from normlab import axes as _axes
from normlab.backends import plans
from normlab.checks import (
    check_channel_params,
    check_enough_values,
    check_floating,
    check_groups,
    check_min_ndim,
    check_scalar,
)
from normlab.functional.statistics import as_param
from normlab.masks import channel_mask
from normlab.ops import normalize, real_count
from normlab.spec import NormSpec


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group normalization of (N, C, *spatial): the C // num_groups channels of a group and all
    their positions, per sample, share a mean and variance; weight and bias are per channel.

    ``mask`` (bool, (N, *spatial); True = real) or ``lengths`` (for (N, C, L)) restrict the
    statistics to real positions; padding is normalized with them too."""
    fn = "group_norm"
    key = None
    if mask is None and lengths is None:
        # A signature seen before runs its first call's decision (normlab.backends.plans).
        key = plans.key(fn, input, eps, (weight, bias), num_groups)
        if key is not None:
            runner = plans.get(key)
            if runner:
                if input.is_contiguous() and getattr(runner, "by_address", False):
                    return runner(input, weight, bias, eps)  # (the grouped view's memory)
                # it takes what the full path normalizes: the grouped view
                x = input.reshape(_axes.grouped_shape(input.shape, num_groups))
                return _layout_like(input, runner(x, weight, bias, eps).reshape(input.shape))
    check_floating(input, fn=fn)
    check_min_ndim(input, 2, fn=fn, layout="(N, C, *spatial)")
    check_scalar(eps, fn=fn, argument="eps")
    check_groups(fn, input, num_groups)
    channels = input.shape[1]
    check_channel_params(fn, channels, weight=weight, bias=bias)
    mask = channel_mask(input, 1, mask, lengths, fn=fn)
    grouped = _axes.grouped_shape(input.shape, num_groups)
    x = input.reshape(grouped)
    if mask is not None:  # (N, 1, *spatial) -> (N, 1, 1, S), as the grouped view of x
        spatial = [n for n in input.shape[2:]]
        mask = torch.broadcast_to(mask, [mask.shape[0], 1, *spatial]).reshape(
            mask.shape[0], 1, 1, grouped[3]
        )
    spec = NormSpec.of(_axes.group_norm_axes(), masked=mask is not None)
    count = real_count(spec, x, mask)
    # No running statistics: the same check in eval (torch.nn returns the bias there).
    check_enough_values(count, input, fn=fn, per="group", masked=mask is not None, training=False)
    param_shape = (1, num_groups, channels // num_groups, 1)
    weight, bias = as_param(weight, param_shape), as_param(bias, param_shape)
    y, _, _ = normalize(spec, x, weight, bias, eps, mask=mask, stats=False, plan_key=key)
    return _layout_like(input, y.reshape(input.shape))


def _layout_like(input, y):
    """y in channels-last memory where the input is (torch.nn.GroupNorm's output is)."""
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    return y
