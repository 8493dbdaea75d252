"""The middle layer: a ``NormSpec`` call in, the registry's family run, a differentiable result
out.

``normalize``/``add_normalize``/``power_norm_approx`` hand a call to the backend registry
(``normlab.backends.registry``), which decides once which family runs it; ``kernel_ops``
holds the fused kernels' custom ops (one table), ``composite_op`` the composite's autograd
function, ``power_norm`` PowerNorm after warmup (eager, and the compiled training step).
"""

from normlab.ops.normalize import add_normalize, normalize, real_count, statistics
from normlab.ops.power_norm import power_norm_approx

__all__ = ["add_normalize", "normalize", "power_norm_approx", "real_count", "statistics"]
