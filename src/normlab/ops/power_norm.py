"""PowerNorm after warmup (``NormSpec.stats == "power"``): the forward divides by the running
quadratic mean phi, the backward is the paper's approximate one, which updates the running
gradient statistic ``nu`` in place (Algorithm 1 of Shen et al. 2020); it is not the exact
gradient of the forward, so it is first-order only.

Each family runs it with its own launchers (composite: ``normlab.kernels.power_norm``;
Numba: ``normlab.kernels.cpu.launchers``; Triton: ``normlab.kernels.gpu.power_norm``, the
kernels on the channels layout the registry chose).
"""

from __future__ import annotations

import torch

from normlab.backends import registry
from normlab.kernels import power_norm as composite_power
from normlab.kernels.cpu import launchers


def _launchers(family: str):
    if family == "triton":
        from normlab.kernels.gpu import power_norm

        return power_norm
    return launchers


def forward(family: str, call) -> torch.Tensor:
    """y = weight * x / sqrt(phi + eps) + bias, phi = ``call.var``."""
    x, phi, eps = call.x, call.var, float(call.eps)
    if family == "composite":
        return composite_power.power_norm_forward(x, call.weight, call.bias, phi, eps)
    return _launchers(family).power_norm_forward(call.layout, x, call.weight, call.bias, phi, eps)


def backward(family: str, call, dy, nu, alpha_bkw):
    """(dx, dweight, dbias) of the approximate backward (None for an absent parameter);
    updates ``nu`` in place."""
    x, weight, bias, phi, mask = call.x, call.weight, call.bias, call.var, call.mask
    eps = float(call.eps)
    if family == "composite":
        dx, dweight, dbias, new_nu = composite_power.power_norm_backward(
            dy, x, weight, bias, phi, nu.reshape(phi.shape), call.spec.reduction, eps,
            alpha_bkw, mask,
        )  # fmt: skip
    else:
        dx, dweight, dbias, new_nu = _launchers(family).power_norm_backward(
            call.layout, dy, x, weight, bias, phi, nu, eps, alpha_bkw, mask
        )
    if x.numel():  # an empty batch has no gradient statistics (0 / 0): nu stays
        with torch.no_grad():
            nu.copy_(new_nu.reshape(nu.shape).to(nu.dtype))
    return dx, dweight, dbias


class _PowerNormApprox(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, phi, nu, alpha_bkw, mask, family, call):
        ctx.save_for_backward(x, weight, bias, phi, mask)
        ctx.nu = nu  # the buffer the backward updates
        ctx.config = (family, call.spec, call.eps, call.layout, alpha_bkw)
        return forward(family, call)

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
        family, spec, eps, layout, alpha_bkw = ctx.config
        call = registry.Call(spec, x, weight, bias, eps, var=phi, mask=mask)
        call.layout = layout
        dx, dweight, dbias = backward(family, call, dy, ctx.nu, alpha_bkw)
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            dweight if needs[1] else None,
            dbias if needs[2] else None,
            *(None,) * 6,
        )


def apply(family: str, call, nu, alpha_bkw) -> torch.Tensor:
    """The registry's runner: ``call`` on ``family`` with the approximate backward."""
    return _PowerNormApprox.apply(
        call.x, call.weight, call.bias, call.var, nu, float(alpha_bkw), call.mask, family, call
    )


# Under torch.compile this op stays eager (a graph break): its backward updates the nu buffer
# in place, and a traced version (aot_eager, torch 2.13) gave different gradients and nu
# than eager; correctness first.
@torch.compiler.disable
def power_norm_approx(spec, x, weight, bias, phi, nu, eps, alpha_bkw, mask=None):
    """y = weight * x / sqrt(phi + eps) + bias with PowerNorm's approximate backward.

    ``spec.stats == "power"``; ``weight``, ``bias``, ``phi`` broadcast against x; ``nu`` is
    the running gradient statistic buffer (one value per channel), updated in place by the
    backward."""
    call = registry.Call(spec, x, weight, bias, eps, var=phi, mask=mask)
    return registry.run_power(call, nu, alpha_bkw)
