"""A norm is a choice of axes: which elements share one mean and variance, which carry the affine.

Every normalization in normlab is the same two steps (statistics over the *reduction axes*,
then an affine transform whose parameters vary along the *feature axes*). This module turns
each norm's constructor arguments into those two sets of axes, for an input of a given rank.
It is pure Python, shared by the NumPy reference and the torch implementation.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from normlab.checks import InputError


@dataclass(frozen=True)
class NormAxes:
    """The axes of one normalization, for an input of rank ``ndim`` (all non-negative, sorted).

    reduction: axes whose elements share one mean and variance.
    feature: axes along which weight and bias vary.
    """

    ndim: int
    reduction: tuple[int, ...]
    feature: tuple[int, ...]

    def param_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape that broadcasts a parameter of the feature axes against an input of ``shape``."""
        return tuple(n if axis in self.feature else 1 for axis, n in enumerate(shape))

    def stat_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the per-group statistics (reduction axes kept with size 1)."""
        return tuple(1 if axis in self.reduction else n for axis, n in enumerate(shape))

    def reduced_count(self, shape: Sequence[int]) -> int:
        """How many elements share one mean and variance."""
        count = 1
        for axis in self.reduction:
            count *= shape[axis]
        return count


def normalize_axis(axis: int, ndim: int, *, argument: str = "dim") -> int:
    """Resolve a possibly negative axis against ``ndim``; out of range is an IndexError, as
    in torch."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{argument}: expected an int axis, got {type(axis).__name__} {axis!r}")
    if not -ndim <= axis < ndim:
        raise IndexError(
            f"{argument}: axis out of range for an input of {ndim} dimensions "
            f"(expected an int in [{-ndim}, {ndim - 1}]), got {axis}"
        )
    return axis % ndim


def _as_int_tuple(value, *, argument: str, expected: str) -> tuple[int, ...]:
    """An int (or numpy integer) or a sequence of them, as a tuple of Python ints."""
    items = (value,) if isinstance(value, numbers.Integral) else value
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(
            f"{argument}: expected {expected}, got {type(value).__name__} {value!r}"
        ) from None
    for n in items:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(
                f"{argument}: expected {expected}, got {value!r} "
                f"(entry {n!r} is a {type(n).__name__})"
            )
    return tuple(int(n) for n in items)


def as_shape(shape: int | Sequence[int], *, argument: str = "normalized_shape") -> tuple[int, ...]:
    """``normalized_shape`` as torch accepts it: an int or a sequence of positive ints."""
    expected = "a positive int or a non-empty sequence of them"
    dims = _as_int_tuple(shape, argument=argument, expected=expected)
    if not dims or any(n < 1 for n in dims):
        raise InputError(f"{argument}: expected {expected}, got {shape!r}")
    return dims


def as_dims(dim: int | Sequence[int] | None, count: int) -> tuple[int, ...] | None:
    """The ``dim`` argument of LayerNorm/RMSNorm as a tuple (None stays None: trailing axes)."""
    if dim is None:
        return None
    dims = _as_int_tuple(dim, argument="dim", expected="an int axis or a sequence of int axes")
    if len(dims) != count:
        raise ValueError(
            f"dim: expected {count} axis/axes, one for each entry of normalized_shape, got {dim!r}"
        )
    return dims


def feature_norm_axes(
    ndim: int, normalized_shape: tuple[int, ...], dim: tuple[int, ...] | None
) -> NormAxes:
    """LayerNorm / RMSNorm: one sample's features (the axes ``dim``, by default the trailing
    ones) share a mean and variance; weight and bias vary along the same axes."""
    if dim is None:
        if ndim < len(normalized_shape):
            raise InputError(
                f"input: expected at least {len(normalized_shape)} dimensions for "
                f"normalized_shape={list(normalized_shape)}, got {ndim}"
            )
        axes = tuple(range(ndim - len(normalized_shape), ndim))
    else:
        axes = tuple(normalize_axis(axis, ndim) for axis in dim)
        if any(a >= b for a, b in itertools.pairwise(axes)):
            raise ValueError(
                f"dim: expected distinct axes in increasing order (matching the order of "
                f"normalized_shape), got {dim!r} (resolved to {axes} for {ndim} dimensions)"
            )
    return NormAxes(ndim, reduction=axes, feature=axes)


def channel_norm_axes(ndim: int, dim: int = 1) -> NormAxes:
    """BatchNorm: one feature (channel) over all samples and positions."""
    channel = normalize_axis(dim, ndim)
    reduction = tuple(a for a in range(ndim) if a != channel)
    return NormAxes(ndim, reduction=reduction, feature=(channel,))


def instance_norm_axes(ndim: int) -> NormAxes:
    """InstanceNorm on (N, C, *spatial): one sample's one channel over its positions."""
    return NormAxes(ndim, reduction=tuple(range(2, ndim)), feature=(1,))


def group_norm_axes() -> NormAxes:
    """GroupNorm on the grouped view (N, G, C // G, S) of an (N, C, *spatial) input: the
    channels of one group and all their positions share a mean and variance; weight and bias
    vary per channel, i.e. along (G, C // G)."""
    return NormAxes(4, reduction=(2, 3), feature=(1, 2))


def grouped_shape(shape: Sequence[int], num_groups: int) -> tuple[int, int, int, int]:
    """The (N, G, C // G, S) view of an (N, C, *spatial) shape used by GroupNorm."""
    spatial = 1
    for n in shape[2:]:
        spatial *= n
    return (shape[0], num_groups, shape[1] // num_groups, spatial)
