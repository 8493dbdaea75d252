"""nn.Module layers, thin wrappers over ``normlab.functional``; drop-in for torch.nn."""

from normlab.modules.batch_norm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.modules.batch_renorm import (
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    renorm_limits,
)
from normlab.modules.group_norm import GroupNorm
from normlab.modules.instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.modules.layer_norm import LayerNorm, RMSNorm
from normlab.modules.power_norm import PowerNorm
from normlab.modules.sync_batch_norm import SyncBatchNorm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "PowerNorm",
    "RMSNorm",
    "SyncBatchNorm",
    "renorm_limits",
]
