"""``power_norm_train``: one PowerNorm training step as a torch custom op, for
``torch.compile(fullgraph=True)``.

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
from normlab.ops import power_norm as approx
from normlab.ops.normalize import normalize
from normlab.spec import NormSpec


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
        y = approx.forward(*_approx_call(x, weight, bias, phi, dims, eps, mask))
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
        dx, dweight, dbias = approx.backward(family, call, dy, nu, alpha_bkw)
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
