"""Input validation shared by the functional API: each error names the argument, what was
expected and what came, before any computation starts."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch


def check_floating(x: torch.Tensor, *, fn: str, argument: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {argument} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {argument} must be a floating-point tensor, got dtype {x.dtype}")


def check_param(
    param: torch.Tensor | None, shape: Sequence[int], *, fn: str, argument: str
) -> None:
    """weight / bias / running statistics: None or exactly ``shape`` (no silent broadcasting)."""
    if param is None:
        return
    if not isinstance(param, torch.Tensor):
        raise TypeError(
            f"{fn}: {argument} must be a torch.Tensor or None, got {type(param).__name__}"
        )
    if not param.is_floating_point():
        raise TypeError(
            f"{fn}: {argument} must be a floating-point tensor or None, got dtype {param.dtype}"
        )
    if tuple(param.shape) != tuple(shape):
        raise ValueError(
            f"{fn}: {argument} must have shape {tuple(shape)}, got {tuple(param.shape)}"
        )


def check_min_ndim(x: torch.Tensor, ndim: int, *, fn: str, layout: str) -> None:
    if x.dim() < ndim:
        raise ValueError(
            f"{fn}: expected input of at least {ndim} dimensions {layout}, "
            f"got shape {tuple(x.shape)}"
        )


# The ranges of the float arguments whose values outside them give wrong numbers silently
# (a negative eps: NaN or a sign flip; a momentum outside [0, 1]: running statistics that
# extrapolate), as the modules' constructors check them. Checked on Python numbers only: a
# tensor or a symbolic value (torch.compile) is taken as it is, as torch does.
RANGES = {"eps": (0.0, math.inf), "momentum": (0.0, 1.0), "alpha_bkw": (0.0, 1.0)}


def check_real(value, *, fn: str, argument: str) -> None:
    """A float argument (eps, momentum...): a real number or a one-element real tensor, what
    torch.nn.functional takes (a string, complex or None is not silently converted), within
    its ``RANGES`` entry, not NaN."""
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and not value.is_complex()
    else:
        ok = isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt))
    if not ok:
        raise TypeError(
            f"{fn}: {argument} must be a real number, got {type(value).__name__} {value!r}"
        )
    if argument in RANGES and isinstance(value, numbers.Real) and not isinstance(value, bool):
        low, high = RANGES[argument]
        if not (low <= value <= high and math.isfinite(value)):  # NaN fails both
            where = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise ValueError(f"{fn}: {argument} must be a finite number {where}, got {value!r}")


def check_reals(fn: str, **values) -> None:
    for argument, value in values.items():
        check_real(value, fn=fn, argument=argument)
