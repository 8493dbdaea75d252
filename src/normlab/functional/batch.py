"""BatchNorm (masked, ghost) and Batch Renormalization: one channel over all samples."""

from __future__ import annotations

import torch

from normlab import axes as _axes
from normlab.backends import plans
from normlab.checks import (
    check_enough_values,
    check_renorm_limits,
    check_running_stats,
    check_scalar,
    check_scalars,
    check_training_eps,
    check_virtual_batch,
)
from normlab.functional.statistics import as_param, prepare_batch_norm, update_running_stats
from normlab.ops import normalize, real_count, statistics
from normlab.spec import NormSpec


def _eval(fn, input, norm_axes, running_mean, running_var, weight, bias, eps, flag, key=None):
    check_running_stats(fn, running_mean, running_var, f"when {flag}")
    shape = norm_axes.param_shape(input.shape)
    y, _, _ = normalize(
        NormSpec.of(norm_axes, stats="given"),
        input,
        as_param(weight, shape),
        as_param(bias, shape),
        eps,
        mean=as_param(running_mean, shape),
        var=as_param(running_var, shape),
        stats=False,
        plan_key=key,
    )
    return y


def _virtual_batches(input, mask, norm_axes, virtual_batch_size, fn):
    """Ghost BatchNorm: view (B, ...) as (B // v, v, ...) and keep axis 0 (the virtual batch)
    out of the reduction, so each virtual batch has its own statistics."""
    if virtual_batch_size is None:
        return input, mask, norm_axes
    channel = norm_axes.feature[0]
    check_virtual_batch(fn, input, channel, virtual_batch_size)
    groups = input.shape[0] // virtual_batch_size
    x = input.reshape(groups, virtual_batch_size, *input.shape[1:])
    if mask is not None:
        mask = (
            mask.unsqueeze(0)
            if mask.shape[0] == 1
            else mask.reshape(groups, virtual_batch_size, *mask.shape[1:])
        )
    reduction = tuple(d for d in range(x.dim()) if d not in (0, channel + 1))
    return x, mask, _axes.NormAxes(x.dim(), reduction=reduction, feature=(0, channel + 1))


def _batch_statistics_norm(
    fn, input, norm_axes, mask, weight, bias, eps, virtual_batch_size, affine=None
):
    """Normalize with batch statistics. Returns (y, mean (K, C), var (K, C), count) where K is
    the number of virtual batches (1 without ghost batches). ``affine`` maps the batch
    statistics to the (weight, bias) to apply, for batch renormalization."""
    x, m, axes = _virtual_batches(input, mask, norm_axes, virtual_batch_size, fn)
    spec = NormSpec.of(axes, masked=m is not None)
    count = real_count(spec, x, m)
    check_enough_values(count, input, fn=fn, per="channel", masked=m is not None)
    channel = norm_axes.feature[0]
    param_shape = [1] * x.dim()
    param_shape[axes.feature[-1]] = input.shape[channel]
    weight, bias = as_param(weight, param_shape), as_param(bias, param_shape)
    if affine is not None:
        with torch.no_grad():
            mean, var = statistics(spec, x, m)
        weight, bias = affine(mean, var, weight, bias)
    y, mean, var = normalize(spec, x, weight, bias, eps, mask=m)
    groups = x.shape[0] if virtual_batch_size is not None else 1
    channels = input.shape[channel]  # not -1: an empty batch has 0 virtual batches
    return (
        y.reshape(input.shape),
        mean.reshape(groups, channels),
        var.reshape(groups, channels),
        count,
    )


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
    *,
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    virtual_batch_size: int | None = None,
) -> torch.Tensor:
    """Batch normalization of the channel axis ``dim`` (default 1, as torch; ``dim=-1`` for
    ``(batch, length, features)``).

    In training the batch statistics normalize the input and, when given, update
    ``running_mean``/``running_var`` in place with factor ``momentum`` (variance unbiased).
    Otherwise the running statistics are used.

    ``mask`` (bool, the input's shape without the channel axis; True = real) or ``lengths``
    restrict the statistics to real elements; every element, padding included, is normalized
    with them. ``virtual_batch_size`` (ghost BatchNorm) splits the batch axis 0 into virtual
    batches with their own statistics; the running statistics are updated with their average.
    """
    fn = "batch_norm"
    key = None
    if not training and mask is None and lengths is None and virtual_batch_size is None:
        # Eval with running statistics: a signature seen before runs the runner its first
        # call's decision left (normlab.backends.plans).
        stats = (weight, bias, running_mean, running_var)
        key = plans.key(fn, input, eps, stats, dim, type(momentum))
        if key is not None:
            runner = plans.get(key)
            if runner:
                return runner(input, weight, bias, eps, running_mean, running_var)
    norm_axes, mask = prepare_batch_norm(
        fn, input, dim, mask, lengths, running_mean, running_var, weight, bias
    )
    check_scalars(fn, eps=eps)
    # momentum's range matters only where it updates running statistics (torch ignores it)
    updates = training and running_mean is not None
    check_scalar(momentum, fn=fn, argument="momentum", ranged=updates)
    if not training:
        flag = "training=False"
        return _eval(fn, input, norm_axes, running_mean, running_var, weight, bias, eps, flag, key)
    check_training_eps(fn, eps)
    y, mean, var, count = _batch_statistics_norm(
        fn, input, norm_axes, mask, weight, bias, eps, virtual_batch_size
    )
    update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y


