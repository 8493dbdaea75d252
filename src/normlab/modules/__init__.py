"""nn.Module layers, thin wrappers over ``normlab.functional``; drop-in for torch.nn."""

from normlab.modules.batch_norm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.modules.group_norm import GroupNorm
from normlab.modules.instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.modules.layer_norm import LayerNorm, RMSNorm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
]
