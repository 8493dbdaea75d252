"""InstanceNorm modules, drop-in for torch.nn.InstanceNorm1d/2d/3d."""

from __future__ import annotations

import warnings

import torch

from normlab import functional as F
from normlab.modules.running_stats import NormWithRunningStats


class _InstanceNorm(NormWithRunningStats):
    r"""Instance normalization: one channel of one sample over its positions.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Defaults as torch: ``affine=False``, ``track_running_stats=False``. With
    ``track_running_stats=True`` training updates the running statistics with the batch
    average of the per-instance statistics and eval uses them. Unbatched input (without N)
    is accepted.

    Padding: ``forward(input, mask=None, lengths=None)``; ``mask`` is bool (N, *spatial)
    (True = real), ``lengths`` one int per sample for (N, C, L). Each instance's statistics
    count its real positions only; padded positions are normalized with them.
    """

    _spatial_dims = 0

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Version 1 (torch 0.4) stopped saving running stats when they are not tracked.
        if local_metadata.get("version", None) is None and not self.track_running_stats:
            stale = [
                prefix + n for n in ("running_mean", "running_var") if prefix + n in state_dict
            ]
            if stale:
                error_msgs.append(
                    f"Unexpected running stats buffer(s) {stale} for "
                    f"{type(self).__name__} with track_running_stats=False"
                )
                for key in stale:
                    state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(
        self,
        input: torch.Tensor,
        mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        unbatched = self._spatial_dims + 1
        if input.dim() not in (unbatched, unbatched + 1):
            raise ValueError(
                f"expected {unbatched}D or {unbatched + 1}D input (got {input.dim()}D input)"
            )
        channel_dim = input.dim() - unbatched
        if input.size(channel_dim) != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={channel_dim} to match "
                    f"num_features ({self.num_features}), "
                    f"but got: {input.size(channel_dim)}."
                )
            warnings.warn(
                f"input's size at dim={channel_dim} does not match num_features. "
                "num_features is not used because affine=False",
                stacklevel=2,
            )
        if input.dim() == unbatched:
            if isinstance(mask, torch.Tensor):  # anything else: the functional's TypeError
                mask = mask.unsqueeze(0)
            if lengths is not None:  # one entry for the one sample (else the functional's error)
                lengths = torch.as_tensor(lengths).reshape(-1)
            return self._instance_norm(input.unsqueeze(0), mask, lengths).squeeze(0)
        return self._instance_norm(input, mask, lengths)

    def _instance_norm(self, input, mask, lengths) -> torch.Tensor:
        return F.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
            mask=mask,
            lengths=lengths,
        )


class InstanceNorm1d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__ + "\n    Input (N, C, L) or (C, L).\n"
    _spatial_dims = 1


class InstanceNorm2d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__ + "\n    Input (N, C, H, W) or (C, H, W).\n"
    _spatial_dims = 2


class InstanceNorm3d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__ + "\n    Input (N, C, D, H, W) or (C, D, H, W).\n"
    _spatial_dims = 3
