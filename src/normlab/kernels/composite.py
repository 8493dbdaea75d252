"""The normalization in plain torch operations: forward and its hand-derived backward.

Works on any device, dtype and memory layout. Statistics are accumulated in float32 for
float32, half and bfloat16 input (float64 for float64 input); the output has the input's
dtype. The math is the reference's (``normlab.reference.core``), term for term, with one
refinement: below float64 the mean is carried in float64 (``moments``, ``deviation``), so a
large mean with a small spread (1e4 + 1e-3 noise) is centred as exactly as by the kernels.
PowerNorm after warmup (its forward with the running quadratic mean, the paper's approximate
backward) is at the end.
"""

from __future__ import annotations

import math

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, fp16, bf16) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mask_count(mask: torch.Tensor, shape, reduction_dims: tuple[int, ...]) -> torch.Tensor:
    """How many real elements share each statistic: the mask (broadcastable to ``shape``)
    summed over the reduction axes, keepdim. Reads only the mask, never x."""
    full = [n if d in reduction_dims else mask.shape[d] for d, n in enumerate(shape)]
    return torch.broadcast_to(mask, full).sum(dim=reduction_dims, keepdim=True)


def deviation(xf: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """xf - mean in xf's dtype. A float64 ``mean`` of lower-precision ``xf`` is subtracted
    as two terms, its rounding hi and the rest lo: xf - hi is exact for values near the
    mean, so the deviations keep the float64 mean's accuracy (subtracting the mean rounded
    to float32 would shift them all by up to half an ulp of |mean|: 5e-4 at 1e4)."""
    if mean.dtype == xf.dtype:
        return xf - mean
    hi = mean.to(xf.dtype)
    return (xf - hi) - (mean - hi).to(xf.dtype)


def statistics(x: torch.Tensor, reduction_dims: tuple[int, ...], center: bool, mask=None):
    """Per-group mean and biased variance (keepdim), two-pass, in the accumulation dtype.

    With ``mask`` (bool, broadcastable to x; True = real) only real elements count: the sums
    are weighted by the mask and divided by the real count. x is read in place, not gathered.
    """
    _, mean, var = centred_moments(x, reduction_dims, center, mask)
    return mean.to(var.dtype), var


def centred_moments(x: torch.Tensor, reduction_dims: tuple[int, ...], center: bool, mask=None):
    """(x - mean, mean, var): ``statistics`` and the deviations, in the accumulation dtype.

    Below float64 the mean is returned in float64: the accumulation-dtype mean plus the mean
    of the deviations from it, which recovers its rounding (see ``deviation``); the variance
    and the returned deviations are taken from that corrected mean."""
    acc = accumulation_dtype(x.dtype)
    xf = x.to(acc)
    if mask is None:

        def mean_r(t):
            return t.mean(dim=reduction_dims, keepdim=True)

    else:
        count = mask_count(mask, x.shape, reduction_dims).to(acc)

        def mean_r(t):  # select, not multiply: NaN/Inf in padding must not leak in
            return torch.where(mask, t, 0).sum(dim=reduction_dims, keepdim=True) / count

    if not center:
        var = mean_r(xf.square())
        return xf, torch.zeros((), dtype=acc, device=x.device).expand(var.shape), var
    mean = mean_r(xf)
    centred = xf - mean
    if acc != torch.float64:
        rest = mean_r(centred)
        centred = centred - rest
        mean = mean.double() + rest.double()
    return centred, mean, mean_r(centred.square())


def normalize_forward(x, weight, bias, reduction_dims, eps, center, mean=None, var=None, mask=None):
    """Returns (y, mean, rstd, var). ``weight``/``bias`` broadcast against ``x`` (or None);
    ``mean``/``var`` are used as given when both are passed (BatchNorm eval); ``mask``
    restricts the statistics to real elements (every element is normalized). A computed
    mean is float64 below float64 input (``centred_moments``): pass it on to
    ``normalize_backward`` as it is."""
    acc = accumulation_dtype(x.dtype)
    if mean is None or var is None:
        centred, mean, var = centred_moments(x, reduction_dims, center, mask)
    else:
        mean = mean if mean.dtype == torch.float64 else mean.to(acc)
        var = var.to(acc)
        centred = deviation(x.to(acc), mean)
    rstd = torch.rsqrt(var + eps)
    y = centred * rstd
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), mean, rstd, var


