"""GroupNorm module, drop-in for torch.nn.GroupNorm."""

from __future__ import annotations

import torch
from torch import nn

from normlab import functional as F
from normlab.checks import check_common, check_int
from normlab.modules.affine import register_affine, reset_affine


class GroupNorm(nn.Module):
    r"""Group normalization: per sample, the channels of one group and all their positions
    share a mean and variance; ``weight`` and ``bias`` are per channel.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    One group is LayerNorm over (C, *spatial); ``num_channels`` groups is InstanceNorm.
    Input (N, C, *spatial), output of the same shape.

    Padding: ``forward(input, mask=None, lengths=None)``; ``mask`` is bool (N, *spatial)
    (True = real), ``lengths`` one int per sample for (N, C, L). Each group's statistics
    count its real positions only; padded positions are normalized with them.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "num_groups", num_groups, 1)
        check_int(owner, "num_channels", num_channels, 1)
        check_common(owner, eps=eps, dtype=dtype, affine=affine, bias=bias)
        if num_channels % num_groups != 0:
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})"
            )
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        factory = {"device": device, "dtype": dtype}
        register_affine(self, (num_channels,), affine, bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(
        self,
        input: torch.Tensor,
        mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input.dim() >= 2 and input.shape[1] != self.num_channels:
            raise ValueError(
                f"expected input with {self.num_channels} channels at dim=1, "
                f"got input of shape {list(input.shape)}"
            )
        return F.group_norm(
            input, self.num_groups, self.weight, self.bias, self.eps, mask=mask, lengths=lengths
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, "
            f"affine={self.affine}, bias={self.bias is not None}"
        )
