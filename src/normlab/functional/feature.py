"""LayerNorm and RMSNorm: the statistics of one sample's features."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from normlab import axes as _axes
from normlab.backends import plans
from normlab.checks import InputError, check_floating, check_param, check_scalar
from normlab.ops import add_normalize, normalize
from normlab.spec import NormSpec


def _feature_norm(fn, x, normalized_shape, weight, bias, eps, dim, center, residual=None):
    key = None
    if residual is None:
        # A signature seen before runs the runner its first call's decision left
        # (normlab.backends.plans); a new one takes the full path below and leaves one.
        key = plans.key(fn, x, eps, (weight, bias), normalized_shape, dim)
        if key is not None:
            runner = plans.get(key)
            if runner:
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
) -> torch.Tensor:
    """Layer normalization over the axes ``dim`` (default: the trailing ``len(normalized_shape)``
    axes, as ``torch.nn.functional.layer_norm``). ``dim=1`` normalizes the channels of an
    NCHW tensor in place of a permute."""
    return _feature_norm("layer_norm", input, normalized_shape, weight, bias, eps, dim, True)


def rms_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    dim: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Root-mean-square normalization: x / sqrt(mean(x^2) + eps) * weight. ``eps=None`` is the
    machine epsilon of the input dtype, as ``torch.nn.functional.rms_norm``."""
    if eps is None and isinstance(input, torch.Tensor) and input.is_floating_point():
        eps = _machine_eps(input.dtype)
    return _feature_norm("rms_norm", input, normalized_shape, weight, None, eps, dim, False)


def add_layer_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    dim: int | Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add and LayerNorm, as a pre-norm Transformer block needs:
    ``s = input + residual`` and ``layer_norm(s, ...)``, returned as ``(normalized, s)``
    (``s`` is the next block's residual stream). One pass over memory on the Numba backend."""
    return _feature_norm(
        "add_layer_norm", input, normalized_shape, weight, bias, eps, dim, True, residual
    )


def add_rms_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    dim: int | Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add and RMSNorm: ``(rms_norm(input + residual, ...), input + residual)``;
    ``eps=None`` as in ``rms_norm``."""
    if eps is None and isinstance(input, torch.Tensor) and input.is_floating_point():
        eps = _machine_eps(input.dtype)
    return _feature_norm(
        "add_rms_norm", input, normalized_shape, weight, None, eps, dim, False, residual
    )
