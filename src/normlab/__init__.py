"""normlab: layer, batch, RMS, group and instance normalization for PyTorch.

Drop-in for the torch.nn layers (same arguments, defaults and state_dict keys), with a
float64 NumPy reference (``normlab.reference``) that every backend is tested against.
"""

from normlab import distributed, functional, masks, reference
from normlab.conversion import convert
from normlab.fold import fold_batchnorm
from normlab.masks import lengths_to_mask
from normlab.modules import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    PowerNorm,
    RMSNorm,
    SyncBatchNorm,
    renorm_limits,
)

__version__ = "0.1.0"

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
    "__version__",
    "convert",
    "distributed",
    "fold_batchnorm",
    "functional",
    "lengths_to_mask",
    "masks",
    "reference",
    "renorm_limits",
]
