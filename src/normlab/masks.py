"""Padding masks: which elements are real. ``True`` marks a real element, ``False`` padding.

A mask is shaped like the input without its channel axis (or broadcastable to that shape);
``lengths`` (one int per sample) is a shorthand for a mask over the sequence axis, which is
the one axis besides the batch axis (0) and the channel axis: L in (B, C, L) with channels at
``dim=1``, L in (B, L, C) with ``dim=-1``. Inputs with more positional axes need a ``mask``.
"""

from __future__ import annotations

import torch


def lengths_to_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """(batch,) lengths -> (batch, max_length) bool mask, True at positions < length."""
    positions = torch.arange(max_length, device=lengths.device)
    return positions < lengths.reshape(-1, 1)


def channel_mask(
    x: torch.Tensor,
    channel_axis: int,
    mask: torch.Tensor | None,
    lengths: torch.Tensor | None,
    *,
    fn: str,
) -> torch.Tensor | None:
    """Validate ``mask``/``lengths`` for input ``x`` and return a bool mask of x's rank with
    size 1 at ``channel_axis`` (broadcastable to x), or None when neither is given."""
    if mask is not None and lengths is not None:
        raise ValueError(f"{fn}: pass either mask or lengths, not both")
    if lengths is not None:
        mask = _mask_from_lengths(x, channel_axis, lengths, fn=fn)
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: mask must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{fn}: mask must have dtype torch.bool (True = real element), got {mask.dtype}"
        )
    expected = [n for d, n in enumerate(x.shape) if d != channel_axis]
    if mask.dim() != len(expected) or any(
        m not in (n, 1) for m, n in zip(mask.shape, expected, strict=True)
    ):
        raise ValueError(
            f"{fn}: mask must have the input's shape without the channel axis {channel_axis} "
            f"(or broadcast to it), i.e. {expected}, got {list(mask.shape)} for input of "
            f"shape {list(x.shape)}"
        )
    if mask.device != x.device:
        raise ValueError(f"{fn}: mask is on {mask.device}, input on {x.device}")
    return mask.unsqueeze(channel_axis)


def _mask_from_lengths(x, channel_axis, lengths, *, fn):
    positional = [d for d in range(1, x.dim()) if d != channel_axis]
    if channel_axis == 0 or len(positional) != 1:
        raise ValueError(
            f"{fn}: lengths needs an input with exactly one sequence axis besides the batch "
            f"axis 0 and the channel axis {channel_axis}, got input of shape {list(x.shape)}; "
            f"pass mask instead"
        )
    lengths = torch.as_tensor(lengths, device=x.device)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.dim() != 1:
        raise TypeError(
            f"{fn}: lengths must be a 1-D integer tensor, got dtype "
            f"{lengths.dtype} and shape {list(lengths.shape)}"
        )
    if lengths.shape[0] != x.shape[0]:
        raise ValueError(
            f"{fn}: lengths must have one entry per sample ({x.shape[0]}), got {lengths.shape[0]}"
        )
    sequence_axis = positional[0]
    max_length = x.shape[sequence_axis]
    if (
        not torch.compiler.is_compiling()
        and lengths.numel()
        and (bool((lengths < 0).any()) or bool((lengths > max_length).any()))
    ):
        raise ValueError(
            f"{fn}: lengths must be in [0, {max_length}] (the size of the "
            f"sequence axis {sequence_axis}), got {lengths.tolist()}"
        )
    # (batch, length): the input's axes without the channel axis, in order.
    return lengths_to_mask(lengths, max_length)
