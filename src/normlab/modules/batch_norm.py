"""BatchNorm modules: ``BatchNorm`` with the channel axis anywhere, masks and ghost batches,
and torch's fixed-rank BatchNorm1d/2d/3d."""

from __future__ import annotations

import torch

from normlab import functional as F
from normlab.axes import normalize_axis
from normlab.checks import check_axis, check_int
from normlab.modules.running_stats import NormWithRunningStats


class BatchNorm(NormWithRunningStats):
    r"""Batch normalization: one feature (channel) over all samples and positions.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    The channel axis is ``dim`` (default 1, as torch; ``dim=-1`` for ``(batch, length,
    features)``); mean and variance are over every other axis. In training the batch
    statistics (biased variance) normalize the input and update the running statistics:
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased batch
    variance; ``momentum=None`` makes it the cumulative average over the
    ``num_batches_tracked`` batches seen. In eval the running statistics are used, or the
    batch statistics when ``track_running_stats=False``.

    Padding: ``forward(input, mask=None, lengths=None)``. ``mask`` is a bool tensor shaped
    like the input without the channel axis (or broadcastable to it), True at real elements;
    ``lengths`` (one int per sample) builds it for inputs with one sequence axis ((B, C, L)
    or (B, L, C)). Statistics and running statistics count real elements only; padded
    positions are normalized with the same statistics (the output stays dense).

    Ghost BatchNorm: ``virtual_batch_size=v`` normalizes each group of v samples (along axis
    0) with its own statistics in training; the running statistics, updated with their
    average, serve inference as usual.

    Args: as ``torch.nn.BatchNorm1d`` (num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, device, dtype, bias=True), plus ``dim`` and
    ``virtual_batch_size``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        dim: int = 1,
        virtual_batch_size: int | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        check_axis(type(self).__name__, "dim", dim)
        if virtual_batch_size is not None:
            check_int(type(self).__name__, "virtual_batch_size", virtual_batch_size, 1)
        self.dim = dim
        self.virtual_batch_size = virtual_batch_size

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 1:
            raise ValueError(f"expected an input of at least 1 dimension, got {input.dim()}D")
        channel = normalize_axis(self.dim, input.dim())
        if input.shape[channel] != self.num_features:
            raise ValueError(
                f"expected input's size at dim={self.dim} to match num_features "
                f"({self.num_features}), got input of shape {list(input.shape)}"
            )

    def forward(
        self,
        input: torch.Tensor,
        mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_input_dim(input)
        factor = self._training_step_factor()
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Running statistics are passed only where they are used or updated, as torch does.
        pass_running = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if pass_running else None,
            self.running_var if pass_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
            dim=self.dim,
            mask=mask,
            lengths=lengths,
            virtual_batch_size=self.virtual_batch_size,
        )

    def extra_repr(self) -> str:
        extra = "" if self.dim == 1 else f", dim={self.dim}"
        if self.virtual_batch_size is not None:
            extra += f", virtual_batch_size={self.virtual_batch_size}"
        return super().extra_repr() + extra


class FixedRank:
    """torch's fixed-rank norms: channels at axis 1 and an input rank check."""

    _ranks: tuple[int, ...] = ()
    _layout = ""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in self._ranks:
            expected = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"expected {expected} input {self._layout} (got {input.dim()}D input)")
        super()._check_input_dim(input)


class _BatchNormNd(FixedRank, BatchNorm):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        virtual_batch_size: int | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            dim=1,
            virtual_batch_size=virtual_batch_size,
        )


class BatchNorm1d(_BatchNormNd):
    """BatchNorm over (N, C) or (N, C, L) input; see :class:`BatchNorm`."""

    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNormNd):
    """BatchNorm over (N, C, H, W) input; see :class:`BatchNorm`."""

    _ranks = (4,)
    _layout = "(N, C, H, W)"


class BatchNorm3d(_BatchNormNd):
    """BatchNorm over (N, C, D, H, W) input; see :class:`BatchNorm`."""

    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
