"""Normalization across data-parallel processes, on torch.distributed (gloo on CPU, NCCL on
GPU): batch statistics of real elements merged exactly over every rank's batch."""

from normlab.distributed.sync_batch_norm import merge_moments, sync_batch_norm

__all__ = ["merge_moments", "sync_batch_norm"]
