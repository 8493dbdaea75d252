"""The learnable affine of every norm module: ``weight`` (ones) and ``bias`` (zeros), or None."""

from __future__ import annotations

import torch
from torch import nn


def register_affine(module: nn.Module, shape, affine: bool, bias: bool, factory: dict) -> None:
    """Register ``weight`` and ``bias`` of ``shape`` as torch.nn does (None when absent)."""
    if affine:
        module.weight = nn.Parameter(torch.empty(shape, **factory))
        if bias:
            module.bias = nn.Parameter(torch.empty(shape, **factory))
        else:
            module.register_parameter("bias", None)
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def reset_affine(module: nn.Module) -> None:
    if module.weight is not None:
        nn.init.ones_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
