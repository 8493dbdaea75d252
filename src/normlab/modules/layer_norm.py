"""LayerNorm and RMSNorm modules: drop-in for torch.nn's, plus the ``dim`` argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from normlab import functional as F
from normlab.axes import as_dims, as_shape
from normlab.checks import check_common, check_real
from normlab.modules.affine import register_affine, reset_affine


class _FeatureNorm(nn.Module):
    """Shared constructor of the norms over one sample's features (weight of normalized_shape)."""

    def __init__(self, normalized_shape, eps, elementwise_affine, bias, dim, device, dtype):
        super().__init__()
        owner = type(self).__name__
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

    def _dim_repr(self) -> str:
        return "" if self.dim is None else f", dim={self.dim if len(self.dim) > 1 else self.dim[0]}"


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
    ) -> None:
        check_real(type(self).__name__, "eps", eps, 0.0)  # None is RMSNorm's only
        super().__init__(normalized_shape, eps, elementwise_affine, bias, dim, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, dim=self.dim
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
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, False, dim, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps, dim=self.dim)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}{self._dim_repr()}"
        )
