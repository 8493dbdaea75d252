"""Input validation shared by the functional API: each error names the argument, what was
expected and what came, before any computation starts."""

from __future__ import annotations

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
