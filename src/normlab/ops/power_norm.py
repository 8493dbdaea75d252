"""PowerNorm after warmup (``NormSpec.stats == "power"``): the forward divides by the running
quadratic mean phi, the backward is the paper's approximate one, which updates the running
gradient statistic ``nu`` in place (Algorithm 1 of Shen et al. 2020); it is not the exact
gradient of the forward, so it is first-order only.

Each family runs it with its own launchers (composite: ``normlab.kernels.composite``;
Numba: ``normlab.kernels.cpu.launchers``; Triton: ``normlab.kernels.gpu.power_norm``, the
kernels on the channels layout the registry chose). ``power_norm_approx`` is the eager op;
``power_norm_train`` one whole training step as a custom op, for compiled graphs:

Eager PowerNorm picks its branch in Python (``int(num_batches_tracked)``: warmup with the
batch's own quadratic mean, or the running one with the approximate backward that updates
``nu`` in place). A compiled graph cannot branch on a tensor's value nor record an in-place
update inside an ``autograd.Function`` backward. So here the branch is taken inside an
opaque, functional op (``step`` is a tensor input), and the backward is a second op that
declares its mutation of ``nu`` (``mutates_args``), which AOTAutograd keeps in the compiled
backward. Both call the eager code paths, so compiled and eager steps give the same numbers.
"""

from __future__ import annotations

import torch

from normlab.backends import registry
from normlab.kernels import composite
from normlab.kernels.cpu import launchers
from normlab.ops.normalize import normalize
from normlab.spec import NormSpec


def _launchers(family: str):
    if family == "triton":
        from normlab.kernels.gpu import power_norm

        return power_norm
    return launchers


def forward(family: str, call) -> torch.Tensor:
    """y = weight * x / sqrt(phi + eps) + bias, phi = ``call.var``."""
    x, phi, eps = call.x, call.var, float(call.eps)
    if family == "composite":
        return composite.power_norm_forward(x, call.weight, call.bias, phi, eps)
    return _launchers(family).power_norm_forward(call.layout, x, call.weight, call.bias, phi, eps)


