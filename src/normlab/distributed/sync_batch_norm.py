"""``sync_batch_norm``: BatchNorm whose statistics are those of the union of all ranks' real
elements, with one collective in the forward and one in the backward.

Forward: each rank computes per channel (real count, mean, centred sum of squares M2) of its
real elements; one all_gather brings every rank's triple; Chan's parallel formula merges
them exactly and stably (no E[x^2] - E[x]^2):

    N = sum_r n_r        mean = sum_r n_r mean_r / N
    M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2

Ranks with an empty or fully padded batch contribute n_r = 0 and still join. Backward: the
two per-channel sums of the BatchNorm gradient, sum(g) and sum(g * xhat), are all-reduced in
one collective; dx then equals the single-process gradient on the concatenated batch.
Weight and bias gradients stay local (DistributedDataParallel reduces them).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from normlab.functional.statistics import (
    as_param,
    prepare_channel_norm,
    update_running_stats,
)
from normlab.kernels import composite


def merge_moments(counts, means, m2s):
    """Merge per-rank (count, mean, M2), each (world, C), into the global (count, mean, biased
    variance), each (C,). Empty ranks (count 0) contribute nothing."""
    total = counts.sum(0)
    safe_total = total.clamp_min(1)
    mean = (counts * means).sum(0) / safe_total
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return total, mean, m2 / safe_total


def _local_moments(x, reduction_dims, mask, num_features):
    """(count, mean, M2) per channel of this rank's real elements, float64, each (C,)."""
    xf = x.to(torch.float64)
    count = composite.reduced_count(x.shape, reduction_dims, mask, torch.float64)
    count = torch.as_tensor(count, dtype=torch.float64, device=x.device)

    def real_sum(t):  # select, not multiply: NaN/Inf in padding must not leak in
        real = t if mask is None else torch.where(mask, t, 0)
        return real.sum(dim=reduction_dims, keepdim=True)

    mean = real_sum(xf) / count.clamp_min(1)
    m2 = real_sum((xf - mean).square())
    return (
        torch.broadcast_to(count, mean.shape).reshape(num_features),
        mean.reshape(num_features),
        m2.reshape(num_features),
    )


class _SyncNormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mask, reduction_dims, eps, group, stat_shape, fn):
        num_features = math.prod(stat_shape)  # stat_shape is 1 but at the channel axis
        local = torch.stack(_local_moments(x, reduction_dims, mask, num_features))  # (3, C)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        counts, means, m2s = torch.stack(gathered).unbind(1)
        total, mean, var = merge_moments(counts, means, m2s)
        fewest = int(total.min()) if total.numel() else 0
        # Every rank sees the same global count, so every rank raises (no hang). As in
        # BatchNorm: one value is an error; an all-empty unmasked batch is not (its output
        # is empty); with a mask every channel needs 2 real values.
        if fewest == 1 or (mask is not None and fewest < 2):
            raise ValueError(
                f"{fn}: expected more than 1 value per channel when training, got "
                f"{fewest} real value(s) in some channel over all ranks (this "
                f"rank's input size {list(x.shape)})"
            )
        acc = composite.accumulation_dtype(x.dtype)
        mean, var = mean.to(acc).reshape(stat_shape), var.to(acc).reshape(stat_shape)
        y, mean, rstd, var = composite.normalize_forward(
            x, weight, bias, reduction_dims, eps, True, mean, var
        )
        total = total.to(acc).reshape(stat_shape)
        ctx.save_for_backward(x, weight, bias, mean, rstd, mask, total)
        ctx.config = (reduction_dims, group)
        ctx.mark_non_differentiable(mean, var, total)
        return y, mean, var, total

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dtotal):
        x, weight, bias, mean, rstd, mask, total = ctx.saved_tensors
        reduction_dims, group = ctx.config
        acc = composite.accumulation_dtype(x.dtype)
        dyf = dy.to(acc)
        xhat = (x.to(acc) - mean) * rstd
        g = dyf if weight is None else dyf * weight.to(acc)
        dx = None
        if ctx.needs_input_grad[0]:
            sum_g, sum_g_xhat = composite.gradient_sums(g, xhat, reduction_dims, mask)
            sums = torch.cat([sum_g.reshape(-1), sum_g_xhat.reshape(-1)])
            dist.all_reduce(sums, group=group)  # one collective for both sums
            sum_g, sum_g_xhat = (s.reshape(mean.shape) for s in sums.chunk(2))
            dx = composite.input_gradient(g, xhat, rstd, sum_g, sum_g_xhat, total, mask, True)
            dx = dx.to(x.dtype)
        dweight, dbias = composite.affine_backward(
            dyf, xhat, weight, bias, mask, ctx.needs_input_grad[:3]
        )
        return dx, dweight, dbias, None, None, None, None, None, None


def sync_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    dim: int = 1,
    *,
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    process_group=None,
) -> torch.Tensor:
    """Training-mode BatchNorm with statistics synchronized over ``process_group`` (default:
    the world). Every rank must call it, also with an empty or fully padded batch. The
    running statistics (if given) become identical on every rank: those of single-process
    BatchNorm on the concatenation of all ranks' real elements."""
    fn = "sync_batch_norm"
    norm_axes, mask = prepare_channel_norm(
        fn,
        input,
        dim,
        mask,
        lengths,
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
    )
    channel = norm_axes.feature[0]
    num_features = input.shape[channel]
    param_shape = norm_axes.param_shape(input.shape)
    stat_shape = tuple(1 if d != channel else num_features for d in range(input.dim()))
    y, mean, var, total = _SyncNormalize.apply(
        input,
        as_param(weight, param_shape),
        as_param(bias, param_shape),
        mask,
        norm_axes.reduction,
        float(eps),
        process_group,
        stat_shape,
        fn,
    )
    if int(total.min()) >= 2:  # an all-empty global batch carries no statistics
        update_running_stats(
            running_mean,
            running_var,
            mean.reshape(1, -1),
            var.reshape(1, -1),
            total.reshape(1, -1),
            momentum,
        )
    return y
