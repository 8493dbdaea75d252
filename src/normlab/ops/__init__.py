"""Differentiable operations: a backend's forward with its explicit backward attached."""

from normlab.ops.normalize import add_normalize, normalize
from normlab.ops.power_norm import power_norm_approx

__all__ = ["add_normalize", "normalize", "power_norm_approx"]
