"""Random inputs shared by the kernel tests (tests/test_kernels_*.py)."""

import numpy as np


def rng(*key):
    """A generator seeded by the test's parameters, so every case has its own data."""
    return np.random.default_rng(list(key))


def inputs(generator, shape, dtype, params):
    """x, weight, bias, dy in ``dtype``; weight and bias have ``params`` entries (weight
    not ones, bias not zero)."""
    x = (generator.standard_normal(shape) * 2 + 0.5).astype(dtype)
    weight = (1 + 0.5 * generator.standard_normal(params)).astype(dtype)
    bias = generator.standard_normal(params).astype(dtype)
    dy = generator.standard_normal(shape).astype(dtype)
    return x, weight, bias, dy
