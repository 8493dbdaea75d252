"""The base of BatchNorm and InstanceNorm: affine parameters and torch's running statistics.

Same attributes, buffers (``running_mean``, ``running_var``, ``num_batches_tracked``),
state_dict keys and checkpoint versioning as ``torch.nn.modules.batchnorm._NormBase``, so a
checkpoint moves between torch.nn and normlab with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.checks import check_common, check_int, check_real
from normlab.modules.affine import register_affine, reset_affine


class NormWithRunningStats(nn.Module):
    _version = 2  # version 2 added num_batches_tracked (as torch)

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
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "num_features", num_features, 1)
        check_common(
            owner,
            eps=eps,
            dtype=dtype,
            affine=affine,
            track_running_stats=track_running_stats,
            bias=bias,
        )
        if momentum is not None:  # None: the cumulative average
            check_real(owner, "momentum", momentum, 0.0, 1.0)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        register_affine(self, (num_features,), affine, bias, factory)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def _training_step_factor(self) -> float:
        """Count a training step (when tracking) and return the running-average factor:
        ``momentum``, or 1 / num_batches_tracked (cumulative average) when it is None."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        # Checkpoints from before version 2 have no num_batches_tracked: start it at 0.
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            current = self.num_batches_tracked
            state_dict[key] = (
                current
                if current is not None and current.device.type != "meta"
                else torch.tensor(0, dtype=torch.long)
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
