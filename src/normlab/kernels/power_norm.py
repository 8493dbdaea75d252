"""PowerNorm after warmup in plain torch operations: the forward divides by the *running*
quadratic mean, the backward is the paper's approximate backpropagation.

Shen et al., "PowerNorm: Rethinking Batch Normalization in Transformers", ICML 2020,
Algorithm 1. With psi^2 the running quadratic mean (before this step's update), nu the
running gradient statistic, alpha = alpha_bkw and g = weight * dy:

    xhat  = x / sqrt(psi^2 + eps)              y = weight * xhat + bias
    dx    = (g - m * nu * xhat) / sqrt(psi^2 + eps)      (m = 1 at real elements, else 0)
    nu'   = nu * (1 - (1 - alpha) * Gamma) + (1 - alpha) * Lambda
    Gamma = mean over real elements of xhat^2,  Lambda = mean over real elements of g * xhat
"""

from __future__ import annotations

import math

import torch

from normlab.kernels.composite import accumulation_dtype, affine_backward, mask_count


def power_norm_forward(x, weight, bias, phi, eps):
    """y = weight * x / sqrt(phi + eps) + bias, ``phi`` broadcastable (keepdim)."""
    acc = accumulation_dtype(x.dtype)
    y = x.to(acc) * torch.rsqrt(phi.to(acc) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def power_norm_backward(
    dy, x, weight, bias, phi, nu, reduction_dims, eps, alpha_bkw, mask, needs=(True, True, True)
):
    """Returns (dx, dweight, dbias, new_nu); ``nu`` and ``new_nu`` broadcast like ``phi``."""
    acc = accumulation_dtype(x.dtype)
    dyf = dy.to(acc)
    rstd = torch.rsqrt(phi.to(acc) + eps)
    xhat = x.to(acc) * rstd
    g = dyf if weight is None else dyf * weight.to(acc)
    nu = nu.to(acc)

    if mask is None:
        count = math.prod([x.shape[d] for d in reduction_dims])
    else:
        count = mask_count(mask, x.shape, reduction_dims).to(acc)

    def real_mean(t):  # select, not multiply: NaN/Inf in padding must not leak in
        real = t if mask is None else torch.where(mask, t, 0)
        return real.sum(dim=reduction_dims, keepdim=True) / count

    gamma = real_mean(xhat.square())
    lam = real_mean(g * xhat)  # real elements only, so NaN in padding stays out
    new_nu = nu * (1 - (1 - alpha_bkw) * gamma) + (1 - alpha_bkw) * lam

    # nu * xhat is the gradient through the batch statistic, which padding does not enter.
    correction = nu * xhat if mask is None else torch.where(mask, nu * xhat, 0)
    dx = ((g - correction) * rstd).to(x.dtype) if needs[0] else None
    return (dx, *affine_backward(dyf, xhat, weight, bias, mask, needs), new_nu)
