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

Both collectives are a statistics hook (``SyncStatistics``) of the one normalization
(``normlab.ops.normalize(..., sync=hook)``): the rest is BatchNorm's common path.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from normlab.functional.statistics import (
    as_param,
    prepare_batch_norm,
    update_running_stats,
)
from normlab.ops import normalize
from normlab.spec import NormSpec


def merge_moments(counts, means, m2s):
    """Merge per-rank (count, mean, M2), each (world, C), into the global (count, mean, biased
    variance), each (C,). Empty ranks (count 0) contribute nothing."""
    total = counts.sum(0)
    safe_total = total.clamp_min(1)
    mean = (counts * means).sum(0) / safe_total
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return total, mean, m2 / safe_total


def _local_moments(x, reduction_dims, mask):
    """(count, mean, M2) per channel of this rank's real elements, float64, each (C,)."""
    xf = x.to(torch.float64)
    if mask is None:
        count = math.prod([x.shape[d] for d in reduction_dims])
        count = torch.tensor(count, dtype=torch.float64, device=x.device)
    else:
        full = [n if d in reduction_dims else mask.shape[d] for d, n in enumerate(x.shape)]
        count = torch.broadcast_to(mask, full).sum(dim=reduction_dims, keepdim=True).double()

    def real_sum(t):  # select, not multiply: NaN/Inf in padding must not leak in
        real = t if mask is None else torch.where(mask, t, 0)
        return real.sum(dim=reduction_dims, keepdim=True)

    mean = real_sum(xf) / count.clamp_min(1)
    m2 = real_sum((xf - mean).square())
    return torch.broadcast_to(count, mean.shape).reshape(-1), mean.reshape(-1), m2.reshape(-1)


class SyncStatistics:
    """SyncBatchNorm's statistics hook: ``statistics`` gathers every rank's (count, mean, M2)
    in one all_gather and merges them (the global count stays in ``count``);
    ``all_reduce`` sums the backward's two reductions over the ranks in one all_reduce."""

    def __init__(self, group, fn: str):
        self.group, self.fn = group, fn
        self.count = None

    def statistics(self, x, reduction_dims, mask):
        """(mean, biased var) of every rank's real elements, keepdim, in the accumulation
        dtype."""
        local = torch.stack(_local_moments(x, reduction_dims, mask))  # (3, C)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, local, group=self.group)
        counts, means, m2s = torch.stack(gathered).unbind(1)
        total, mean, var = merge_moments(counts, means, m2s)
        fewest = int(total.min()) if total.numel() else 0
        # Every rank sees the same global count, so every rank raises (no hang). As in
        # BatchNorm: one value is an error; an all-empty unmasked batch is not (its output
        # is empty); with a mask every channel needs 2 real values.
        if fewest == 1 or (mask is not None and fewest < 2):
            raise ValueError(
                f"{self.fn}: expected more than 1 value per channel when training, got "
                f"{fewest} real value(s) in some channel over all ranks (this "
                f"rank's input size {list(x.shape)})"
            )
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        shape = [1 if d in reduction_dims else n for d, n in enumerate(x.shape)]
        self.count = total.to(acc).reshape(shape)
        return mean.to(acc).reshape(shape), var.to(acc).reshape(shape)

    def all_reduce(self, sum_g, sum_g_xhat):
        sums = torch.cat([sum_g.reshape(-1), sum_g_xhat.reshape(-1)])
        dist.all_reduce(sums, group=self.group)  # one collective for both sums
        return tuple(s.reshape(sum_g.shape) for s in sums.chunk(2))


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
    norm_axes, mask = prepare_batch_norm(
        fn, input, dim, mask, lengths, running_mean, running_var, weight, bias
    )
    param_shape = norm_axes.param_shape(input.shape)
    sync = SyncStatistics(process_group, fn)
    y, mean, var = normalize(
        NormSpec.of(norm_axes, masked=mask is not None),
        input,
        as_param(weight, param_shape),
        as_param(bias, param_shape),
        eps,
        mask=mask,
        sync=sync,
    )
    total = sync.count
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
