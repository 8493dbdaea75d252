"""SyncBatchNorm: drop-in for torch.nn.SyncBatchNorm, on CPU (gloo) and GPU (NCCL), masked."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from normlab.distributed import sync_batch_norm
from normlab.modules.batch_norm import BatchNorm
from normlab.modules.batch_renorm import BatchRenorm


class SyncBatchNorm(BatchNorm):
    r"""BatchNorm whose training statistics span every process of ``process_group``.

    In training, with torch.distributed initialized and more than one process, the mean and
    variance are those of the concatenation of all ranks' real elements (merged
    count-weighted with Chan's formula from per-rank count, mean and centred sum of squares;
    one all_gather in the forward, one all_reduce in the backward), so outputs, input
    gradients and running statistics equal single-process BatchNorm on the global batch, on
    every rank. A rank with an empty or fully padded batch still joins and counts zero; the
    "more than 1 value per channel" check uses the global count and raises on every rank.
    In eval, with one process, or without torch.distributed, it is :class:`BatchNorm` with no
    collective. Works on CPU with gloo (unlike ``torch.nn.SyncBatchNorm``) and with NCCL.

    Args: as ``torch.nn.SyncBatchNorm`` (num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None, device, dtype), plus ``bias`` and ``dim``.
    ``forward(input, mask=None, lengths=None)`` as :class:`BatchNorm`.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        dim: int = 1,
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
            dim=dim,
        )
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        super()._check_input_dim(input)

    def _needs_sync(self) -> bool:
        return (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def forward(
        self,
        input: torch.Tensor,
        mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self._needs_sync():
            return super().forward(input, mask, lengths)
        self._check_input_dim(input)
        factor = self._training_step_factor()
        return sync_batch_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            factor,
            self.eps,
            dim=self.dim,
            mask=mask,
            lengths=lengths,
            process_group=self.process_group,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm of ``module`` (torch.nn BatchNorm1d/2d/3d and
        SyncBatchNorm, normlab BatchNorm*) by a normlab SyncBatchNorm with the same
        arguments, parameters, buffers, training mode, device and dtype. Returns the module
        (the same object unless ``module`` itself is a BatchNorm)."""
        if _is_convertible_batch_norm(module):
            return _to_sync(cls, module, process_group)
        for name, child in module.named_children():
            module.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return module


def _is_convertible_batch_norm(module: nn.Module) -> bool:
    if isinstance(module, SyncBatchNorm):
        return False
    if isinstance(module, BatchRenorm):
        raise ValueError(
            f"convert_sync_batchnorm: {type(module).__name__} has no synchronized "
            "form (its correction needs per-rank batch statistics); convert it "
            "to BatchNorm first or keep it local"
        )
    if isinstance(module, BatchNorm) and module.virtual_batch_size is not None:
        raise ValueError(
            "convert_sync_batchnorm: a ghost BatchNorm (virtual_batch_size="
            f"{module.virtual_batch_size}) normalizes local virtual batches; "
            "synchronizing it would change what it computes"
        )
    return isinstance(module, (BatchNorm, nn.modules.batchnorm._BatchNorm))


def _to_sync(cls, bn: nn.Module, process_group) -> SyncBatchNorm:
    reference = bn.weight if bn.weight is not None else bn.running_mean
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    sync = cls(
        bn.num_features,
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
        process_group,
        bias=bn.bias is not None,
        dim=getattr(bn, "dim", 1),
        **factory,
    )
    with torch.no_grad():
        if bn.affine:
            sync.weight.copy_(bn.weight)
            sync.weight.requires_grad_(bn.weight.requires_grad)
            if bn.bias is not None:
                sync.bias.copy_(bn.bias)
                sync.bias.requires_grad_(bn.bias.requires_grad)
        if bn.track_running_stats:
            sync.running_mean.copy_(bn.running_mean)
            sync.running_var.copy_(bn.running_var)
            sync.num_batches_tracked.copy_(bn.num_batches_tracked)
    sync.train(bn.training)
    return sync
