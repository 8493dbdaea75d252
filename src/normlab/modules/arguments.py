"""Constructor argument checks of the norm modules: each error names the class, the argument,
what it takes and what came, at construction (not at the first forward)."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def _real(value) -> float | None:
    """``value`` as a float if it is a real number (or a one-element real tensor), else None."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def check_real(
    owner: str, argument: str, value, low: float, high: float = math.inf, *, finite: bool = True
) -> None:
    """A real number in [low, high], not NaN, finite unless ``finite=False``: eps, momentum,
    alpha_fwd... (r_max and d_max may be infinite: no clipping)."""
    number = _real(value)
    where = f"in [{low}, {high}]" if high != math.inf else f">= {low}"
    where = "" if low == -math.inf and high == math.inf else where
    if number is None:
        raise TypeError(
            f"{owner}: {argument} must be a real number {where}".rstrip()
            + f", got {type(value).__name__} {value!r}"
        )
    if not (low <= number <= high and (math.isfinite(number) or not finite)):
        kind = " ".join(filter(None, ["a finite number" if finite else "a number", where]))
        raise ValueError(f"{owner}: {argument} must be {kind}, got {value!r}")


def check_int(owner: str, argument: str, value, low: int) -> None:
    """An int >= low (num_features, num_groups, warmup_iters...)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{owner}: {argument} must be an int >= {low}, got {type(value).__name__} {value!r}"
        )
    if value < low:
        raise ValueError(f"{owner}: {argument} must be an int >= {low}, got {value!r}")


def check_flag(owner: str, argument: str, value) -> None:
    """A bool (affine, bias, track_running_stats...): a string or a tensor is not a flag."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{owner}: {argument} must be a bool, got {type(value).__name__} {value!r}")


def check_dtype(owner: str, dtype) -> None:
    """None or a floating-point dtype (normalization of integers is not defined)."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{owner}: dtype must be a torch.dtype or None, got {dtype!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"{owner}: dtype must be a floating-point dtype, got {dtype}")


def check_axis(owner: str, argument: str, value) -> None:
    """An int axis; its range is checked against the input's rank at the forward."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        # worded as normlab.axes.normalize_axis, which checks the range at the forward
        raise TypeError(
            f"{owner}: {argument}: expected an int axis, got {type(value).__name__} {value!r}"
        )


def check_common(owner: str, *, eps, dtype, eps_may_be_none: bool = False, **flags) -> None:
    """What every norm module takes: eps >= 0 (None only where ``eps_may_be_none``:
    RMSNorm's default, torch.finfo(dtype).eps), a floating dtype, bool flags."""
    if eps is not None or not eps_may_be_none:
        check_real(owner, "eps", eps, 0.0)
    check_dtype(owner, dtype)
    for argument, value in flags.items():
        check_flag(owner, argument, value)