def backward(family: str, call, dy, nu, alpha_bkw):
    """(dx, dweight, dbias) of the approximate backward (None for an absent parameter);
    updates ``nu`` in place."""
    x, weight, bias, phi, mask = call.x, call.weight, call.bias, call.var, call.mask
    eps = float(call.eps)
    if family == "composite":
        dx, dweight, dbias, new_nu = composite.power_norm_backward(
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
# than eager; correctness first. torch._disable_dynamo is torch.compiler.disable that imports
# torch._dynamo (seconds) at the first call instead of at import of normlab.
@torch._disable_dynamo
def power_norm_approx(spec, x, weight, bias, phi, nu, eps, alpha_bkw, mask=None):
    """y = weight * x / sqrt(phi + eps) + bias with PowerNorm's approximate backward.

    ``spec.stats == "power"``; ``weight``, ``bias``, ``phi`` broadcast against x; ``nu`` is
    the running gradient statistic buffer (one value per channel), updated in place by the
    backward."""
    call = registry.Call(spec, x, weight, bias, eps, var=phi, mask=mask)
    return registry.run_power(call, nu, alpha_bkw)


# --- one training step as a custom op (torch.compile(fullgraph=True)) ----------------------


def _is_warmup(step: torch.Tensor, warmup_iters: int) -> bool:
    return int(step) <= warmup_iters


def _spec(x, reduction_dims, stats, mask) -> NormSpec:
    """PowerNorm's spec: one channel (the axis not reduced), uncentred."""
    dims = tuple(reduction_dims)
    feature = tuple(d for d in range(x.dim()) if d not in dims)
    return NormSpec(dims, feature, center=False, stats=stats, masked=mask is not None)


def _approx_call(x, weight, bias, phi, reduction_dims, eps, mask):
    """The after-warmup call and the family the registry runs it on."""
    spec = _spec(x, reduction_dims, "power", mask)
    call = registry.Call(spec, x, weight, bias, eps, var=phi, mask=mask)
    return registry.decide(call).name, call


@torch.library.custom_op("normlab::power_norm_train", mutates_args=())
def power_norm_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    phi: torch.Tensor,
    nu: torch.Tensor,
    step: torch.Tensor,
    warmup_iters: int,
    reduction_dims: list[int],
    eps: float,
    alpha_bkw: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, batch_phi, phi_used): PowerNorm of x at training step ``step`` (the already
    incremented ``num_batches_tracked``). ``phi`` is the running quadratic mean before this
    step (keepdim shape); ``batch_phi`` the batch's (keepdim, the accumulation dtype), for the
    caller's running update; ``phi_used`` a copy of ``phi`` that the backward reads. The
    backward must not read ``phi`` itself: the caller updates that buffer in place after
    this op, and under inductor (torch 2.13) a clone taken outside the op was read after
    that update in the compiled backward (recomputed from the buffer, it seems), which gave
    other gradients than eager."""
    dims = tuple(reduction_dims)
    if _is_warmup(step, warmup_iters):
        spec = _spec(x, dims, "batch", mask)
        y, _, batch_phi = normalize(spec, x, weight, bias, eps, mask=mask)
    else:
        _, batch_phi = composite.statistics(x, dims, False, mask)
        y = forward(*_approx_call(x, weight, bias, phi, dims, eps, mask))
    return y, batch_phi, phi.clone()


@power_norm_train.register_fake
def _(x, weight, bias, phi, nu, step, warmup_iters, reduction_dims, eps, alpha_bkw, mask):
    acc = composite.accumulation_dtype(x.dtype)
    return torch.empty_like(x), phi.new_empty(phi.shape, dtype=acc), torch.empty_like(phi)


@torch.library.custom_op("normlab::power_norm_train_backward", mutates_args=("nu",))
def power_norm_train_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    phi: torch.Tensor,
    nu: torch.Tensor,
    step: torch.Tensor,
    warmup_iters: int,
    reduction_dims: list[int],
    eps: float,
    alpha_bkw: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) (an empty tensor for an absent parameter). Warmup: the exact
    gradient of the uncentred batch norm. After warmup: the approximate backward, which
    updates ``nu`` in place."""
    dims = tuple(reduction_dims)
    if _is_warmup(step, warmup_iters):
        inputs = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
        with torch.enable_grad():
            spec = _spec(x, dims, "batch", mask)
            y, _, _ = normalize(spec, *inputs, eps, mask=mask)
            wanted = [t for t in inputs if t is not None]
            grads = iter(torch.autograd.grad(y, wanted, dy))
        dx, dweight, dbias = (next(grads) if t is not None else None for t in inputs)
    else:
        family, call = _approx_call(x, weight, bias, phi, dims, eps, mask)
        dx, dweight, dbias = backward(family, call, dy, nu, alpha_bkw)
    return dx, _or_empty(dweight, x), _or_empty(dbias, x)


@power_norm_train_backward.register_fake
def _(dy, x, weight, bias, phi, nu, step, warmup_iters, reduction_dims, eps, alpha_bkw, mask):
    return torch.empty_like(x), _fake_grad(weight, x), _fake_grad(bias, x)


def _or_empty(grad: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0) if grad is None else grad


def _fake_grad(param: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0) if param is None else torch.empty_like(param)


def _setup(ctx, inputs, output):
    x, weight, bias, _phi, nu, step, warmup_iters, reduction_dims, eps, alpha_bkw, mask = inputs
    _, batch_phi, phi_used = output
    ctx.save_for_backward(x, weight, bias, phi_used, nu, step, mask)
    ctx.config = (warmup_iters, reduction_dims, eps, alpha_bkw)
    ctx.mark_non_differentiable(batch_phi, phi_used)


def _backward(ctx, dy, _dbatch_phi, _dphi_used):
    x, weight, bias, phi, nu, step, mask = ctx.saved_tensors
    warmup_iters, reduction_dims, eps, alpha_bkw = ctx.config
    dx, dweight, dbias = power_norm_train_backward(
        dy.contiguous(), x, weight, bias, phi, nu, step, warmup_iters, reduction_dims, eps,
        alpha_bkw, mask,
    )  # fmt: skip
    needs = ctx.needs_input_grad
    return (
        dx if needs[0] else None,
        dweight if weight is not None and needs[1] else None,
        dbias if bias is not None and needs[2] else None,
        *(None,) * 8,
    )


power_norm_train.register_autograd(_backward, setup_context=_setup)
