"""What the custom ops around the Numba kernels share: tensor <-> array views, default
parameters, and the double-differentiable fallback of their backward."""

from __future__ import annotations

import numpy as np
import torch

NO_MASK = np.zeros((0, 0), dtype=np.uint8)


def array(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a NumPy array (no copy; the tensor must be contiguous)."""
    return t.detach().numpy()


def param(t: torch.Tensor | None, n: int, fill: float, like: torch.Tensor) -> np.ndarray:
    """A (n,) parameter array: the tensor, or ones/zeros when the norm has none."""
    if t is None:
        return np.full(n, fill, dtype=array(like[:0]).dtype)
    return array(t.reshape(n).contiguous())


def mask_array(mask: torch.Tensor | None) -> np.ndarray:
    return NO_MASK if mask is None else array(mask)


def stats(shape, x: torch.Tensor) -> torch.Tensor:
    """Statistics are kept in float64 whatever the input dtype: the saved mean of a float32
    input with a large offset (1e4 + 1e-3 noise) would otherwise lose the noise."""
    return torch.empty(shape, dtype=torch.float64, device=x.device)


def launch(kernel, *args) -> None:
    """Run a Numba kernel with as many threads as torch uses (one for small inputs; the
    first argument is the kernel's input array)."""
    from normlab.kernels.cpu import runtime

    runtime.sync_threads(args[0].size)
    kernel(*args)


def differentiable_backward(ctx, dy, forward, inputs):
    """create_graph=True (double backward): differentiate ``forward(*inputs)``, the
    composite forward on the kernel's view, so the gradients carry a graph. ``inputs`` are
    the op's saved tensors whose gradients it returns (None entries allowed)."""
    needs = ctx.needs_input_grad[: len(inputs)]
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need and t is not None]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(forward(*inputs), wanted, dy, create_graph=True))
    return tuple(
        next(grads) if need and t is not None else None
        for t, need in zip(inputs, needs, strict=True)
    )
