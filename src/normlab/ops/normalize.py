"""``normalize``: the one differentiable normalization, with an explicit backward.

The backward is the hand-derived one of ``kernels.composite`` (what the fused kernels will
replace), not autograd through the forward's chain of operations. Higher-order gradients
(``create_graph=True``, e.g. a gradient penalty) are still exact: then the backward
differentiates the composite forward again, so double backward works as in torch.nn.
"""

from __future__ import annotations

import torch

from normlab.kernels import composite


def _normalize_graph(x, weight, bias, reduction_dims, eps, center, mean, var, mask):
    """The forward as ordinary autograd-tracked operations (used only for create_graph)."""
    y, *_ = composite.normalize_forward(
        x, weight, bias, reduction_dims, eps, center, mean, var, mask
    )
    return y


class _Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, reduction_dims, eps, center, mean, var, mask):
        stats_given = mean is not None and var is not None
        y, mean, rstd, var = composite.normalize_forward(
            x, weight, bias, reduction_dims, eps, center, mean, var, mask
        )
        ctx.save_for_backward(x, weight, bias, mean, rstd, var if stats_given else None, mask)
        ctx.config = (reduction_dims, eps, center, stats_given)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        if torch.is_grad_enabled():  # create_graph=True
            return _double_differentiable_backward(ctx, dy) + (None,) * 6
        x, weight, bias, mean, rstd, _, mask = ctx.saved_tensors
        reduction_dims, _, center, stats_given = ctx.config
        dx, dweight, dbias = composite.normalize_backward(
            dy,
            x,
            weight,
            bias,
            mean,
            rstd,
            reduction_dims,
            center,
            stats_given,
            ctx.needs_input_grad[:3],
            mask,
        )
        return dx, dweight, dbias, None, None, None, None, None, None


def _double_differentiable_backward(ctx, dy):
    """create_graph=True: differentiate the composite forward so the result has a graph."""
    x, weight, bias, mean, _rstd, given_var, mask = ctx.saved_tensors
    reduction_dims, eps, center, stats_given = ctx.config
    inputs = [
        t for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3], strict=True) if need
    ]
    with torch.enable_grad():
        y = _normalize_graph(
            x,
            weight,
            bias,
            reduction_dims,
            eps,
            center,
            mean if stats_given else None,
            given_var,
            mask,
        )
        grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:3])


def normalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    reduction_dims: tuple[int, ...],
    eps: float,
    *,
    center: bool = True,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
):
    """y = weight * (x - mean) / sqrt(var + eps) + bias over ``reduction_dims``.

    ``weight`` and ``bias`` must already broadcast against ``x``. With ``mean`` and ``var``
    given (keepdim shape) they are used as constants; otherwise they are computed from ``x``
    (``center=False``: mean 0, RMSNorm), over the elements where ``mask`` (bool,
    broadcastable to x) is True when it is given. Every element is normalized. Returns
    ``(y, mean, var)``, the statistics in the accumulation dtype and without gradient.
    """
    return _Normalize.apply(
        x, weight, bias, tuple(reduction_dims), float(eps), center, mean, var, mask
    )


def add_normalize(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    reduction_dims: tuple[int, ...],
    eps: float,
    *,
    center: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalize(x + residual), x + residual): the pre-norm residual block's fused step."""
    total = x + residual
    y, _, _ = normalize(total, weight, bias, reduction_dims, eps, center=center)
    return y, total
