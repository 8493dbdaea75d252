"""Which implementation runs a normalization, and how to choose it.

- ``"numba"``: the fused CPU kernels (``normlab.kernels.cpu``), registered as torch custom
  ops. They take contiguous float32/float64 CPU tensors in the layouts they were written
  for (``normlab.spec.layout``), and float16/bfloat16 in the rows layout (LayerNorm,
  RMSNorm and the fused add over trailing axes; float32 arithmetic, output rounded once).
  Rows of any strides too: evenly spaced rows of contiguous features are read in place by
  a planned call without gradient, other strides as one contiguous copy.
- ``"triton"``: the fused GPU kernels (``normlab.kernels.gpu``, the optional extra
  ``normlab[gpu]``), behind the same custom ops. They take contiguous float32, float16 and
  bfloat16 CUDA tensors in the same layouts (float64 runs the composite: the kernels
  accumulate in float32). On CPU tensors "triton" can be forced only when
  ``TRITON_INTERPRET=1`` was set before Triton was imported: Triton's interpreter then runs
  the kernels, slowly, which is how they are tested without a GPU.
- ``"torch"``: torch's own fused ops (``torch.native_layer_norm``, ``torch.rms_norm``,
  ``torch.native_group_norm``, ``torch.batch_norm`` in eval) where they compute what
  normlab computes: LayerNorm/RMSNorm without a mask (over trailing axes, or one axis
  moved last and back), GroupNorm/InstanceNorm without a mask, BatchNorm with given
  statistics; any device, dtype and strides (``normlab.backends.native``).
- ``"composite"``: plain torch operations with normlab's explicit backward; any device,
  dtype and layout.
- ``"auto"`` (default): on CUDA tensors ``"triton"`` where it applies (when installed); on
  CPU tensors, a call without gradient to LayerNorm/RMSNorm (over trailing axes, or one
  other axis), to GroupNorm/InstanceNorm without a mask or to BatchNorm with given
  statistics on a contiguous input (LayerNorm/RMSNorm over trailing axes: any strides)
  goes to ``"numba"`` at every size: once planned, its kernel is launched by address,
  faster than torch's op from one row on (``normlab.kernels.cpu.pointers``); evenly spaced
  rows are read in place, other strides copied once; other calls go to
  ``"numba"`` where it applies and the input has at least
  ``AUTO_MIN_ELEMENTS`` elements (below that, the fixed cost of a kernel call outweighs
  its speed), except the LayerNorm/RMSNorm/GroupNorm/InstanceNorm calls that ``"torch"``
  takes, which go to Numba from ``AUTO_TORCH_ELEMENTS`` on (``AUTO_TORCH_TRAINING_ELEMENTS``
  for a call that needs a gradient; LayerNorm/RMSNorm over one
  non-trailing axis, channels-first, from ``AUTO_TORCH_COLUMN_ELEMENTS`` on; BatchNorm
  with given statistics from ``AUTO_TORCH_GIVEN_ELEMENTS`` on); else
  ``"torch"`` where it applies (small, half-precision, strided and channels-first inputs,
  BatchNorm eval); ``"composite"`` otherwise. Each call signature is decided once
  (``normlab.backends.plans``). Under ``torch.onnx.export``, ``"torch"`` or
  ``"composite"`` only, so that the graph holds standard ONNX ops.

The environment variable ``NORMLAB_BACKEND`` sets the default for a process (and the
processes it spawns). Forcing ``"numba"`` or ``"triton"`` on an input it cannot take raises
a ValueError saying why, instead of silently running something else. ``last_used()`` tells
which backend ran the most recent normalization (in eager mode; inside ``torch.compile`` the
choice is made at trace time).

How a call is routed is ``normlab.backends.registry``: each family declares what it takes,
the registry decides once per call and ``record``s the family it chose.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator

BACKENDS = ("auto", "numba", "triton", "torch", "composite")

AUTO_MIN_ELEMENTS = 1 << 15

# (LayerNorm, RMSNorm, GroupNorm/InstanceNorm): below these sizes "auto" leaves the calls
# torch's own ops compute (the "torch" family) to them, not to the Numba kernels: torch's
# fused op behind normlab's per-call plan costs less than a kernel launch there. Since the
# kernels run by address without gradient (2026-12-08), the LayerNorm/RMSNorm bounds apply
# only to the calls that cannot (empty inputs), GroupNorm's to the strided ones. Measured
# with scripts/auto_crossover.py through the public modules (2 idle cores, 2 threads,
# 2026-12-07, torch time / kernel time, two runs): without a gradient LayerNorm 0.80 at
# 128K elements, 1.02-1.04 at 256K; RMSNorm (torch's CPU RMSNorm is not fused) 0.78-0.90 at
# 64K, 1.02-1.05 at 128K; GroupNorm/InstanceNorm 0.91-0.98 at 320K, 1.04-1.45 at 512K.
AUTO_TORCH_ELEMENTS = (1 << 18, 1 << 17, 1 << 19)

# The same bounds for a call that needs a gradient (a training step, forward and backward),
# where torch's own backward is harder to beat: LayerNorm 0.88-1.02 at 1M-2M elements,
# 1.12 at 4M; RMSNorm 1.07-1.10 at 128K; GroupNorm/InstanceNorm 0.93-1.07 at 2M, 1.03-1.16
# at 4M (same runs).
AUTO_TORCH_TRAINING_ELEMENTS = (1 << 22, 1 << 17, 1 << 22)

# (LayerNorm, RMSNorm) over one axis that is not the last (channels-first, the column
# kernels): the same rule, but torch's path there moves the axis last and pays a permuted
# copy, so the Numba kernel is at least even from AUTO_MIN_ELEMENTS on (measured 2026-12-04
# on a shared 2-core machine, float32 (N, C, 16, 16), torch time / kernel time: at 16K
# elements 0.84-1.10, at 32K 1.01-1.61, at 64K and above 1.2-2.5; docs/benchmarks.md).
AUTO_TORCH_COLUMN_ELEMENTS = (1 << 15, 1 << 15)

# BatchNorm with given statistics (eval): below this size "auto" leaves it to the "torch"
# family (x - mean, then torch's op) rather than the Numba kernel, whose launch (float64
# scale and shift, array views, thread sync) costs about 50 us. 2 idle cores, 2026-12-07,
# (N, C, H, W) float32, microseconds torch family / kernel: 12K elements 17 / 53, 50K 30 /
# 61, 200K 59 / 74, 4M 1808 / 771 (docs/benchmarks.md).
AUTO_TORCH_GIVEN_ELEMENTS = 1 << 18


class _State(threading.local):
    backend: str | None = None  # set by ``use`` (a class default: no failed lookup per call)


_state = _State()
_default = os.environ.get("NORMLAB_BACKEND", "auto")
_last = {"backend": None}


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend requested for this thread (``use`` overrides ``set_backend``)."""
    return _state.backend or _default


def set_backend(name: str) -> None:
    """Set the process-wide default backend: "auto", "numba", "triton", "torch" or
    "composite"."""
    global _default
    _default = _check(name)


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Run the block with ``name`` as the backend (this thread only)."""
    previous = _state.backend
    _state.backend = _check(name)
    try:
        yield
    finally:
        _state.backend = previous


def last_used() -> str | None:
    """ "numba", "triton", "torch" or "composite": the backend of the most recent normalization
    call."""
    return _last["backend"]


def record(name: str) -> None:
    """Record ``name`` as the backend of the latest normalization (the registry calls this
    once per call)."""
    _last["backend"] = name


_NUMBA = importlib.util.find_spec("numba") is not None


def numba_available() -> bool:
    """True if Numba is installed (the kernels compile at their first call)."""
    return _NUMBA


def triton_available() -> bool:
    """True if Triton is installed (``normlab[gpu]``; the kernels compile at first call)."""
    from normlab.kernels.gpu import triton_available

    return triton_available()


_check(_default)
