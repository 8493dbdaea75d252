"""Float64 NumPy reference of every norm, forward and backward: the oracle for all backends.

Read ``core`` for the math (one normalization over reduction axes, affine over feature axes)
and ``norms`` for how each torch.nn norm is that normalization with its own axes.
"""

from normlab.reference.core import normalize, normalize_backward, statistics
from normlab.reference.norms import (
    batch_norm_eval,
    batch_norm_eval_backward,
    batch_norm_train,
    batch_norm_train_backward,
    batch_norm_update_running_stats,
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
    instance_norm_update_running_stats,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
    updated_running_stats,
)

__all__ = [
    "batch_norm_eval",
    "batch_norm_eval_backward",
    "batch_norm_train",
    "batch_norm_train_backward",
    "batch_norm_update_running_stats",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "instance_norm_update_running_stats",
    "layer_norm",
    "layer_norm_backward",
    "normalize",
    "normalize_backward",
    "rms_norm",
    "rms_norm_backward",
    "statistics",
    "updated_running_stats",
]
