"""The composite family's normalization: plain torch operations with the hand-derived backward
of ``normlab.kernels.composite`` (not autograd through the forward's chain of operations).

Higher-order gradients (``create_graph=True``, e.g. a gradient penalty) are still exact: the
backward then differentiates the composite forward (``kernel_ops.double_backward``, the one
double-backward path of every family).

A call with a statistics hook (``call.sync``: SyncBatchNorm's, ``normlab.distributed``) takes
its batch statistics from the hook (every rank's real elements) and has the hook sum the
backward's two reductions over the ranks; it is first-order only, as torch's SyncBatchNorm.
"""

from __future__ import annotations

import torch

from normlab.kernels import composite
from normlab.ops.kernel_ops import double_backward


class _Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, reduction_dims, eps, center, mean, var, mask, sync):
        stats_given = mean is not None and var is not None
        if sync is not None:  # the statistics of every rank's real elements
            mean, var = sync.statistics(x, reduction_dims, mask)
        y, mean, rstd, var = composite.normalize_forward(
            x, weight, bias, reduction_dims, eps, center, mean, var, mask
        )
        ctx.save_for_backward(x, weight, bias, mean, rstd, var if stats_given else None, mask)
        ctx.config = (reduction_dims, eps, center, stats_given, sync)
        mean = mean.to(var.dtype)  # the float64 mean stays for the backward only
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, bias, mean, rstd, given_var, mask = ctx.saved_tensors
        reduction_dims, eps, center, stats_given, sync = ctx.config
        if torch.is_grad_enabled() and sync is None:  # create_graph=True
            given = (mean, given_var) if stats_given else (None, None)

            def forward(x, weight, bias):
                args = (reduction_dims, eps, center, *given, mask)
                return composite.normalize_forward(x, weight, bias, *args)[0]

            return double_backward(ctx, dy, forward, (x, weight, bias)) + (None,) * 7
        needs = ctx.needs_input_grad[:3]
        dx, dweight, dbias = composite.normalize_backward(
            dy, x, weight, bias, mean, rstd, reduction_dims, center, stats_given, needs, mask, sync
        )
        return dx, dweight, dbias, *(None,) * 7


def forward(call):
    """(y, mean, var) of a ``normlab.backends.registry.Call`` in the composite family."""
    spec = call.spec
    x, eps = call.x, float(call.eps)
    return _Normalize.apply(
        x, call.weight, call.bias, spec.reduction, eps, spec.center, call.mean, call.var,
        call.mask, call.sync,
    )  # fmt: skip
