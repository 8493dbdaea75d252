"""The normalization in plain torch operations: forward and its hand-derived backward.

Works on any device, dtype and memory layout. Statistics are accumulated in float32 for
half and bfloat16 input (float64 for float64 input); the output has the input's dtype.
The math is the reference's (``normlab.reference.core``), term for term.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, fp16, bf16) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def statistics(x: torch.Tensor, reduction_dims: tuple[int, ...], center: bool):
    """Per-group mean and biased variance (keepdim), two-pass, in the accumulation dtype."""
    xf = x.to(accumulation_dtype(x.dtype))
    if center:
        mean = xf.mean(dim=reduction_dims, keepdim=True)
        var = (xf - mean).square().mean(dim=reduction_dims, keepdim=True)
    else:
        mean = torch.zeros((), dtype=xf.dtype, device=xf.device).expand(
            [1 if d in reduction_dims else n for d, n in enumerate(xf.shape)]
        )
        var = xf.square().mean(dim=reduction_dims, keepdim=True)
    return mean, var


def normalize_forward(x, weight, bias, reduction_dims, eps, center, mean=None, var=None):
    """Returns (y, mean, rstd, var). ``weight``/``bias`` broadcast against ``x`` (or None);
    ``mean``/``var`` are used as given when both are passed (BatchNorm eval)."""
    if mean is None or var is None:
        mean, var = statistics(x, reduction_dims, center)
    acc = accumulation_dtype(x.dtype)
    mean, var = mean.to(acc), var.to(acc)
    rstd = torch.rsqrt(var + eps)
    y = (x.to(acc) - mean) * rstd
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), mean, rstd, var


def normalize_backward(
    dy, x, weight, bias, mean, rstd, reduction_dims, center, stats_given, needs=(True, True, True)
):
    """Gradients (dx, dweight, dbias); an entry is None where ``needs`` says it is not wanted."""
    acc = accumulation_dtype(x.dtype)
    dyf = dy.to(acc)
    xhat = (x.to(acc) - mean) * rstd
    g = dyf if weight is None else dyf * weight.to(acc)

    dx = None
    if needs[0]:
        if stats_given:
            dx = g * rstd
        else:
            proj = (g * xhat).mean(dim=reduction_dims, keepdim=True)
            centred = g - g.mean(dim=reduction_dims, keepdim=True) if center else g
            dx = (centred - xhat * proj) * rstd
        dx = dx.to(x.dtype)
    dweight = None
    if weight is not None and needs[1]:
        dweight = (dyf * xhat).sum_to_size(weight.shape).to(weight.dtype)
    dbias = None
    if bias is not None and needs[2]:
        dbias = dyf.sum_to_size(bias.shape).to(bias.dtype)
    return dx, dweight, dbias
