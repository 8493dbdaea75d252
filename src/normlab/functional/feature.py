"""LayerNorm and RMSNorm: the statistics of one sample's features."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from normlab import axes as _axes
from normlab.backends import plans
from normlab.checks import InputError, check_floating, check_param, check_real, check_scalar
from normlab.ops import add_normalize, normalize
from normlab.spec import NormSpec


def plan_key(fn, x, normalized_shape, weight, bias, eps, dim, offset=0.0):
    """The plan key (``normlab.backends.plans``) of a LayerNorm/RMSNorm call: the functional
    entry and the modules (which look their plan up first) build it here, the same way.
    A list ``normalized_shape`` or ``dim`` enters as the tuple it means (hashable)."""
    if type(normalized_shape) is list:
        normalized_shape = tuple(normalized_shape)
    if type(dim) is list:
        dim = tuple(dim)
    return plans.key(fn, x, eps, (weight, bias), normalized_shape, dim, offset)


def _feature_norm(
    fn, x, normalized_shape, weight, bias, eps, dim, center, residual=None, offset=0.0
):
    plain = type(offset) in (float, int) and offset == 0  # the default: one cheap test
    key = None
    if residual is None:
        # A signature seen before runs the runner its first call's decision left
        # (normlab.backends.plans); a new one takes the full path below and leaves one.
        key = plan_key(fn, x, normalized_shape, weight, bias, eps, dim, offset)
        if key is not None:
            runner = plans.get(key)
            if runner:
                if not plain:  # the offset was checked when the signature was first seen
                    weight = _offset(weight, offset)
                return runner(x, weight, bias, eps)
    check_floating(x, fn=fn)
    check_scalar(eps, fn=fn, argument="eps")
    if residual is not None:
        _check_residual(fn, x, residual)
    shape = _axes.as_shape(normalized_shape)
    norm_axes = _axes.feature_norm_axes(x.dim(), shape, _axes.as_dims(dim, len(shape)))
    actual = tuple(x.shape[a] for a in norm_axes.reduction)
    if actual != shape:
        where = "trailing shape" if dim is None else f"shape at dim {norm_axes.reduction}"
        raise InputError(
            f"{fn}: expected input with {where} {list(shape)} (normalized_shape), "
            f"got input of shape {list(x.shape)}"
        )
    check_param(weight, shape, fn=fn, argument="weight")
    check_param(bias, shape, fn=fn, argument="bias")
    if not plain:
        weight = offset_weight(fn, weight, offset)
    param_shape = norm_axes.param_shape(x.shape)
    weight = None if weight is None else weight.reshape(param_shape)
    bias = None if bias is None else bias.reshape(param_shape)
    spec = NormSpec.of(norm_axes, center=center)
    if residual is not None:
        return add_normalize(spec, x, residual, weight, bias, eps)
    y, _, _ = normalize(spec, x, weight, bias, eps, stats=False, plan_key=key)
    return y


_MACHINE_EPS: dict = {}


def _machine_eps(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).eps``, looked up once per dtype (RMSNorm's default eps)."""
    eps = _MACHINE_EPS.get(dtype)
    if eps is None:
        eps = _MACHINE_EPS[dtype] = torch.finfo(dtype).eps
    return eps


def _offset(weight, offset):
    """``offset + weight``, a float16/bfloat16 weight widened to float32 first (Gemma's
    ``1.0 + weight.float()``: ``1 + w`` rounded to bfloat16 would lose w's low bits)."""
    if weight.dtype in (torch.float16, torch.bfloat16):
        weight = weight.float()
    return weight + float(offset)


def offset_weight(fn, weight, offset):
    """The weight the norm multiplies by: ``offset + weight`` (Gemma's RMSNorm stores w and
    scales by ``1 + w``; Nemotron's LayerNorm1P likewise), a differentiable op, so autograd
    gives d weight = d (offset + weight) and every backend runs unchanged. A float16/bfloat16
    weight is widened to float32 first, as Gemma does (``1.0 + weight.float()``): ``1 + w``
    rounded to bfloat16 would lose w's low bits. Such a float32 weight with a half input runs
    on the composite (the kernels take parameters of the input's dtype), which computes in
    float32 and rounds once at the end, Gemma's order. An offset needs a weight."""
    check_real(fn, "offset", offset, -math.inf)
    if weight is None:
        raise ValueError(f"{fn}: offset={offset!r} needs a weight (offset + weight scales xhat)")
    return _offset(weight, offset)


def _check_residual(fn, x, residual):
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{fn}: residual must be a Tensor, got {type(residual).__name__}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            f"{fn}: residual must have the input's shape, dtype and device, got "
            f"{list(residual.shape)} {residual.dtype} {residual.device} for input "
            f"{list(x.shape)} {x.dtype} {x.device}"
        )


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    dim: int | Sequence[int] | None = None,
    *,
    offset: float = 0.0,
) -> torch.Tensor:
    """Layer normalization over the axes ``dim`` (default: the trailing ``len(normalized_shape)``
    axes, as ``torch.nn.functional.layer_norm``). ``dim=1`` normalizes the channels of an
    NCHW tensor in place of a permute. ``offset``: scale by ``offset + weight`` (Nemotron's
    LayerNorm1P: ``offset=1``; see ``offset_weight`` for the dtypes); needs a weight."""
    return _feature_norm(
        "layer_norm", input, normalized_shape, weight, bias, eps, dim, True, offset=offset
    )


def rms_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    dim: int | Sequence[int] | None = None,
    *,
    offset: float = 0.0,
) -> torch.Tensor:
    """Root-mean-square normalization: x / sqrt(mean(x^2) + eps) * weight. ``eps=None`` is the
    machine epsilon of the input dtype, as ``torch.nn.functional.rms_norm``. ``offset``:
    scale by ``offset + weight`` (Gemma's RMSNorm: ``offset=1``, computed in float32 for a
    half weight as Gemma does); needs a weight."""
    if eps is None and isinstance(input, torch.Tensor) and input.is_floating_point():
        eps = _machine_eps(input.dtype)
    return _feature_norm(
        "rms_norm", input, normalized_shape, weight, None, eps, dim, False, offset=offset
    )


def add_layer_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    dim: int | Sequence[int] | None = None,
    *,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add and LayerNorm, as a pre-norm Transformer block needs:
    ``s = input + residual`` and ``layer_norm(s, ...)``, returned as ``(normalized, s)``
    (``s`` is the next block's residual stream). One pass over memory on the Numba backend.
    ``offset`` as in ``layer_norm``."""
    return _feature_norm(
        "add_layer_norm", input, normalized_shape, weight, bias, eps, dim, True, residual, offset
    )


def add_rms_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    dim: int | Sequence[int] | None = None,
    *,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add and RMSNorm: ``(rms_norm(input + residual, ...), input + residual)``;
    ``eps=None`` and ``offset`` as in ``rms_norm``."""
    if eps is None and isinstance(input, torch.Tensor) and input.is_floating_point():
        eps = _machine_eps(input.dtype)
    return _feature_norm(
        "add_rms_norm", input, normalized_shape, weight, None, eps, dim, False, residual, offset
    )
