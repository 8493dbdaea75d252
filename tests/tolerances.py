"""Tolerances per dtype, in one place: how close a backend must be to the float64 reference.

float32/float64 compare the output to the reference computed from the same input values;
half types are looser because the *output* is rounded to 8 (bf16) or 11 (fp16) bits.
"""

import numpy as np
import torch

TOLERANCES = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}

# Gradients of a normalization sum over the reduced elements, so they carry more rounding.
GRAD_TOLERANCES = {
    torch.float64: {"atol": 1e-9, "rtol": 1e-9},
    torch.float32: {"atol": 2e-4, "rtol": 2e-4},
    torch.float16: {"atol": 3e-2, "rtol": 3e-2},
    torch.bfloat16: {"atol": 1.5e-1, "rtol": 1.5e-1},
}


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def grad_tol(dtype: torch.dtype) -> dict:
    return GRAD_TOLERANCES[dtype]


def _torch_dtype(numpy_dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, numpy_dtype)).dtype


def np_tol(numpy_dtype) -> dict:
    """``tol`` for a NumPy dtype (the kernel tests work on NumPy arrays)."""
    return tol(_torch_dtype(numpy_dtype))


def np_grad_tol(numpy_dtype) -> dict:
    return grad_tol(_torch_dtype(numpy_dtype))


def conditioned_tol(dtype: torch.dtype, condition: float) -> dict:
    """Tolerance for data with |mean| / std = ``condition`` (e.g. 1e4 + 1e-3 noise: 1e7),
    on outputs of size about 1: rounding the mean once to the accumulation dtype moves every
    normalized value by |mean| * eps relative to std, in any exact implementation. float32
    and half input accumulate in float64, or in float32 from a pivot (the row's first
    element, which x - pivot keeps exact), so they keep ``tol``;
    float64 gets about 4.5 ulp of the mean, times the condition."""
    if dtype != torch.float64:
        return tol(dtype)
    return {"atol": max(condition * 1e-15, TOLERANCES[dtype]["atol"]), "rtol": 1e-10}
