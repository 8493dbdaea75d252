"""Masked BatchNorm written with plain torch operations: what a user without normlab would
write, the baselines for the padded BatchNorm cases (torch has no masked BatchNorm).

Both take (N, C, L) with ``channel_dim=1`` or (B, L, C) with ``channel_dim=-1``, build the
mask from ``lengths`` (True = real position), compute the mean and the two-pass biased
variance over the real positions, normalize every position, apply weight and bias, and
update the running statistics (unbiased variance) as torch does. Autograd differentiates
them. The bench times both and calls the faster one "plain torch masked".
"""

from __future__ import annotations

import torch


def _real_positions(x: torch.Tensor, lengths: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(B, L) bool: True where the position is within its sample's length."""
    length = x.shape[2] if channel_dim == 1 else x.shape[1]
    return torch.arange(length, device=x.device) < lengths[:, None]


def _per_channel(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """A (C,) tensor shaped to broadcast along x's channel axis."""
    return t[:, None] if channel_dim == 1 else t


@torch.no_grad()
def _update_running(running_mean, running_var, mean, var, count, momentum) -> None:
    running_mean.lerp_(mean, momentum)
    running_var.lerp_(var * (count / (count - 1)), momentum)


def masked_batch_norm_multiply(
    x, lengths, weight, bias, running_mean, running_var, channel_dim, momentum=0.1, eps=1e-5
):
    """Masked sums as elementwise products with the mask as a float multiplier."""
    real = _real_positions(x, lengths, channel_dim)
    count = real.sum()
    multiplier = real.to(x.dtype)
    multiplier = multiplier[:, None, :] if channel_dim == 1 else multiplier[:, :, None]
    dims = (0, 2) if channel_dim == 1 else (0, 1)
    mean = (x * multiplier).sum(dims) / count
    centered = x - _per_channel(mean, channel_dim)
    var = (centered.square() * multiplier).sum(dims) / count
    scale = torch.rsqrt(var + eps) * weight
    y = centered * _per_channel(scale, channel_dim) + _per_channel(bias, channel_dim)
    _update_running(running_mean, running_var, mean, var, count, momentum)
    return y


def masked_batch_norm_matmul(
    x, lengths, weight, bias, running_mean, running_var, channel_dim, momentum=0.1, eps=1e-5
):
    """Masked sums as matrix-vector products (mask weights times the positions), which
    read x once without an x-sized temporary."""
    real = _real_positions(x, lengths, channel_dim).to(x.dtype)
    count = real.sum()
    if channel_dim == 1:
        mean = torch.einsum("bcl,bl->c", x, real) / count
        centered = x - mean[:, None]
        var = torch.einsum("bcl,bl->c", centered.square(), real) / count
    else:
        flat = x.reshape(-1, x.shape[-1])
        weights = real.reshape(-1)
        mean = (weights @ flat) / count
        centered = x - mean
        var = (weights @ centered.reshape(-1, x.shape[-1]).square()) / count
    scale = torch.rsqrt(var + eps) * weight
    y = centered * _per_channel(scale, channel_dim) + _per_channel(bias, channel_dim)
    _update_running(running_mean, running_var, mean, var, count, momentum)
    return y


VARIANTS = {
    "multiply": masked_batch_norm_multiply,
    "matmul": masked_batch_norm_matmul,
}
