"""``power_norm_approx``: PowerNorm after warmup, with the paper's approximate backward.

The backward updates the running gradient statistic ``nu`` in place (Algorithm 1 of Shen et
al. 2020); it is not the exact gradient of the forward, so it is first-order only.
"""

from __future__ import annotations

import torch

from normlab.kernels import power_norm as kernel
from normlab.ops import dispatch
from normlab.ops.fused_common import array, launch, mask_array


def _plan(x, weight, bias, phi, reduction_dims, mask):
    """The channels plan (Numba, or Triton on CUDA and in the interpreter) for this call, or
    None for the composite."""
    plan = dispatch.choose(x, weight, bias, reduction_dims, True, phi, phi, mask)
    if plan is not None and plan.layout != "channels":
        return None
    return plan


def power_norm_approx_forward(x, weight, bias, phi, reduction_dims, eps, mask):
    """y = weight * x / sqrt(phi + eps) + bias (a fused channels kernel or the composite)."""
    plan = _plan(x, weight, bias, phi, reduction_dims, mask)
    if plan is not None:
        forward = _triton_forward if plan.kernel == "triton" else _numba_forward
        return forward(plan, x, weight, bias, phi, eps)
    return kernel.power_norm_forward(x, weight, bias, phi, eps)


def power_norm_approx_backward(dy, x, weight, bias, phi, nu, reduction_dims, eps, alpha_bkw, mask):
    """(dx, dweight, dbias) of the approximate backward (None for an absent parameter);
    updates ``nu`` in place."""
    plan = _plan(x, weight, bias, phi, reduction_dims, mask)
    if plan is not None:
        backward = _triton_backward if plan.kernel == "triton" else _numba_backward
        dx, dweight, dbias, new_nu = backward(
            plan, dy, x, weight, bias, phi, nu, eps, alpha_bkw, mask
        )
    else:
        dx, dweight, dbias, new_nu = kernel.power_norm_backward(
            dy, x, weight, bias, phi, nu.reshape(phi.shape), reduction_dims, eps, alpha_bkw, mask
        )
    if x.numel():  # an empty batch has no gradient statistics (0 / 0): nu stays
        with torch.no_grad():
            nu.copy_(new_nu.reshape(nu.shape).to(nu.dtype))
    return dx, dweight, dbias


class _PowerNormApprox(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, phi, nu, reduction_dims, eps, alpha_bkw, mask):
        ctx.save_for_backward(x, weight, bias, phi, mask)
        ctx.nu = nu  # the buffer the backward updates
        ctx.config = (reduction_dims, eps, alpha_bkw)
        return power_norm_approx_forward(x, weight, bias, phi, reduction_dims, eps, mask)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(
                "power_norm: PowerNorm's approximate backward (after warmup) is first-order "
                "only: it is not the derivative of the forward, so it has none. "
                "create_graph=True (double backward, a gradient penalty) is not supported; "
                "in warmup the exact gradient supports it"
            )
        x, weight, bias, phi, mask = ctx.saved_tensors
        reduction_dims, eps, alpha_bkw = ctx.config
        dx, dweight, dbias = power_norm_approx_backward(
            dy, x, weight, bias, phi, ctx.nu, reduction_dims, eps, alpha_bkw, mask
        )
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            dweight if needs[1] else None,
            dbias if needs[2] else None,
            *(None,) * 6,
        )


def _rstd(phi, eps):
    return torch.rsqrt(phi.reshape(-1).double() + eps)


def _numba_forward(plan, x, weight, bias, phi, eps):
    """y = x * scale + shift on the channels kernel, scale = weight * rstd, shift = bias."""
    from normlab.kernels.cpu import channels

    c = plan.view[1]
    scale = _rstd(phi, eps)
    if weight is not None:
        scale = scale * weight.reshape(-1).double()
    shift = torch.zeros(c, dtype=torch.float64) if bias is None else bias.reshape(-1).double()
    y = torch.empty_like(x)
    view = x.reshape(plan.view)
    launch(
        channels.channel_apply, array(view), array(scale), array(shift), array(y.view(plan.view))
    )
    return y


def _numba_backward(plan, dy, x, weight, bias, phi, nu, eps, alpha_bkw, mask):
    """The one-pass kernel; returns (dx, dweight, dbias, new_nu)."""
    from normlab.kernels.cpu import power_norm as cpu_kernel

    c = plan.view[1]
    rstd = _rstd(phi, eps)
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.reshape(-1).double()
    m = plan.kernel_mask(x, mask)
    dx = torch.empty_like(x)
    sums = torch.empty(4, c, dtype=torch.float64)
    launch(
        cpu_kernel.power_norm_backward,
        array(dy.contiguous().reshape(plan.view)),
        array(x.reshape(plan.view)),
        array(rstd),
        array(w),
        array(nu.reshape(-1).double()),
        mask_array(m),
        array(dx.view(plan.view)),
        array(sums),
    )
    count = plan.view[0] * plan.view[2] if m is None else int(m.sum())
    gamma, lam = sums[2] / count, sums[3] / count
    new_nu = nu.reshape(-1).double() * (1 - (1 - alpha_bkw) * gamma) + (1 - alpha_bkw) * lam
    dweight = None if weight is None else sums[0].to(weight.dtype).reshape(weight.shape)
    dbias = None if bias is None else sums[1].to(bias.dtype).reshape(bias.shape)
    return dx, dweight, dbias, new_nu


def _triton_forward(plan, x, weight, bias, phi, eps):
    """``_numba_forward`` on the Triton kernel."""
    from normlab.kernels.gpu import power_norm as gpu_kernel

    return gpu_kernel.power_norm_forward(plan, x, weight, bias, phi, eps)


def _triton_backward(plan, dy, x, weight, bias, phi, nu, eps, alpha_bkw, mask):
    """``_numba_backward`` on the Triton kernel (new_nu in float32)."""
    from normlab.kernels.gpu import power_norm as gpu_kernel

    return gpu_kernel.power_norm_backward(plan, dy, x, weight, bias, phi, nu, eps, alpha_bkw, mask)


# Under torch.compile this op stays eager (a graph break): its backward updates the nu buffer
# in place, and a traced version (aot_eager, torch 2.13) gave different gradients and nu
# than eager; correctness first.
@torch.compiler.disable
def power_norm_approx(x, weight, bias, phi, nu, reduction_dims, eps, alpha_bkw, mask=None):
    """y = weight * x / sqrt(phi + eps) + bias with PowerNorm's approximate backward.

    ``weight``, ``bias``, ``phi`` broadcast against x; ``nu`` is the running gradient
    statistic buffer (one value per channel), updated in place by the backward."""
    return _PowerNormApprox.apply(
        x, weight, bias, phi, nu, tuple(reduction_dims), float(eps), float(alpha_bkw), mask
    )