def batch_renorm(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    dim: int = 1,
    *,
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Batch Renormalization (Ioffe, NeurIPS 2017, arXiv:1702.03275).

    In training, with the batch statistics :math:`\mu_B, \sigma_B = \sqrt{\sigma^2_B+\epsilon}`
    and the running ones :math:`\mu, \sigma = \sqrt{\mathrm{running\_var}+\epsilon}`:

    .. math::
        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}(\sigma_B / \sigma), \quad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}((\mu_B - \mu) / \sigma)

        y = \gamma \left(\frac{x - \mu_B}{\sigma_B}\, r + d\right) + \beta

    r and d are constants for the gradient (as in the paper), so the output in training is
    that of inference up to the clipping. The running statistics update as in
    :func:`batch_norm` (afterwards). ``r_max=1, d_max=0`` is BatchNorm. In eval the running
    statistics are used. ``mask``/``lengths`` as in :func:`batch_norm`.
    """
    fn = "batch_renorm"
    norm_axes, mask = prepare_batch_norm(
        fn, input, dim, mask, lengths, running_mean, running_var, weight, bias
    )
    check_scalars(fn, eps=eps, r_max=r_max, d_max=d_max)
    check_scalar(momentum, fn=fn, argument="momentum", ranged=training)
    check_running_stats(fn, running_mean, running_var, "(the correction r, d is relative to them)")
    check_renorm_limits(fn, r_max, d_max)
    if not training:
        flag = "training=False"
        return _eval(fn, input, norm_axes, running_mean, running_var, weight, bias, eps, flag)
    check_training_eps(fn, eps)

    def renorm_affine(mean, var, weight, bias):
        if input.numel() == 0:  # an empty batch has no statistics to correct (r=1, d=0)
            return weight, bias
        shape = mean.shape
        running_std = (running_var.to(var.dtype).reshape(shape) + eps).sqrt()
        r = ((var + eps).sqrt() / running_std).clamp(1.0 / r_max, r_max)
        d = ((mean - running_mean.to(mean.dtype).reshape(shape)) / running_std).clamp(-d_max, d_max)
        new_weight = r if weight is None else weight * r
        new_bias = d if weight is None else weight * d
        return new_weight, new_bias if bias is None else new_bias + bias

    y, mean, var, count = _batch_statistics_norm(
        fn, input, norm_axes, mask, weight, bias, eps, None, affine=renorm_affine
    )
    update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y
