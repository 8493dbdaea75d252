"""Float64 NumPy reference of every norm, forward and backward: the oracle for all backends.

Read ``core`` for the math (one normalization over reduction axes, affine over feature axes)
and ``norms`` for how each torch.nn norm is that normalization with its own axes.
"""

from normlab.reference.batch_renorm import (
    batch_renorm_train,
    batch_renorm_train_backward,
    renorm_correction,
)
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
from normlab.reference.power_norm import (
    batch_quadratic_mean,
    power_norm_backward,
    power_norm_forward,
    power_norm_update_running_phi,
    power_norm_warmup,
    power_norm_warmup_backward,
)

__all__ = [
    "batch_norm_eval",
    "batch_norm_eval_backward",
    "batch_norm_train",
    "batch_norm_train_backward",
    "batch_norm_update_running_stats",
    "batch_quadratic_mean",
    "batch_renorm_train",
    "batch_renorm_train_backward",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "instance_norm_update_running_stats",
    "layer_norm",
    "layer_norm_backward",
    "normalize",
    "normalize_backward",
    "power_norm_backward",
    "power_norm_forward",
    "power_norm_update_running_phi",
    "power_norm_warmup",
    "power_norm_warmup_backward",
    "renorm_correction",
    "rms_norm",
    "rms_norm_backward",
    "statistics",
    "updated_running_stats",
]
