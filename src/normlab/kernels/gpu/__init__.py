"""Fused GPU kernels in Triton: one module per kernel family (``rows``, ...).

Importing this package does not import Triton (it is the optional extra ``normlab[gpu]``);
only a kernel module does, when an op first runs it. A family module holds ``@triton.jit``
kernels and their launchers: plain functions that take torch tensors (contiguous, float32,
float16 or bfloat16; statistics float32) and return new ones. They know nothing of
``nn.Module`` or autograd: ``normlab.ops.kernel_ops`` registers them as the CUDA
implementations of its custom ops (its ``TRITON`` table).

With ``TRITON_INTERPRET=1`` in the environment *before Triton is first imported*, Triton's
interpreter runs the same kernels on CPU tensors (slowly): that is how they are tested
without a GPU (tests/conftest.py sets it when no CUDA device is present).
"""

from __future__ import annotations

import importlib.util
import os

_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True if Triton is importable (``pip install normlab[gpu]``)."""
    return _TRITON


def interpreting() -> bool:
    """True if Triton kernels run in the interpreter (``TRITON_INTERPRET=1``): they then
    take CPU tensors too."""
    return _TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"
