"""A normalization as data: ``NormSpec`` (what is normalized) and ``Layout`` (how a kernel sees it).

Every norm in normlab is one ``NormSpec``, built once by its functional entry point and
carried down to the kernel:

- ``reduction``: the axes whose elements share one mean and variance;
- ``feature``: the axes along which weight and bias vary;
- ``center``: subtract the mean (LayerNorm, BatchNorm...) or not (RMSNorm, PowerNorm);
- ``stats``: where the statistics come from: ``"batch"`` (computed from x, over its real
  elements when masked), ``"given"`` (running statistics passed in, constants for the
  gradient) or ``"power"`` (PowerNorm after warmup: the running quadratic mean, with the
  paper's approximate backward);
- ``masked``: a mask says which elements are real (it never varies along a feature axis).

LayerNorm of (N, L, C) over C is ``NormSpec(reduction=(2,), feature=(2,))``, BatchNorm of
(N, C, H, W) ``NormSpec(reduction=(0, 2, 3), feature=(1,))`` (one feature over all samples),
InstanceNorm ``NormSpec((2, 3), (1,))``, GroupNorm the grouped view (N, G, C/G, S) as
``NormSpec((2, 3), (1, 2))``; RMSNorm is LayerNorm with ``center=False``, BatchNorm in eval
``stats="given"``. ``layout(spec, shape, affine)`` then says which of
the three kernel layouts the call is, computed from the spec and the input's shape alone:

- rows: the reduction axes are the trailing axes and carry the parameters (LayerNorm,
  RMSNorm): x is viewed as (rows, features);
- groups: x is (N, G, *rest), the reduction axes are all of ``rest``, the parameters vary
  along G and optionally the first axis of ``rest`` (GroupNorm, InstanceNorm): x is viewed
  as (N, C, S);
- channels: every axis but one is reduced and the parameters and statistics vary along it
  (BatchNorm in training, with given statistics, PowerNorm): x is viewed as (A, C, B);
- columns: LayerNorm/RMSNorm over one axis that is not the last (channels-first, the
  ConvNeXt case), the parameters along it: x is viewed as (A, C, B), statistics per (a, b).

The layouts are tried in that order (a call two of them fit goes to the first).

The backend registry (``normlab.backends.registry``) asks this module for the layout of a
call; the kernels know only the views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STATS = ("batch", "given", "power")


@dataclass(frozen=True)
class NormSpec:
    """One normalization, for an input of a given rank (axes non-negative and sorted)."""

    reduction: tuple[int, ...]
    feature: tuple[int, ...]
    center: bool = True
    stats: str = "batch"  # "batch" | "given" | "power"
    masked: bool = False

    @classmethod
    def of(cls, norm_axes, **options) -> NormSpec:
        """The spec of a ``normlab.axes.NormAxes`` (same reduction and feature axes)."""
        return cls(norm_axes.reduction, norm_axes.feature, **options)

    def keep_shape(self, shape) -> tuple[int, ...]:
        """The statistics' (keepdim) shape for an input of ``shape``."""
        return tuple([1 if d in self.reduction else n for d, n in enumerate(shape)])

    def param_shape(self, shape) -> tuple[int, ...]:
        """The shape that broadcasts a parameter of the feature axes against ``shape``."""
        return tuple(n if d in self.feature else 1 for d, n in enumerate(shape))

    def reduced_count(self, shape) -> int:
        """How many elements share one statistic (without a mask)."""
        return math.prod([shape[d] for d in self.reduction])