def normalize_backward(
    dy,
    x,
    weight,
    bias,
    mean,
    rstd,
    reduction_dims,
    center,
    stats_given,
    needs=(True, True, True),
    mask=None,
    sync=None,
):
    """Gradients (dx, dweight, dbias); an entry is None where ``needs`` says it is not wanted.

    With a mask m and real count n the statistics depend on real elements only, so
    dx = rstd * (g - m * sum_R(g) / n - m * xhat * sum_R(g * xhat) / n), the sums over all
    elements (padded outputs depend on the statistics too). ``sync`` (SyncBatchNorm's
    statistics hook) sums them over every rank, and n is the count over every rank.
    """
    acc = accumulation_dtype(x.dtype)
    dyf = dy.to(acc)
    xhat = deviation(x.to(acc), mean) * rstd
    g = dyf if weight is None else dyf * weight.to(acc)

    dx = None
    if needs[0]:
        if stats_given:
            dx = (g * rstd).to(x.dtype)
        else:
            count = reduced_count(x.shape, reduction_dims, mask, acc)
            sum_g, sum_g_xhat = gradient_sums(g, xhat, reduction_dims, mask)
            if sync is not None:
                count = sync.count.to(acc)
                sum_g, sum_g_xhat = sync.all_reduce(sum_g, sum_g_xhat)
            dx = input_gradient(g, xhat, rstd, sum_g, sum_g_xhat, count, mask, center)
            dx = dx.to(x.dtype)
    return (dx, *affine_backward(dyf, xhat, weight, bias, mask, needs))


def reduced_count(shape, reduction_dims, mask, dtype):
    """Elements per statistic: a number without a mask, a keepdim tensor with one."""
    if mask is None:
        return math.prod([shape[d] for d in reduction_dims])
    return mask_count(mask, shape, reduction_dims).to(dtype)


def gradient_sums(g, xhat, reduction_dims, mask):
    """The backward's two reductions, sum_R(g) and sum_R(g * xhat), over all elements
    (SyncBatchNorm all-reduces exactly these)."""
    g_xhat = g * xhat
    if mask is not None:  # padding with dy = 0 adds nothing, even if x is NaN there
        g_xhat = torch.where(g == 0, 0, g_xhat)
    return g.sum(dim=reduction_dims, keepdim=True), g_xhat.sum(dim=reduction_dims, keepdim=True)


def input_gradient(g, xhat, rstd, sum_g, sum_g_xhat, count, mask, center):
    """dx = rstd * (g - m * sum_g / n - m * xhat * sum_g_xhat / n), m the mask (1 without);
    no sum_g term without centring."""
    correction = xhat * (sum_g_xhat / count)
    if center:
        correction = correction + sum_g / count
    if mask is not None:  # d(statistic)/dx_i is nonzero only at real elements
        correction = torch.where(mask, correction, 0)
    return (g - correction) * rstd


def affine_backward(dyf, xhat, weight, bias, mask, needs=(True, True, True)):
    """(dweight, dbias) of y = weight * xhat + bias: dy * xhat and dy summed to each
    parameter's broadcast shape (None where absent or not needed)."""
    dweight = None
    if weight is not None and needs[1]:
        dy_xhat = dyf * xhat
        if mask is not None:  # padding with dy = 0 adds nothing, even if x is NaN there
            dy_xhat = torch.where(dyf == 0, 0, dy_xhat)
        dweight = dy_xhat.sum_to_size(weight.shape).to(weight.dtype)
    dbias = None
    if bias is not None and needs[2]:
        dbias = dyf.sum_to_size(bias.shape).to(bias.dtype)
    return dweight, dbias


# --- PowerNorm after warmup -------------------------------------------------------------------
#
# PowerNorm after warmup in plain torch operations: the forward divides by the *running*
# quadratic mean, the backward is the paper's approximate backpropagation.
#
# Shen et al., "PowerNorm: Rethinking Batch Normalization in Transformers", ICML 2020,
# Algorithm 1. With psi^2 the running quadratic mean (before this step's update), nu the
# running gradient statistic, alpha = alpha_bkw and g = weight * dy:
#
#     xhat  = x / sqrt(psi^2 + eps)              y = weight * xhat + bias
#     dx    = (g - m * nu * xhat) / sqrt(psi^2 + eps)      (m = 1 at real elements, else 0)
#     nu'   = nu * (1 - (1 - alpha) * Gamma) + (1 - alpha) * Lambda
#     Gamma = mean over real elements of xhat^2,  Lambda = mean over real elements of g * xhat


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
