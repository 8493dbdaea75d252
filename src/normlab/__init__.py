"""normlab: layer, batch, RMS, group and instance normalization for PyTorch.

Drop-in for the torch.nn layers (same arguments, defaults and state_dict keys), with a
float64 NumPy reference (``normlab.reference``) that every backend is tested against.
"""

from normlab import functional, reference
from normlab.modules import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
)

__version__ = "0.1.0"

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
    "__version__",
    "functional",
    "reference",
]
