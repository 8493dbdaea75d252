"""LayerNorm and RMSNorm modules: drop-in for torch.nn's, plus the ``dim`` argument."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from normlab import functional as F
from normlab.axes import as_dims, as_shape
from normlab.backends import plans
from normlab.checks import check_common, check_real
from normlab.functional.feature import plan_key
from normlab.modules.affine import register_affine, reset_affine


class _FeatureNorm(nn.Module):
    """Shared constructor of the norms over one sample's features (weight of normalized_shape).
    ``offset``: the norm scales by ``offset + weight`` (Gemma, Nemotron: 1); the parameter
    is stored as given, so state_dicts are the original model's."""

    offset = 0.0  # modules pickled before offset existed

    def __init__(
        self, normalized_shape, eps, elementwise_affine, bias, dim, device, dtype, offset=0.0
    ):
        super().__init__()
        owner = type(self).__name__
        check_real(owner, "offset", offset, -math.inf)
        if offset != 0 and not elementwise_affine:
            raise ValueError(
                f"{owner}: offset={offset!r} needs elementwise_affine=True (the norm scales by "
                "offset + weight)"
            )
        self.offset = float(offset)
        check_common(
            owner,
            eps=eps,
            dtype=dtype,
            eps_may_be_none=True,
            elementwise_affine=elementwise_affine,
            bias=bias,
        )
        self.normalized_shape = as_shape(normalized_shape)
        self.dim = as_dims(dim, len(self.normalized_shape))
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        register_affine(self, self.normalized_shape, elementwise_affine, bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)
        if self.offset != 0 and self.weight is not None:
            with torch.no_grad():  # offset + weight starts at 1 (Gemma's zeros for offset 1)
                self.weight.sub_(self.offset)

    def _dim_repr(self) -> str:
        dim = "" if self.dim is None else f", dim={self.dim if len(self.dim) > 1 else self.dim[0]}"
        return dim + (f", offset={self.offset}" if self.offset != 0 else "")


class LayerNorm(_FeatureNorm):
    r"""Layer normalization: all features of one sample share a mean and variance.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    with the mean and biased variance over the axes ``dim`` (default: the last
    ``len(normalized_shape)`` axes, as ``torch.nn.LayerNorm``). ``LayerNorm(C, dim=1)``
    normalizes the channels of an ``(N, C, H, W)`` tensor without a permute.

    Args:
        normalized_shape: size of the normalized axes (int or sequence).
        eps: added to the variance inside the square root. Default 1e-5.
        elementwise_affine: learnable ``weight`` (ones) and ``bias`` (zeros) of
            ``normalized_shape``. Default True.
        bias: whether the affine has a bias. Default True.
        dim: the axis (or increasing axes) that ``normalized_shape`` describes. Default None.
        offset: scale by ``offset + weight`` instead of ``weight`` (Nemotron's LayerNorm1P:
            1.0); ``weight`` is stored as is and initialized to ``1 - offset``. Needs
            ``elementwise_affine``. Default 0.0.

    Shape: input ``(*)`` with ``input.shape[d] == normalized_shape[i]`` for ``d = dim[i]``;
    output of the same shape and dtype.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        dim: int | Sequence[int] | None = None,
        offset: float = 0.0,
    ) -> None:
        check_real(type(self).__name__, "eps", eps, 0.0)  # None is RMSNorm's only
        super().__init__(
            normalized_shape, eps, elementwise_affine, bias, dim, device, dtype, offset
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, bias, eps = self.weight, self.bias, self.eps
        if self.offset == 0:  # a signature seen before: its plan, without the functional frames
            runner = plans.get(
                plan_key("layer_norm", input, self.normalized_shape, weight, bias, eps, self.dim)
            )
            if runner:
                return runner(input, weight, bias, eps)
        return F.layer_norm(
            input,
            self.normalized_shape,
            self.weight,
            self.bias,
            self.eps,
            dim=self.dim,
            offset=self.offset,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}{self._dim_repr()}"
        )


class RMSNorm(_FeatureNorm):
    r"""Root-mean-square normalization: LayerNorm without centring and without bias.

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \cdot \gamma

    over the axes ``dim`` (default: the last ``len(normalized_shape)`` axes).
    ``eps=None`` (the default, as ``torch.nn.RMSNorm``) uses ``torch.finfo(input.dtype).eps``.
    ``offset=1.0`` is Gemma's RMSNorm: it scales by ``1 + weight`` (computed in float32 for
    a half weight, the product rounded to the input dtype once, as Gemma does); ``weight`` is
    stored as is (initialized to ``1 - offset``), so Gemma checkpoints load unchanged.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        dim: int | Sequence[int] | None = None,
        offset: float = 0.0,
    ) -> None:
        super().__init__(
            normalized_shape, eps, elementwise_affine, False, dim, device, dtype, offset
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, eps = self.weight, self.eps
        if self.offset == 0 and type(eps) is float:  # as LayerNorm.forward
            runner = plans.get(
                plan_key("rms_norm", x, self.normalized_shape, weight, None, eps, self.dim)
            )
            if runner:
                return runner(x, weight, None, eps)
        return F.rms_norm(
            x, self.normalized_shape, self.weight, self.eps, dim=self.dim, offset=self.offset
        )

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}{self._dim_repr()}"
        )
