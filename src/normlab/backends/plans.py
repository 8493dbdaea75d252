"""Per-call plans: the registry's decision for a LayerNorm/RMSNorm call, remembered.

A decode step calls the same norm on the same shapes thousands of times, and at that size
deciding anew (the argument checks, the spec, the layout, the routing) costs several times
torch's own kernel. So the first call of a signature takes the full path (the checks of
``normlab.checks``, the ``NormSpec``, ``registry.decide``) and the family that won turns its
decision into a runner ``(x, weight, bias, eps) -> y`` (``Family.plan``); later calls with
the same ``key`` run that runner directly. Nothing is decided twice: the runner is the
decision, made once.

The key holds everything the checks and the decision read: the entry point, the arguments
(``normalized_shape``, ``dim``, ``eps``), the input's shape, dtype, device and contiguity
(its strides where it is not contiguous: the Numba rows kernel reads evenly spaced rows in
place), the parameters' shapes, dtypes and devices, whether the call needs a gradient ("auto"'s
size bounds differ, and the torch family refuses float16/bfloat16 gradients), the requested
backend and the size thresholds of "auto".
Plans are eager only: no key (the full path) under ``torch.compile``, TorchScript tracing
(``torch.onnx.export(dynamo=False)``), for tensor subclasses (the fake and functional
tensors of ``torch.export`` and the dynamo ONNX exporter) and for a tensor ``eps``.
"""

from __future__ import annotations

import torch

from normlab import backends

MAX_PLANS = 1024  # distinct signatures kept; beyond that the memo starts over
NO_PLAN = False  # remembered for signatures whose family has no runner: the full path

_TENSORS = (torch.Tensor, torch.nn.Parameter)
_plans: dict = {}


_tracing_state = torch._C._get_tracing_state
_is_compiling = torch.compiler.is_compiling
_Tensor = torch.Tensor
_grad_enabled = torch.is_grad_enabled


def key(fn: str, x, eps, tensors, *args):
    """The memo key of a call (``tensors``: its weight, bias and statistics, each a tensor or
    None; ``args``: its other arguments, hashable), or None when the call must take the full
    path."""
    if (
        type(x) is not _Tensor
        or type(eps) is not float
        or _tracing_state() is not None
        or _is_compiling()
    ):
        return None
    # whether the call needs a gradient: "auto"'s size bounds differ then, and the torch
    # family refuses float16/bfloat16 gradients
    grad = _grad_enabled() and x.requires_grad
    parts = [
        fn,
        eps,
        *args,
        x.shape,
        x.dtype,
        x.device,
        x.is_contiguous() or x.stride(),  # strides: where a kernel reads strided rows
        backends.get_backend(),
        backends.AUTO_MIN_ELEMENTS,
        backends.AUTO_TORCH_ELEMENTS,
        backends.AUTO_TORCH_TRAINING_ELEMENTS,
        backends.AUTO_TORCH_COLUMN_ELEMENTS,
        backends.AUTO_TORCH_GIVEN_ELEMENTS,
    ]
    for t in tensors:
        if t is None:
            parts.append(None)
        elif type(t) in _TENSORS:
            parts.append((t.shape, t.dtype, t.device))
            if not grad and t.requires_grad:
                grad = _grad_enabled()
        else:
            return None
    parts.append(grad)
    return tuple(parts)


def get(key):
    """The runner remembered under ``key``: a callable, ``NO_PLAN``, or None (not seen)."""
    try:
        return _plans.get(key)
    except TypeError:  # an unhashable argument (normalized_shape as a list): no memo
        return NO_PLAN


def put(key, runner) -> None:
    """Remember ``runner`` (or ``NO_PLAN``) for ``key``."""
    try:
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        _plans[key] = NO_PLAN if runner is None else runner
    except TypeError:
        pass


def clear() -> None:
    """Forget every plan (tests; after changing what a family takes)."""
    _plans.clear()
