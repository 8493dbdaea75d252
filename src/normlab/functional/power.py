"""PowerNorm (Shen et al., ICML 2020): BatchNorm without centring, normalized by a running
quadratic mean, with an approximate backward."""

from __future__ import annotations

import torch

from normlab.checks import check_enough_values, check_scalars
from normlab.functional.statistics import as_param, prepare_channel_norm
from normlab.ops import normalize, power_norm_approx, real_count, statistics
from normlab.ops.power_norm import power_norm_train
from normlab.spec import NormSpec


def _prepare(input, running_phi, running_grad_stat, weight, bias, dim, mask, lengths):
    """Validate a PowerNorm call: (axes, channel mask, parameter shape, weight, bias), the
    parameters reshaped to broadcast against ``input``."""
    fn = "power_norm"
    norm_axes, mask = prepare_channel_norm(
        fn,
        input,
        dim,
        mask,
        lengths,
        running_phi=running_phi,
        running_grad_stat=running_grad_stat,
        weight=weight,
        bias=bias,
    )
    for name, buffer in (("running_phi", running_phi), ("running_grad_stat", running_grad_stat)):
        if buffer is None:
            raise ValueError(f"{fn}: {name} is required, got None")
    shape = norm_axes.param_shape(input.shape)
    return norm_axes, mask, shape, as_param(weight, shape), as_param(bias, shape)


def power_norm(
    input: torch.Tensor,
    running_phi: torch.Tensor,
    running_grad_stat: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    alpha_bkw: float = 0.9,
    eps: float = 1e-5,
    dim: int = -1,
    *,
    warmup: bool = False,
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""PowerNorm of the channel axis ``dim`` (default -1: (batch, length, features)).

    With :math:`\psi^2_B` the quadratic mean of the batch per channel (over real elements),
    ``running_phi`` :math:`\psi^2` and ``running_grad_stat`` :math:`\nu`:

    - eval: :math:`y = \gamma\, x / \sqrt{\psi^2 + \epsilon} + \beta`.
    - training, ``warmup=True``: :math:`y = \gamma\, x / \sqrt{\psi_B^2 + \epsilon} + \beta`,
      exact gradient (an uncentred BatchNorm).
    - training after warmup: the forward divides by the running :math:`\psi^2` of the previous
      step; the backward is the paper's approximation
      :math:`\partial x = (\gamma\,\partial y - \nu\,\hat x) / \sqrt{\psi^2+\epsilon}` and
      updates ``running_grad_stat`` in place (``alpha_bkw``).

    In training ``running_phi`` is then moved towards :math:`\psi^2_B` by ``momentum``
    (:math:`1 - \alpha_{fwd}` in the paper). Padding (``mask``/``lengths``) enters neither
    :math:`\psi^2_B` nor the gradient statistics.
    """
    fn = "power_norm"
    norm_axes, mask, shape, weight, bias = _prepare(
        input, running_phi, running_grad_stat, weight, bias, dim, mask, lengths
    )
    check_scalars(fn, eps=eps, momentum=momentum, alpha_bkw=alpha_bkw)
    if not training:
        y, _, _ = normalize(
            NormSpec.of(norm_axes, center=False, stats="given"),
            input,
            weight,
            bias,
            eps,
            mean=torch.zeros_like(running_phi).reshape(shape),
            var=running_phi.reshape(shape),
        )
        return y

    spec = NormSpec.of(norm_axes, center=False, masked=mask is not None)
    count = real_count(spec, input, mask)
    check_enough_values(count, input, fn=fn, per="channel", masked=mask is not None)
    if warmup:
        y, _, batch_phi = normalize(spec, input, weight, bias, eps, mask=mask)
    else:
        with torch.no_grad():
            _, batch_phi = statistics(spec, input, mask)
        previous_phi = running_phi.detach().clone().reshape(shape)
        y = power_norm_approx(
            NormSpec.of(norm_axes, center=False, stats="power", masked=mask is not None),
            input,
            weight,
            bias,
            previous_phi,
            running_grad_stat,
            eps,
            alpha_bkw,
            mask,
        )
    if isinstance(count, int) and count < 2:  # empty batch: nothing to learn from
        return y
    with torch.no_grad():
        running_phi.lerp_(batch_phi.reshape(-1).to(running_phi.dtype), momentum)
    return y


def power_norm_train_step(
    input: torch.Tensor,
    running_phi: torch.Tensor,
    running_grad_stat: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    warmup_iters: int,
    alpha_fwd: float,
    alpha_bkw: float,
    eps: float,
    dim: int = -1,
    *,
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """One training step of :class:`~normlab.PowerNorm` with the warmup decision taken from
    the tensor ``num_batches_tracked`` (already incremented) instead of a Python int, so
    that ``torch.compile(fullgraph=True)`` traces it as one graph (``power_norm_train``).
    Same numbers as ``power_norm(..., training=True, momentum=1/step or 1 - alpha_fwd,
    warmup=step <= warmup_iters)``."""
    fn = "power_norm"
    norm_axes, mask, shape, weight, bias = _prepare(
        input, running_phi, running_grad_stat, weight, bias, dim, mask, lengths
    )
    count = real_count(NormSpec.of(norm_axes), input, mask)
    check_enough_values(count, input, fn=fn, per="channel", masked=mask is not None)
    y, batch_phi, _ = power_norm_train(
        input,
        weight,
        bias,
        running_phi.detach().reshape(shape),
        running_grad_stat,
        num_batches_tracked,
        warmup_iters,
        list(norm_axes.reduction),
        eps,
        alpha_bkw,
        mask,
    )
    if isinstance(count, int) and count < 2:  # empty batch: nothing to learn from
        return y
    step = num_batches_tracked.to(running_phi.dtype)
    momentum = torch.where(num_batches_tracked <= warmup_iters, 1.0 / step, 1.0 - alpha_fwd)
    with torch.no_grad():
        running_phi.lerp_(batch_phi.reshape(-1).to(running_phi.dtype), momentum)
    return y
