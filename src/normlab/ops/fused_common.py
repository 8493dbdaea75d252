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


def fused_op(name: str, impl, fake, setup, backward, differentiable_outputs: int = 1):
    """The kernel's forward ``impl`` as the torch custom op ``normlab::<name>`` (with its
    ``fake`` implementation and autograd ``setup``/``backward``), and an eager twin: a
    torch.autograd.Function with the same setup and backward that calls ``impl`` directly.

    Returns a function that runs the custom op while ``torch.compile`` traces (so the graph
    holds one opaque op and no graph break) and the twin otherwise: the custom-op dispatcher
    costs about 100 us a call in eager mode, more than the kernel on small inputs. In
    ``backward``, ``ctx.traced`` tells which of the two recorded the graph (call the
    backward custom op when traced, its implementation when not)."""
    op = torch.library.custom_op(f"normlab::{name}", impl, mutates_args=(), device_types="cpu")
    op.register_fake(fake)

    def setup_context(traced):
        def set_up(ctx, inputs, output):
            ctx.traced = traced
            ctx.mark_non_differentiable(*output[differentiable_outputs:])
            setup(ctx, inputs, output)

        return set_up

    op.register_autograd(backward, setup_context=setup_context(True))

    set_up_eager = setup_context(False)

    def forward(ctx, *args):  # ctx-style forward: no per-call signature binding
        output = impl(*args)
        set_up_eager(ctx, args, output)
        return output

    eager = type(
        f"{name}_eager",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )

    def run(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return eager.apply(*args)

    run.op = op
    run.__doc__ = impl.__doc__
    return run


def backward_op(name: str, impl, fake):
    """A backward kernel as the custom op ``normlab::<name>`` (for compiled graphs)."""
    op = torch.library.custom_op(f"normlab::{name}", impl, mutates_args=(), device_types="cpu")
    op.register_fake(fake)
    return op
