"""What the custom ops around the fused kernels share: tensor <-> array views for the Numba
kernels, default parameters, the double-differentiable fallback of their backward, and how
one op runs the Numba kernel or the Triton one.

Which implementation runs
-------------------------
A custom op ``normlab::<name>`` has a CPU implementation (the Numba kernel) and, when its
family has a Triton kernel, a CUDA one (``cuda_impl``). Which one runs is decided per call
from the first tensor argument (x, or dy for a backward) by ``runs_triton``:

- a CUDA tensor runs ``cuda_impl`` (Triton);
- a CPU tensor runs the Numba ``impl``, except when the backend in force at the forward
  call is "triton" (``normlab.backends.use("triton")``; ``normlab.ops.dispatch`` allows that
  on CPU only with ``TRITON_INTERPRET=1``): then ``cuda_impl`` runs, in Triton's
  interpreter. This is how the whole module -> functional -> op -> Triton path is tested
  without a GPU.

In eager mode the forward records its choice in ``ctx.triton`` and the backward follows it
(``loss.backward()`` may run outside the ``use("triton")`` block). In a compiled graph each
op decides when it executes, so a graph compiled under ``use("triton")`` on CPU and run
outside it runs Numba (same numbers, to the tolerances; float16/bfloat16 CPU input then
fails: the interpreted path is a test device, not a CPU backend).

Statistics dtype: float64 for CPU tensors, float32 for CUDA tensors (``stats_dtype``), the
same for every implementation, so the fake (meta) implementations can say which from the
device alone. A ``cuda_impl`` computes float32 statistics and returns them as
``stats_dtype(x)`` (a no-op on CUDA; widened to float64 in the interpreter). Backward
implementations take the statistics in either dtype.

Wiring a family (what ``fused_rows`` does)::

    def _cuda_forward(x, weight, ...):         # same signature and outputs as the impl
        from normlab.kernels.gpu import rows   # imports Triton only when it runs
        y, mean, rstd = rows.row_norm_forward(...)
        return y, mean.to(stats_dtype(x)), rstd.to(stats_dtype(x))

    op_backward = backward_op("op_backward", _numba_backward, _fake, cuda_impl=_cuda_backward)
    op = fused_op("op", _numba_forward, _fake, _setup, _backward, cuda_impl=_cuda_forward)

and in ``_backward``: ``op_backward(ctx, dy, ...)``. Fakes allocate statistics with
``fake_stats``. Then add the layout to ``dispatch.TRITON_LAYOUTS``.
"""

from __future__ import annotations

import numpy as np
import torch

from normlab import backends
from normlab.kernels.gpu import interpreting

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
    """Statistics of the Numba kernels are kept in float64 whatever the input dtype: the
    saved mean of a float32 input with a large offset (1e4 + 1e-3 noise) would otherwise
    lose the noise."""
    return torch.empty(shape, dtype=torch.float64, device=x.device)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the statistics the fused ops return for ``x``'s device: float64 on the
    CPU, float32 on CUDA (the Triton kernels accumulate in float32)."""
    return torch.float64 if x.device.type == "cpu" else torch.float32


def fake_stats(shape, x: torch.Tensor) -> torch.Tensor:
    """Statistics as a fake implementation allocates them (the dtype of ``stats_dtype``)."""
    return x.new_empty(shape, dtype=stats_dtype(x))


def runs_triton(x: torch.Tensor) -> bool:
    """True if an op called on ``x`` runs its Triton implementation (see the module
    docstring): always on CUDA; on the CPU only with backend "triton" in the interpreter."""
    if x.device.type != "cpu":
        return True
    return backends.get_backend() == "triton" and interpreting()


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


def _device_switch(impl, cuda_impl):
    """The implementation to call for the arguments' device (``runs_triton`` on the first)."""
    if cuda_impl is None:
        return impl

    def run(*args):
        return (cuda_impl if runs_triton(args[0]) else impl)(*args)

    return run


def _custom_op(name: str, impl, fake, cuda_impl):
    """``normlab::<name>``: ``impl`` on CPU (or the device switch, which also reaches the
    interpreted Triton kernel), ``cuda_impl`` on CUDA."""
    op = torch.library.custom_op(f"normlab::{name}", impl, mutates_args=(), device_types="cpu")
    if cuda_impl is not None:
        op.register_kernel("cpu", _device_switch(impl, cuda_impl))
        op.register_kernel("cuda", cuda_impl)
    op.register_fake(fake)
    return op


def fused_op(
    name: str,
    impl,
    fake,
    setup,
    backward,
    differentiable_outputs: int = 1,
    cuda_impl=None,
):
    """The kernel's forward ``impl`` as the torch custom op ``normlab::<name>`` (with its
    ``fake`` implementation and autograd ``setup``/``backward``), and an eager twin: a
    torch.autograd.Function with the same setup and backward that calls the implementation
    directly. ``cuda_impl`` (same signature and outputs) is the Triton implementation, run
    on CUDA tensors and, interpreted, on CPU ones (see the module docstring).

    Returns a function that runs the custom op while ``torch.compile`` traces (so the graph
    holds one opaque op and no graph break) and the twin otherwise: the custom-op dispatcher
    costs about 100 us a call in eager mode, more than the kernel on small inputs. In
    ``backward``, ``ctx.traced`` tells which of the two recorded the graph and, in eager
    mode, ``ctx.triton`` which implementation the forward ran; a ``BackwardOp`` called with
    ``ctx`` follows both."""
    op = _custom_op(name, impl, fake, cuda_impl)

    def setup_context(traced):
        def set_up(ctx, inputs, output):
            ctx.traced = traced
            if traced:
                ctx.triton = None  # each op of the compiled graph decides when it runs
            ctx.mark_non_differentiable(*output[differentiable_outputs:])
            setup(ctx, inputs, output)

        return set_up

    op.register_autograd(backward, setup_context=setup_context(True))

    set_up_eager = setup_context(False)

    def forward(ctx, *args):  # ctx-style forward: no per-call signature binding
        ctx.triton = cuda_impl is not None and runs_triton(args[0])
        output = (cuda_impl if ctx.triton else impl)(*args)
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


class BackwardOp:
    """A backward kernel both ways: ``op``, the custom op ``normlab::<name>`` that compiled
    graphs record, and its implementations called directly (eager). ``backward(ctx, *args)``
    calls the one matching how the forward ran: the op when ``ctx.traced``, else the
    Triton implementation if the forward ran Triton (``ctx.triton``), else the Numba one."""

    def __init__(self, name: str, impl, fake, cuda_impl=None):
        self.op = _custom_op(name, impl, fake, cuda_impl)
        self.impl, self.cuda_impl = impl, cuda_impl
        self.__doc__ = impl.__doc__

    def __call__(self, ctx, *args):
        if ctx.traced:
            return self.op(*args)
        return (self.cuda_impl if ctx.triton else self.impl)(*args)


def backward_op(name: str, impl, fake, cuda_impl=None) -> BackwardOp:
    """A backward kernel as the custom op ``normlab::<name>`` (for compiled graphs) and its
    eager call; ``cuda_impl`` as in ``fused_op``."""
    return BackwardOp(name, impl, fake, cuda_impl)
