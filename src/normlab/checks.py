"""Every argument and tensor check of normlab, in one place: each error names the function or
class, the argument, what was expected and what came, before any computation starts.

Two kinds of callers: a module's constructor (``owner`` is the class name; arguments are
checked once, at construction) and a functional entry point (``fn`` is its name; arguments
and tensors are checked at the call). Nothing below the functional layer validates again:
the backend registry only routes (``normlab.backends.registry``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch


class InputError(ValueError, RuntimeError):
    """A tensor of the wrong shape or rank, or arguments that do not fit it: a ValueError,
    and also the RuntimeError torch raises for the same input, so that either ``except``
    clause catches it."""


# --- tensors (at the call) -------------------------------------------------------------------


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
        raise InputError(
            f"{fn}: {argument} must have shape {tuple(shape)}, got {tuple(param.shape)}"
        )


def check_min_ndim(x: torch.Tensor, ndim: int, *, fn: str, layout: str) -> None:
    if x.dim() < ndim:
        raise InputError(
            f"{fn}: expected input of at least {ndim} dimensions {layout}, "
            f"got shape {tuple(x.shape)}"
        )


# The ranges of the float arguments whose values outside them give wrong numbers silently
# (a negative eps: NaN or a sign flip; a momentum outside [0, 1]: running statistics that
# extrapolate), as the modules' constructors check them. Checked on Python numbers only: a
# tensor or a symbolic value (torch.compile) is taken as it is, as torch does.
RANGES = {"eps": (0.0, math.inf), "momentum": (0.0, 1.0), "alpha_bkw": (0.0, 1.0)}


def check_scalar(value, *, fn: str, argument: str, ranged: bool = True) -> None:
    """A float argument (eps, momentum...): a real number or a one-element real tensor, what
    torch.nn.functional takes (a string, complex or None is not silently converted), within
    its ``RANGES`` entry, not NaN (``ranged=False``: an argument this call does not use, of
    which only the type is checked, as torch ignores its value)."""
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and not value.is_complex()
    else:
        ok = isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt))
    if not ok:
        raise TypeError(
            f"{fn}: {argument} must be a real number, got {type(value).__name__} {value!r}"
        )
    if (
        ranged
        and argument in RANGES
        and isinstance(value, numbers.Real)
        and not isinstance(value, bool)
    ):
        low, high = RANGES[argument]
        if not (low <= value <= high and math.isfinite(value)):  # NaN fails both
            where = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise ValueError(f"{fn}: {argument} must be a finite number {where}, got {value!r}")


def check_training_eps(fn: str, eps) -> None:
    """Batch statistics in training need eps > 0 (a constant channel would divide 0 by 0), as
    torch's BatchNorm requires."""
    if isinstance(eps, numbers.Real) and not isinstance(eps, bool) and eps <= 0:
        raise ValueError(f"{fn}: eps must be positive during training, got {eps!r}")


def check_scalars(fn: str, **values) -> None:
    for argument, value in values.items():
        check_scalar(value, fn=fn, argument=argument)


def check_channel_params(fn: str, num_features: int, **params) -> None:
    """weight, bias and running statistics: None or exactly (num_features,)."""
    for name, param in params.items():
        check_param(param, (num_features,), fn=fn, argument=name)


def check_running_stats(fn: str, running_mean, running_var, why: str) -> None:
    """Both running statistics given (``why``: when they are needed)."""
    if running_mean is None or running_var is None:
        raise ValueError(
            f"{fn}: running_mean and running_var are required {why}, got "
            f"{type(running_mean).__name__} and {type(running_var).__name__}"
        )


def check_enough_values(
    count, x: torch.Tensor, *, fn: str, per: str, masked: bool, training: bool = True
) -> None:
    """Statistics of fewer than 2 values are meaningless in training: refuse, as torch does
    for one value (an empty unmasked input is allowed: its output is empty). With a mask,
    every statistic needs 2 real values; the check reads the mask's counts, so it is skipped
    while torch.compile traces (data-dependent). ``training=False``: a norm without running
    statistics (GroupNorm), whose input statistics are used in every mode."""
    when = " when training" if training else ""
    if not masked:
        if count == 1:
            raise ValueError(
                f"{fn}: expected more than 1 value per {per}{when}, got input size {list(x.shape)}"
            )
        return
    if torch.compiler.is_compiling():
        return
    fewest = int(count.min()) if count.numel() else 0
    if fewest < 2:
        raise ValueError(
            f"{fn}: expected more than 1 value per {per}{when}, got "
            f"{fewest} real value(s) in some {per} (mask of input size "
            f"{list(x.shape)})"
        )


def check_groups(fn: str, input: torch.Tensor, num_groups) -> None:
    """GroupNorm's ``num_groups`` at the call: a positive int dividing the channel count."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{fn}: num_groups must be a positive int, got {num_groups!r}")
    channels = input.shape[1]
    if channels % num_groups:
        raise InputError(
            f"{fn}: the channel count must be divisible by num_groups, got "
            f"{channels} channels (input shape {list(input.shape)}) and "
            f"num_groups={num_groups}"
        )


def check_virtual_batch(fn: str, input: torch.Tensor, channel: int, virtual_batch_size) -> None:
    """Ghost BatchNorm's ``virtual_batch_size`` at the call: a positive int dividing the
    batch (axis 0, which must not be the channel axis)."""
    if (
        isinstance(virtual_batch_size, bool)
        or not isinstance(virtual_batch_size, int)
        or virtual_batch_size < 1
    ):
        raise ValueError(
            f"{fn}: virtual_batch_size must be a positive int or None, got {virtual_batch_size!r}"
        )
    if channel == 0:
        raise ValueError(f"{fn}: virtual batches split axis 0, which is the channel axis here")
    if input.shape[0] % virtual_batch_size:
        raise ValueError(
            f"{fn}: the batch size must be divisible by virtual_batch_size, got "
            f"batch {input.shape[0]} (input shape {list(input.shape)}) and "
            f"virtual_batch_size={virtual_batch_size}"
        )


def check_renorm_limits(owner: str, r_max, d_max) -> None:
    """Batch renormalization's clipping limits: r_max >= 1, d_max >= 0 (both may be
    infinite: no clipping). At construction and at the call, the same words."""
    if not r_max >= 1 or not d_max >= 0:
        raise ValueError(
            f"{owner}: expected r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}"
        )


# --- constructor arguments (at construction) --------------------------------------------------
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
