"""Differentiable operations: the forward of a backend with its explicit backward attached."""

from normlab.ops.normalize import normalize

__all__ = ["normalize"]
