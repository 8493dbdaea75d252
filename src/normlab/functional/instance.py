"""InstanceNorm: one channel of one sample over its positions."""

from __future__ import annotations

import torch

from normlab import axes as _axes
from normlab.backends import plans
from normlab.checks import (
    check_channel_params,
    check_enough_values,
    check_floating,
    check_min_ndim,
    check_running_stats,
    check_scalar,
    check_scalars,
)
from normlab.functional.statistics import as_param, update_running_stats
from normlab.masks import channel_mask
from normlab.ops import normalize, real_count
from normlab.spec import NormSpec


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Instance normalization of (N, C, *spatial): each channel of each sample over its
    positions. With ``use_input_stats`` the running statistics (if given) are updated with
    the batch average of the per-instance statistics, as torch.

    ``mask`` (bool, (N, *spatial); True = real) or ``lengths`` (for (N, C, L)) restrict each
    instance's statistics to its real positions; padding is normalized with them too."""
    fn = "instance_norm"
    key = None
    untracked = running_mean is None and running_var is None
    if use_input_stats and untracked and mask is None and lengths is None:
        # A signature seen before runs its first call's decision (normlab.backends.plans).
        key = plans.key(fn, input, eps, (weight, bias), type(momentum))
        if key is not None:
            runner = plans.get(key)
            if runner:
                return runner(input, weight, bias, eps)
    check_floating(input, fn=fn)
    check_min_ndim(input, 2, fn=fn, layout="(N, C, *spatial)")
    check_scalars(fn, eps=eps)
    updates = use_input_stats and running_mean is not None  # momentum's range matters
    check_scalar(momentum, fn=fn, argument="momentum", ranged=updates)
    norm_axes = _axes.instance_norm_axes(input.dim())
    num_features = input.shape[1]
    check_channel_params(
        fn,
        num_features,
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
    )
    mask = channel_mask(input, 1, mask, lengths, fn=fn)
    shape = norm_axes.param_shape(input.shape)
    weight, bias = as_param(weight, shape), as_param(bias, shape)

    if not use_input_stats:
        check_running_stats(fn, running_mean, running_var, "when use_input_stats=False")
        y, _, _ = normalize(
            NormSpec.of(norm_axes, stats="given"),
            input,
            weight,
            bias,
            eps,
            mean=as_param(running_mean, shape),
            var=as_param(running_var, shape),
        )
        return y

    spec = NormSpec.of(norm_axes, masked=mask is not None)
    count = real_count(spec, input, mask)
    check_enough_values(
        count, input, fn=fn, per="instance (sample, channel)", masked=mask is not None
    )
    y, mean, var = normalize(
        spec, input, weight, bias, eps, mask=mask, stats=not untracked, plan_key=key
    )
    n = input.shape[0]
    if n and not untracked:
        update_running_stats(
            running_mean,
            running_var,
            mean.reshape(n, num_features),
            var.reshape(n, num_features),
            count,
            momentum,
        )
    return y
