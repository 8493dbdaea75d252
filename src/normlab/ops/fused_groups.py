"""GroupNorm / InstanceNorm (InstanceNorm = one channel per group) as torch custom ops on
the Numba kernels of ``normlab.kernels.cpu.groups`` (CPU) and the Triton kernels of
``normlab.kernels.gpu.groups`` (CUDA; see ``fused_common``). x arrives as a contiguous (N, C, S)
view, weight and bias as (C,) or None, the mask as uint8 (N, S) or None."""

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


def _groups():
    from normlab.kernels.cpu import groups

    return groups


def _group_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: int,
    eps: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var, rstd), statistics (N, groups) in float64 over real positions."""
    n, c, _ = x.shape
    y = torch.empty_like(x)
    mean, var, rstd = (stats((n, groups), x) for _ in range(3))
    launch(
        _groups().group_norm_forward,
        array(x),
        param(weight, c, 1.0, x),
        param(bias, c, 0.0, x),
        groups,
        eps,
        mask_array(mask),
        array(y),
        array(mean),
        array(var),
        array(rstd),
    )
    return y, mean, var, rstd


def _group_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = x.shape[1]
    dx, dweight, dbias = torch.empty_like(x), x.new_empty(c), x.new_empty(c)
    launch(
        _groups().group_norm_backward,
        array(dy),
        array(x),
        param(weight, c, 1.0, x),
        array(mean),
        array(rstd),
        groups,
        mask_array(mask),
        array(dx),
        array(dweight),
        array(dbias),
    )
    return dx, dweight, dbias


def _gpu_groups():
    from normlab.kernels.gpu import groups

    return groups


def _cuda_group_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: int,
    eps: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_group_norm`` on the Triton kernel (float32 statistics, as ``stats_dtype(x)``)."""
    y, *statistics = _gpu_groups().group_norm_forward(x, weight, bias, groups, eps, mask)
    return y, *(t.to(stats_dtype(x)) for t in statistics)


def _cuda_group_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gpu_groups().group_norm_backward(dy, x, weight, mean, rstd, groups, mask)


def _fake_group_norm(x, weight, bias, groups, eps, mask):
    shape = (x.shape[0], groups)
    return (torch.empty_like(x), *(fake_stats(shape, x) for _ in range(3)))


def _fake_backward(dy, x, weight, mean, rstd, groups, mask):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c), x.new_empty(c)


group_norm_backward = backward_op(
    "group_norm_backward",
    _group_norm_backward,
    _fake_backward,
    cuda_impl=_cuda_group_norm_backward,
)


def _composite_forward(groups, eps, mask):
    """The same function in composite form, on the grouped view (N, G, C/G, S)."""

    def forward(x, weight, bias):
        n, c, s = x.shape
        grouped = (n, groups, c // groups, s)
        params = (1, groups, c // groups, 1)
        m = None if mask is None else mask.bool().reshape(n, 1, 1, s)
        y, *_ = composite.normalize_forward(
            x.reshape(grouped),
            None if weight is None else weight.reshape(params),
            None if bias is None else bias.reshape(params),
            (2, 3),
            eps,
            True,
            mask=m,
        )
        return y.reshape(x.shape)

    return forward


def _setup(ctx, inputs, output):
    x, weight, bias, groups, eps, mask = inputs
    _, mean, _, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd, mask)
    ctx.groups, ctx.eps = groups, eps


def _backward(ctx, dy, _dmean, _dvar, _drstd):
    x, weight, bias, mean, rstd, mask = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        forward = _composite_forward(ctx.groups, ctx.eps, mask)
        grads = differentiable_backward(ctx, dy, forward, (x, weight, bias))
        return (*grads, None, None, None)
    dx, dweight, dbias = group_norm_backward(
        ctx, dy.contiguous(), x, weight, mean, rstd, ctx.groups, mask
    )
    needs = ctx.needs_input_grad
    return (
        dx if needs[0] else None,
        dweight if weight is not None and needs[1] else None,
        dbias if bias is not None and needs[2] else None,
        None,
        None,
        None,
    )


group_norm = fused_op(
    "group_norm", _group_norm, _fake_group_norm, _setup, _backward, cuda_impl=_cuda_group_norm
)
