"""``normalize``: the one differentiable normalization, with an explicit backward.

The backward is the hand-derived one of ``kernels.composite`` (what the fused kernels will
replace), not autograd through the forward's chain of operations. Higher-order gradients
(``create_graph=True``, e.g. a gradient penalty) are still exact: then the backward
differentiates the composite forward again, so double backward works as in torch.nn.
"""

from __future__ import annotations

import torch

from normlab.kernels import composite
from normlab.ops import dispatch, fused_channels, fused_groups, fused_rows


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
        mean = mean.to(var.dtype)  # the float64 mean stays for the backward only
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

    Runs a fused Numba kernel where one takes the call (``normlab.ops.dispatch``), else the
    composite backend; ``normlab.backends`` chooses and reports which.
    """
    reduction_dims = tuple(reduction_dims)
    plan = dispatch.choose(x, weight, bias, reduction_dims, center, mean, var, mask)
    if plan is not None:
        return _fused(plan, x, weight, bias, reduction_dims, float(eps), center, mean, var, mask)
    return _Normalize.apply(x, weight, bias, reduction_dims, float(eps), center, mean, var, mask)


def _flat(t):
    return None if t is None else t.reshape(-1)


def _fused(plan, x, weight, bias, reduction_dims, eps, center, mean, var, mask):
    """Run ``plan`` on the Numba custom ops; returns what ``normalize`` returns."""
    acc = composite.accumulation_dtype(x.dtype)
    keep = [1 if d in reduction_dims else n for d, n in enumerate(x.shape)]
    view = x.reshape(plan.view)
    w, b = _flat(weight), _flat(bias)
    if plan.layout == "rows":
        y, mean, rstd = fused_rows.row_norm(view, w, b, eps, center)
        var = rstd.pow(-2) - eps  # for the record only: no caller of a rows plan uses it
    elif plan.layout == "groups":
        m = plan.kernel_mask(x, mask)
        y, mean, var, _ = fused_groups.group_norm(view, w, b, plan.groups, eps, m)
    elif mean is not None:
        y, _, _ = fused_channels.batch_norm_given(view, w, b, _flat(mean), _flat(var), eps)
        return y.reshape(x.shape), mean.to(acc), var.to(acc)
    else:
        m = plan.kernel_mask(x, mask)
        y, mean, var, _, _ = fused_channels.batch_norm_train(view, w, b, eps, m)
    return y.reshape(x.shape), mean.reshape(keep).to(acc), var.reshape(keep).to(acc)


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
    """(normalize(x + residual), x + residual): the pre-norm residual block's fused step,
    one Numba kernel where the rows kernel takes the call."""
    reduction_dims = tuple(reduction_dims)
    plan = dispatch.choose_add(x, residual, weight, bias, reduction_dims, center)
    if plan is not None:
        y, total, _, _ = fused_rows.add_row_norm(
            x.reshape(plan.view),
            residual.reshape(plan.view),
            _flat(weight),
            _flat(bias),
            float(eps),
            center,
        )
        return y.reshape(x.shape), total.reshape(x.shape)
    total = x + residual
    y, _, _ = normalize(total, weight, bias, reduction_dims, eps, center=center)
    return y, total
