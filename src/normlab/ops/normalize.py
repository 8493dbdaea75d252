"""``normalize`` and ``add_normalize``: the one differentiable normalization of every norm.

The functional layer builds a ``normlab.spec.NormSpec`` and calls these with it; the
backend registry (``normlab.backends.registry``) decides once which family runs the call.
"""

from __future__ import annotations

import torch

from normlab.backends import registry
from normlab.kernels import composite
from normlab.spec import NormSpec


def normalize(
    spec: NormSpec,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    sync=None,
    stats: bool = True,
    plan_key=None,
):
    """y = weight * (x - mean) / sqrt(var + eps) + bias over ``spec.reduction``.

    ``weight`` and ``bias`` must already broadcast against ``x``. With ``mean`` and ``var``
    given (keepdim shape, ``spec.stats == "given"``) they are used as constants; otherwise
    they are computed from ``x`` (``spec.center=False``: mean 0, RMSNorm), over the
    elements where ``mask`` (bool, broadcastable to x) is True when it is given. Every
    element is normalized. Returns ``(y, mean, var)``, the statistics in the accumulation
    dtype and without gradient. ``normlab.backends`` chooses and reports the backend.
    ``sync``: a statistics hook (``normlab.distributed.sync_batch_norm.SyncStatistics``)
    that computes the batch statistics over every rank's real elements. ``stats=False``: the
    caller discards the statistics, which may then be None. ``plan_key``: the call's
    ``normlab.backends.plans.key``, under which the decision is remembered."""
    call = registry.Call(spec, x, weight, bias, eps, mean, var, mask, sync=sync, stats=stats)
    return registry.run(call, plan_key)


def add_normalize(
    spec: NormSpec,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalize(x + residual), x + residual): the pre-norm residual block's fused step,
    one kernel where the rows kernels take the call."""
    return registry.run_add(registry.Call(spec, x, weight, bias, eps, residual=residual))


def statistics(spec: NormSpec, x: torch.Tensor, mask: torch.Tensor | None = None):
    """(mean, var) of ``x`` under ``spec`` (keepdim, the accumulation dtype), without
    normalizing: batch renormalization's correction and PowerNorm's batch quadratic mean
    need them before (or besides) the normalization."""
    return composite.statistics(x, spec.reduction, spec.center, mask)


def real_count(spec: NormSpec, x: torch.Tensor, mask: torch.Tensor | None):
    """Elements per statistic: an int without a mask, a (keepdim) tensor with one."""
    if mask is None:
        return spec.reduced_count(x.shape)
    return composite.mask_count(mask, x.shape, spec.reduction)
