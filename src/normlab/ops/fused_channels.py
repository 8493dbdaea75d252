"""BatchNorm (per-channel statistics over every other axis) as torch custom ops on the Numba
kernels of ``normlab.kernels.cpu.channels`` (CPU) and the Triton kernels of
``normlab.kernels.gpu.channels`` (CUDA; see ``fused_common``): training (batch statistics,
optionally masked) and given statistics (eval). x arrives as a contiguous (A, C, B) view
(channels at axis 1), weight/bias/mean/var as (C,) or None, the mask as uint8 (A, B) or
None."""

import torch

from normlab.kernels import composite
from normlab.ops.fused_common import (
    array,
    backward_op,
    differentiable_backward,
    fake_stats,
    fused_op,
    launch,
    mask_array,
    param,
    stats,
    stats_dtype,
)


def _channels():
    from normlab.kernels.cpu import channels

    return channels


def _apply(x, weight, bias, mean, rstd) -> torch.Tensor:
    """y = (x - mean) * rstd * weight + bias as x * scale + shift, scale and shift in
    float64 (so a large mean cancels exactly)."""
    c = x.shape[1]
    scale = rstd if weight is None else rstd * weight.reshape(c).double()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.reshape(c).double()
    y = torch.empty_like(x)
    launch(_channels().channel_apply, array(x), array(scale), array(shift), array(y))
    return y


def _batch_norm_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var, rstd, count): batch statistics (float64, biased var) over the real
    elements of each channel, and every element normalized with them."""
    c = x.shape[1]
    mean, var, count = stats(c, x), stats(c, x), stats(1, x)
    launch(
        _channels().channel_statistics,
        array(x),
        mask_array(mask),
        array(mean),
        array(var),
        array(count),
    )
    rstd = torch.rsqrt(var + eps)
    return _apply(x, weight, bias, mean, rstd), mean, var, rstd, count


def _batch_norm_given(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) with the given statistics (eval mode), which are constants."""
    mean = mean.to(torch.float64, copy=True)
    rstd = torch.rsqrt(var.double() + eps)
    return _apply(x, weight, bias, mean, rstd), mean, rstd


def _batch_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    mask: torch.Tensor | None,
    count: torch.Tensor,
    stats_given: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = x.shape[1]
    dx, dweight, dbias = torch.empty_like(x), x.new_empty(c), x.new_empty(c)
    launch(
        _channels().channel_backward,
        array(dy),
        array(x),
        array(mean),
        array(rstd),
        param(weight, c, 1.0, x),
        mask_array(mask),
        array(count),
        stats_given,
        array(dx),
        array(dweight),
        array(dbias),
    )
    return dx, dweight, dbias


def _gpu_channels():
    from normlab.kernels.gpu import channels

    return channels


def _cuda_batch_norm_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_batch_norm_train`` on the Triton kernels (float32 statistics and count, as
    ``stats_dtype(x)``)."""
    y, *statistics = _gpu_channels().batch_norm_train(x, weight, bias, eps, mask)
    return y, *(t.to(stats_dtype(x)) for t in statistics)


def _cuda_batch_norm_given(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd = _gpu_channels().batch_norm_given(x, weight, bias, mean, var, eps)
    return y, mean.to(stats_dtype(x)), rstd.to(stats_dtype(x))


def _cuda_batch_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    mask: torch.Tensor | None,
    count: torch.Tensor,
    stats_given: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gpu_channels().batch_norm_backward(dy, x, weight, mean, rstd, mask, count, stats_given)


def _fake_stats(x, n):
    return fake_stats(n, x)


def _fake_train(x, weight, bias, eps, mask):
    c = x.shape[1]
    return (torch.empty_like(x), *(_fake_stats(x, c) for _ in range(3)), _fake_stats(x, 1))


def _fake_given(x, weight, bias, mean, var, eps):
    c = x.shape[1]
    return torch.empty_like(x), _fake_stats(x, c), _fake_stats(x, c)


def _fake_backward(dy, x, weight, mean, rstd, mask, count, stats_given):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c), x.new_empty(c)


batch_norm_backward = backward_op(
    "batch_norm_backward",
    _batch_norm_backward,
    _fake_backward,
    cuda_impl=_cuda_batch_norm_backward,
)


def _composite_forward(eps, mask, mean=None, var=None):
    """The same function in composite form on the (A, C, B) view."""

    def forward(x, weight, bias):
        a, c, b = x.shape
        y, *_ = composite.normalize_forward(
            x,
            None if weight is None else weight.reshape(1, c, 1),
            None if bias is None else bias.reshape(1, c, 1),
            (0, 2),
            eps,
            True,
            None if mean is None else mean.reshape(1, c, 1),
            None if var is None else var.reshape(1, c, 1),
            None if mask is None else mask.bool().reshape(a, 1, b),
        )
        return y

    return forward


def _gradients(ctx, dy, x, weight, bias, mean, rstd, mask, count, stats_given):
    dx, dweight, dbias = batch_norm_backward(
        ctx, dy.contiguous(), x, weight, mean, rstd, mask, count, stats_given
    )
    needs = ctx.needs_input_grad
    return (
        dx if needs[0] else None,
        dweight if weight is not None and needs[1] else None,
        dbias if bias is not None and needs[2] else None,
    )


def _train_setup(ctx, inputs, output):
    x, weight, bias, eps, mask = inputs
    _, mean, _, rstd, count = output
    ctx.save_for_backward(x, weight, bias, mean, rstd, mask, count)
    ctx.eps = eps


def _train_backward(ctx, dy, *_stat_grads):
    x, weight, bias, mean, rstd, mask, count = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        grads = differentiable_backward(
            ctx, dy, _composite_forward(ctx.eps, mask), (x, weight, bias)
        )
        return (*grads, None, None)
    grads = _gradients(ctx, dy, x, weight, bias, mean, rstd, mask, count, False)
    return (*grads, None, None)


def _given_setup(ctx, inputs, output):
    x, weight, bias, mean_in, var_in, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd, mean_in, var_in)
    ctx.eps = eps


def _given_backward(ctx, dy, *_stat_grads):
    x, weight, bias, mean, rstd, mean_in, var_in = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        forward = _composite_forward(ctx.eps, None, mean_in, var_in)
        grads = differentiable_backward(ctx, dy, forward, (x, weight, bias))
        return (*grads, None, None, None)
    count = torch.ones(1, dtype=torch.float64)
    grads = _gradients(ctx, dy, x, weight, bias, mean, rstd, None, count, True)
    return (*grads, None, None, None)


batch_norm_train = fused_op(
    "batch_norm_train",
    _batch_norm_train,
    _fake_train,
    _train_setup,
    _train_backward,
    cuda_impl=_cuda_batch_norm_train,
)
batch_norm_given = fused_op(
    "batch_norm_given",
    _batch_norm_given,
    _fake_given,
    _given_setup,
    _given_backward,
    cuda_impl=_cuda_batch_norm_given,
)
