"""``power_norm_approx``: PowerNorm after warmup, with the paper's approximate backward.

The backward updates the running gradient statistic ``nu`` in place (Algorithm 1 of Shen et
al. 2020); it is not the exact gradient of the forward, so it is first-order only.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from normlab.kernels import power_norm as kernel


class _PowerNormApprox(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, phi, nu, reduction_dims, eps, alpha_bkw, mask):
        ctx.save_for_backward(x, weight, bias, phi, mask)
        ctx.nu = nu  # the buffer the backward updates
        ctx.config = (reduction_dims, eps, alpha_bkw)
        return kernel.power_norm_forward(x, weight, bias, phi, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, phi, mask = ctx.saved_tensors
        reduction_dims, eps, alpha_bkw = ctx.config
        nu = ctx.nu
        dx, dweight, dbias, new_nu = kernel.power_norm_backward(
            dy,
            x,
            weight,
            bias,
            phi,
            nu.reshape(phi.shape),
            reduction_dims,
            eps,
            alpha_bkw,
            mask,
            ctx.needs_input_grad[:3],
        )
        with torch.no_grad():
            nu.copy_(new_nu.reshape(nu.shape))
        return dx, dweight, dbias, None, None, None, None, None, None


def power_norm_approx(x, weight, bias, phi, nu, reduction_dims, eps, alpha_bkw, mask=None):
    """y = weight * x / sqrt(phi + eps) + bias with PowerNorm's approximate backward.

    ``weight``, ``bias``, ``phi`` broadcast against x; ``nu`` is the running gradient
    statistic buffer (one value per channel), updated in place by the backward."""
    return _PowerNormApprox.apply(
        x, weight, bias, phi, nu, tuple(reduction_dims), float(eps), float(alpha_bkw), mask
    )
