"""Batch Renormalization modules (Ioffe, NeurIPS 2017)."""

from __future__ import annotations

import math

import torch

from normlab import functional as F
from normlab.checks import check_int, check_real, check_renorm_limits
from normlab.modules.batch_norm import BatchNorm, FixedRank


def renorm_limits(
    step: int, r_max: float, d_max: float, warmup_steps: int, ramp_steps: int
) -> tuple[float, float]:
    """The (r_max, d_max) in force at training step ``step`` (1-based): (1, 0), i.e. plain
    BatchNorm, for the first ``warmup_steps`` steps, then a linear ramp over ``ramp_steps``
    steps to the final ``(r_max, d_max)``."""
    if step <= warmup_steps:
        return 1.0, 0.0
    progress = 1.0 if ramp_steps <= 0 else min(1.0, (step - warmup_steps) / ramp_steps)
    return 1.0 + progress * (r_max - 1.0), progress * d_max


class BatchRenorm(BatchNorm):
    r"""Batch Renormalization (Ioffe, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models", NeurIPS 2017).

    Training corrects the batch statistics towards the running ones:

    .. math::
        r = \mathrm{clip}_{[1/r_{max}, r_{max}]}\left(\frac{\sigma_B}{\sigma}\right),\quad
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}\left(\frac{\mu_B - \mu}{\sigma}\right),\quad
        y = \gamma\left(\frac{x - \mu_B}{\sigma_B} r + d\right) + \beta

    with :math:`\sigma_B = \sqrt{\mathrm{Var}_B[x] + \epsilon}`,
    :math:`\sigma = \sqrt{\mathrm{running\_var} + \epsilon}`; r and d are constants in the
    backward, as in the paper. Eval uses the running statistics, like BatchNorm. The running
    statistics, buffers and state_dict are BatchNorm's (a BatchNorm checkpoint loads).

    Schedule (:func:`renorm_limits`): ``r_max=1, d_max=0`` (plain BatchNorm) for the first
    ``warmup_steps`` training steps, then linear growth over ``ramp_steps`` steps to
    ``r_max``/``d_max``. The paper used 5000 warmup steps, then relaxed r_max to 3 and d_max
    to 5 over roughly 40k and 25k steps (one ramp here for both). ``mask``/``lengths`` in
    ``forward`` as :class:`BatchNorm`.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        dim: int = 1,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        ramp_steps: int = 0,
    ) -> None:
        owner = type(self).__name__
        check_real(owner, "r_max", r_max, -math.inf, finite=False)
        check_real(owner, "d_max", d_max, -math.inf, finite=False)
        check_renorm_limits(owner, r_max, d_max)
        check_int(owner, "warmup_steps", warmup_steps, 0)
        check_int(owner, "ramp_steps", ramp_steps, 0)
        super().__init__(
            num_features, eps, momentum, affine, True, device, dtype, bias=bias, dim=dim
        )
        self.r_max, self.d_max = r_max, d_max
        self.warmup_steps, self.ramp_steps = warmup_steps, ramp_steps

    def current_limits(self) -> tuple[float, float]:
        """(r_max, d_max) for the next training step under the schedule. Without a schedule
        (the default) they do not depend on the step, which is then not read: no host sync,
        and no value of a buffer for torch.compile to specialize on."""
        if self.warmup_steps == 0 and self.ramp_steps == 0:
            return renorm_limits(1, self.r_max, self.d_max, 0, 0)
        step = int(self.num_batches_tracked) + (1 if self.training else 0)
        return renorm_limits(step, self.r_max, self.d_max, self.warmup_steps, self.ramp_steps)

    def forward(
        self,
        input: torch.Tensor,
        mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_input_dim(input)
        r_max, d_max = self.current_limits()
        factor = self._training_step_factor()
        return F.batch_renorm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            factor,
            self.eps,
            r_max,
            d_max,
            dim=self.dim,
            mask=mask,
            lengths=lengths,
        )

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}"
        )


class _BatchRenormNd(FixedRank, BatchRenorm):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        ramp_steps: int = 0,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            device,
            dtype,
            bias=bias,
            dim=1,
            r_max=r_max,
            d_max=d_max,
            warmup_steps=warmup_steps,
            ramp_steps=ramp_steps,
        )


class BatchRenorm1d(_BatchRenormNd):
    """BatchRenorm over (N, C) or (N, C, L) input; see :class:`BatchRenorm`."""

    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenormNd):
    """BatchRenorm over (N, C, H, W) input; see :class:`BatchRenorm`."""

    _ranks = (4,)
    _layout = "(N, C, H, W)"


class BatchRenorm3d(_BatchRenormNd):
    """BatchRenorm over (N, C, D, H, W) input; see :class:`BatchRenorm`."""

    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