@dataclass(frozen=True)
class Layout:
    """A kernel layout of one call: ``kind`` ("rows" | "groups" | "channels" | "columns"),
    x's shape as the kernel sees it (``view``), the number of groups G (groups layout), and
    the mask's view and the axes of x it is broadcast along."""

    kind: str
    view: tuple[int, ...]
    groups: int = 1
    mask_view: tuple[int, ...] | None = None
    mask_channel_axes: tuple[int, ...] = ()

    def kernel_mask(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask as the kernel reads it: uint8, contiguous, ``mask_view``-shaped."""
        if mask is None:
            return None
        shape = [1 if d in self.mask_channel_axes else n for d, n in enumerate(x.shape)]
        expanded = torch.broadcast_to(mask, shape).reshape(self.mask_view)
        return expanded.to(torch.uint8).contiguous()


def _varies(shape, axes) -> bool:
    return any([shape[d] != 1 for d in axes])


def _rows(spec: NormSpec, shape, affine: bool) -> Layout | str:
    nd = len(shape)
    if spec.reduction != tuple(range(nd - len(spec.reduction), nd)):
        return "the reduction axes are not the trailing axes"
    if spec.stats != "batch" or spec.masked:
        return "rows kernels take neither given statistics nor a mask"
    if (
        affine
        and spec.feature != spec.reduction
        and _varies(shape, set(spec.feature) ^ set(spec.reduction))
    ):
        return "the parameters do not span exactly the normalized axes"
    features = math.prod([shape[d] for d in spec.reduction])
    return Layout("rows", (math.prod(shape) // features, features))


def _groups(spec: NormSpec, shape, affine: bool) -> Layout | str:
    nd = len(shape)
    if nd < 3 or spec.reduction != tuple(range(2, nd)):
        return "not a (N, G, *reduced) layout"
    if spec.stats != "batch" or not spec.center:
        return "group kernels compute centred statistics themselves"
    # Channels per group: the first reduced axis when the parameters vary along it
    # (GroupNorm's (N, G, C/G, S) view); else 1 (InstanceNorm, or no parameters).
    per_group = shape[2] if affine and 2 in spec.feature and shape[2] != 1 else 1
    channel_axes = (1,) if per_group == 1 else (1, 2)
    if affine and _varies(shape, [d for d in spec.feature if d not in channel_axes]):
        return "the parameters vary along a reduced axis other than the channel"
    if affine and 1 not in spec.feature and shape[1] != 1:
        return "the parameters do not vary along the channel"
    n, g = shape[0], shape[1]
    spatial = math.prod(shape[2:]) // per_group
    return Layout(
        "groups",
        (n, g * per_group, spatial),
        groups=g,
        mask_view=(n, spatial) if spec.masked else None,
        mask_channel_axes=channel_axes,
    )


def _channels(spec: NormSpec, shape, affine: bool) -> Layout | str:
    nd = len(shape)
    kept = [d for d in range(nd) if d not in spec.reduction]
    if len(kept) != 1:
        return "not a per-channel (BatchNorm) layout"
    (c,) = kept
    if affine and _varies(shape, [d for d in spec.feature if d != c]):
        return "the parameters or statistics vary along a reduced axis"
    if affine and c not in spec.feature and shape[c] != 1:
        # e.g. LayerNorm over all axes but one, whose normalized axes have size 1
        return "the parameters or statistics do not have one entry per channel"
    if spec.stats == "batch" and not spec.center:
        return "channel kernels compute centred statistics (PowerNorm uses the composite)"
    a, b = math.prod(shape[:c]), math.prod(shape[c + 1 :])
    mask_view = (a, b) if spec.masked else None
    return Layout("channels", (a, shape[c], b), mask_view=mask_view, mask_channel_axes=(c,))


def _columns(spec: NormSpec, shape, affine: bool) -> Layout | str:
    nd = len(shape)
    if len(spec.reduction) != 1 or spec.reduction[0] == nd - 1:
        return "not one reduced axis before the last"
    if spec.stats != "batch" or spec.masked:
        return "column kernels take neither given statistics nor a mask"
    if spec.feature != spec.reduction:
        # e.g. PowerNorm's warmup over (N, C): statistics per channel, not a feature norm
        return "the feature axes are not the normalized axis"
    (d,) = spec.reduction
    a, b = math.prod(shape[:d]), math.prod(shape[d + 1 :])
    return Layout("columns", (a, shape[d], b))


LAYOUTS = (_rows, _groups, _channels, _columns)


def layout(spec: NormSpec, shape, affine: bool) -> Layout | str:
    """The kernel layout of ``spec`` on an input of ``shape`` (``affine``: the call has a
    weight or a bias), or why none fits (each layout's reason, joined by "; ")."""
    reasons = []
    for candidate in LAYOUTS:
        found = candidate(spec, shape, affine)
        if isinstance(found, Layout):
            return found
        reasons.append(found)
    return "; ".join(reasons)
