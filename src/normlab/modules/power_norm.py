"""PowerNorm module (Shen et al., ICML 2020)."""

from __future__ import annotations

import torch
from torch import nn

from normlab import functional as F
from normlab.axes import normalize_axis
from normlab.checks import check_axis, check_common, check_int, check_real
from normlab.functional.power import power_norm_train_step
from normlab.modules.affine import register_affine, reset_affine


class PowerNorm(nn.Module):
    r"""PowerNorm (Shen, Yao, Gholami, Mahoney, Keutzer: "PowerNorm: Rethinking Batch
    Normalization in Transformers", ICML 2020, arXiv:2003.07845).

    A BatchNorm for Transformers: no mean subtraction (relaxed zero-mean normalization), the
    quadratic mean :math:`\psi^2 = \mathrm{E}_B[x^2]` per channel in place of the variance,
    and the *running* :math:`\psi^2` in the forward pass, which bounds the effect of a
    batch's outliers. Per channel, at training step t (Algorithm 1):

    .. math::
        \hat x_t = x_t / \sqrt{\psi^2_{t-1} + \epsilon}, \qquad
        y_t = \gamma \hat x_t + \beta, \qquad
        \psi^2_t = \psi^2_{t-1} + (1 - \alpha_{fwd}) (\psi^2_B - \psi^2_{t-1})

    and the approximate backpropagation, with :math:`g = \gamma\, \partial L/\partial y`,
    :math:`\Gamma_t = \mathrm{E}_B[\hat x^2]`, :math:`\Lambda_t = \mathrm{E}_B[g \hat x]`:

    .. math::
        \frac{\partial L}{\partial x_t} = \frac{g - \nu_{t-1} \hat x_t}
        {\sqrt{\psi^2_{t-1} + \epsilon}}, \qquad
        \nu_t = \nu_{t-1}(1 - (1 - \alpha_{bkw})\Gamma_t) + (1 - \alpha_{bkw}) \Lambda_t

    Warmup: for the first ``warmup_iters`` training steps the batch's own :math:`\psi^2_B`
    normalizes (exact gradient) and ``running_phi`` is their cumulative average. Inference
    always uses ``running_phi``, with or without a mask (the authors' masked code used batch
    statistics there). With ``mask``/``lengths`` (as :class:`BatchNorm`), padding enters
    neither :math:`\psi^2_B` nor :math:`\Gamma, \Lambda` (the authors' code averaged the
    gradient statistics over padded positions too). The authors' code also rescales each
    token by its own quadratic mean before PowerNorm ("GroupScaling"); compose with
    :class:`RMSNorm` without affine for that.

    Args: num_features, eps=1e-5, alpha_fwd=0.9, alpha_bkw=0.9, affine=True,
    warmup_iters=10000, device, dtype, bias=True, dim=-1 (the channel axis: (batch, length,
    features) by default).
    Buffers: ``running_phi`` (:math:`\psi^2`), ``running_grad_stat`` (:math:`\nu`),
    ``num_batches_tracked``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        alpha_fwd: float = 0.9,
        alpha_bkw: float = 0.9,
        affine: bool = True,
        warmup_iters: int = 10000,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        dim: int = -1,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "num_features", num_features, 1)
        check_common(owner, eps=eps, dtype=dtype, affine=affine, bias=bias)
        check_real(owner, "alpha_fwd", alpha_fwd, 0.0, 1.0)
        check_real(owner, "alpha_bkw", alpha_bkw, 0.0, 1.0)
        check_int(owner, "warmup_iters", warmup_iters, 0)
        check_axis(owner, "dim", dim)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.alpha_fwd, self.alpha_bkw = alpha_fwd, alpha_bkw
        self.affine = affine
        self.warmup_iters = warmup_iters
        self.dim = dim
        register_affine(self, (num_features,), affine, bias, factory)
        self.register_buffer("running_phi", torch.ones(num_features, **factory))
        self.register_buffer("running_grad_stat", torch.zeros(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_phi.fill_(1)
        self.running_grad_stat.zero_()
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)

    def forward(
        self,
        input: torch.Tensor,
        mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (
            input.dim() >= 1
            and input.shape[normalize_axis(self.dim, input.dim())] != self.num_features
        ):
            raise ValueError(
                f"expected input's size at dim={self.dim} to match num_features "
                f"({self.num_features}), got input of shape {list(input.shape)}"
            )
        if self.training and torch.compiler.is_compiling():  # one graph: no int(tensor)
            self.num_batches_tracked.add_(1)
            return power_norm_train_step(
                input,
                self.running_phi,
                self.running_grad_stat,
                self.num_batches_tracked,
                self.weight,
                self.bias,
                self.warmup_iters,
                self.alpha_fwd,
                self.alpha_bkw,
                self.eps,
                self.dim,
                mask=mask,
                lengths=lengths,
            )
        warmup, factor = False, 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            step = int(self.num_batches_tracked)
            warmup = step <= self.warmup_iters
            factor = 1.0 / step if warmup else 1.0 - self.alpha_fwd
        return F.power_norm(
            input,
            self.running_phi,
            self.running_grad_stat,
            self.weight,
            self.bias,
            self.training,
            factor,
            self.alpha_bkw,
            self.eps,
            dim=self.dim,
            warmup=warmup,
            mask=mask,
            lengths=lengths,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, "
            f"alpha_bkw={self.alpha_bkw}, affine={self.affine}, "
            f"warmup_iters={self.warmup_iters}, dim={self.dim}"
        )
