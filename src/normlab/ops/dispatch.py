"""Choosing the backend of one normalization: which fused kernel family (if any) takes it.

``normalize`` describes a norm by its reduction axes and the broadcast shapes of its
parameters, statistics and mask. Three layouts have Numba kernels (``normlab.kernels.cpu``),
and those in ``TRITON_LAYOUTS`` Triton kernels (``normlab.kernels.gpu``) behind the same
custom ops; the layout rules below are the same for both:

- rows: the reduction axes are the trailing axes and the parameters span exactly them
  (LayerNorm, RMSNorm): x is viewed as (rows, features).
- groups: x is (N, G, *rest), the reduction axes are all of ``rest``, and the parameters vary
  along G and optionally the first axis of ``rest`` (GroupNorm's grouped view
  (N, G, C/G, S), InstanceNorm's (N, C, *spatial)): x is viewed as (N, C, S).
- channels: every axis but one is reduced and the parameters and statistics vary along
  that one (BatchNorm, training or with given statistics): x is viewed as (A, C, B).

Numba takes float32/float64 CPU tensors; Triton float32/float16/bfloat16 CUDA tensors, and
CPU tensors in the interpreter (``TRITON_INTERPRET=1``, backend "triton" forced). Every other
case (other devices and dtypes, non-contiguous input, ghost batches, channels-first
LayerNorm, create_graph...) runs the composite backend. A ``Plan`` says which kernel family
and layout take the call and how to view x; ``plan`` returns a reason string when none does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from normlab import backends
from normlab.kernels.gpu import interpreting

KERNEL_DTYPES = {
    "numba": (torch.float32, torch.float64),
    # float64 is left to the composite: the Triton kernels accumulate in float32.
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}

# Layouts whose custom ops have a Triton (CUDA) implementation; a family joins this set
# when its ops are wired (``fused_common.fused_op(..., cuda_impl=...)``).
TRITON_LAYOUTS = frozenset({"rows", "groups", "channels"})


@dataclass(frozen=True)
class Plan:
    layout: str  # "rows" | "groups" | "channels"
    view: tuple[int, ...]  # x's shape as the kernel sees it
    groups: int = 1  # groups layout: the number of groups G
    mask_view: tuple[int, ...] | None = None  # the kernel's mask shape, or None
    mask_channel_axes: tuple[int, ...] = ()  # x's axes the mask is broadcast along
    kernel: str = "numba"  # the kernel family: "numba" | "triton"

    def kernel_mask(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask as the kernel reads it: uint8, contiguous, ``mask_view``-shaped."""
        if mask is None:
            return None
        shape = [1 if d in self.mask_channel_axes else n for d, n in enumerate(x.shape)]
        expanded = torch.broadcast_to(mask, shape).reshape(self.mask_view)
        return expanded.to(torch.uint8).contiguous()


def _varies(t: torch.Tensor | None, dims) -> bool:
    """True if the broadcast tensor ``t`` has a size other than 1 along any of ``dims``."""
    return t is not None and any(t.shape[d] != 1 for d in dims)


def _param_ok(x, t) -> bool:
    return t is None or (t.dim() == x.dim() and t.dtype == x.dtype and t.device == x.device)


def _rows(x, reduction, weight, bias, mean, var, mask, center):
    nd = x.dim()
    if reduction != tuple(range(nd - len(reduction), nd)):
        return "the reduction axes are not the trailing axes"
    if mean is not None or var is not None or mask is not None:
        return "rows kernels take neither given statistics nor a mask"
    full = (1,) * (nd - len(reduction)) + tuple(x.shape[d] for d in reduction)
    if (weight is not None and tuple(weight.shape) != full) or (
        bias is not None and tuple(bias.shape) != full
    ):
        return "the parameters do not span exactly the normalized axes"
    features = math.prod([x.shape[d] for d in reduction])
    return Plan("rows", (x.numel() // features, features))


def _groups(x, reduction, weight, bias, mean, var, mask, center):
    nd = x.dim()
    if nd < 3 or reduction != tuple(range(2, nd)):
        return "not a (N, G, *reduced) layout"
    if mean is not None or var is not None or not center:
        return "group kernels compute centred statistics themselves"
    # Channels per group: the first reduced axis when the parameters vary along it
    # (GroupNorm's (N, G, C/G, S) view); else 1 (InstanceNorm, or no parameters).
    per_group = x.shape[2] if any(t is not None and t.shape[2] != 1 for t in (weight, bias)) else 1
    channel_axes = (1,) if per_group == 1 else (1, 2)
    fixed = [d for d in range(nd) if d not in channel_axes]
    if _varies(weight, fixed) or _varies(bias, fixed):
        return "the parameters vary along a reduced axis other than the channel"
    if mask is not None and _varies(mask, channel_axes):
        return "the mask varies along the channel axis"
    n, g = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:]) // per_group
    return Plan(
        "groups",
        (n, g * per_group, spatial),
        groups=g,
        mask_view=None if mask is None else (n, spatial),
        mask_channel_axes=channel_axes,
    )


def _channels(x, reduction, weight, bias, mean, var, mask, center):
    nd = x.dim()
    kept = [d for d in range(nd) if d not in reduction]
    if len(kept) != 1:
        return "not a per-channel (BatchNorm) layout"
    (c,) = kept
    others = [d for d in range(nd) if d != c]
    if any(_varies(t, others) for t in (weight, bias, mean, var)):
        return "the parameters or statistics vary along a reduced axis"
    if any(t is not None and t.shape[c] != x.shape[c] for t in (weight, bias, mean, var)):
        # e.g. LayerNorm over all axes but one, whose normalized axes have size 1
        return "the parameters or statistics do not have one entry per channel"
    if (mean is None) != (var is None):
        return "only one of mean and var given"
    if mean is None and not center:
        return "channel kernels compute centred statistics (PowerNorm uses the composite)"
    if mask is not None and _varies(mask, (c,)):
        return "the mask varies along the channel axis"
    a, b = math.prod(x.shape[:c]), math.prod(x.shape[c + 1 :])
    mask_view = (a, b) if mask is not None else None
    return Plan("channels", (a, x.shape[c], b), mask_view=mask_view, mask_channel_axes=(c,))


def _device_reason(x, kernel: str) -> str | None:
    """Why the ``kernel`` family cannot take x's device or dtype, or None."""
    if kernel == "numba":
        if not backends.numba_available():
            return "numba is not installed"
        if x.device.type != "cpu":
            return f"input on {x.device.type}, the Numba kernels run on the CPU"
    else:
        if not backends.triton_available():
            return "triton is not installed (pip install normlab[gpu])"
        if x.device.type == "cpu" and not interpreting():
            return "input on cpu, the Triton kernels run on CUDA (or with TRITON_INTERPRET=1)"
        if x.device.type not in ("cpu", "cuda"):
            return f"input on {x.device.type}, the Triton kernels run on CUDA"
    if x.dtype not in KERNEL_DTYPES[kernel]:
        names = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES[kernel])
        return f"input dtype {x.dtype}, the {kernel} kernels take {names}"
    return None


def plan(x, weight, bias, reduction, center, mean, var, mask, kernel="numba") -> Plan | str:
    """The plan of the ``kernel`` family ("numba" or "triton") for this call, or the reason
    there is none."""
    reason = _device_reason(x, kernel)
    if reason is not None:
        return reason
    if not x.is_contiguous():
        return "input is not contiguous"
    if x.numel() == 0:
        return "empty input"
    if not all(_param_ok(x, t) for t in (weight, bias, mean, var)):
        return "parameters or statistics of another dtype, device or rank than the input"
    if mask is not None and (mask.dim() != x.dim() or mask.device != x.device):
        return "mask of another rank or device than the input"
    reasons = []
    for layout in (_rows, _groups, _channels):
        found = layout(x, reduction, weight, bias, mean, var, mask, center)
        if isinstance(found, Plan):
            if kernel == "triton" and found.layout not in TRITON_LAYOUTS:
                return f"no Triton kernel for the {found.layout} layout"
            return dataclasses.replace(found, kernel=kernel)
        reasons.append(found)
    return "; ".join(reasons)


def _kernel_family(x, wanted: str) -> str:
    """The family a backend asks for: "auto" takes Triton for CUDA tensors, Numba else."""
    if wanted in ("numba", "triton"):
        return wanted
    return "triton" if x.device.type == "cuda" else "numba"


def choose(x, weight, bias, reduction, center, mean, var, mask) -> Plan | None:
    """The plan to run with a fused kernel, or None for the composite backend; records the
    choice. A forced "numba" or "triton" backend that cannot take the call raises a
    ValueError with the reason."""
    wanted = backends.get_backend()
    if wanted == "composite":
        backends._record("composite")
        return None
    kernel = _kernel_family(x, wanted)
    found = plan(x, weight, bias, tuple(reduction), center, mean, var, mask, kernel)
    if wanted == "auto" and kernel == "numba" and x.numel() < backends.AUTO_MIN_ELEMENTS:
        found = f"fewer than {backends.AUTO_MIN_ELEMENTS} elements"
    if isinstance(found, str):
        if wanted != "auto":
            raise ValueError(
                f"backend {wanted!r} cannot run this normalization (input {list(x.shape)} "
                f"{x.dtype} on {x.device}, reduction axes {tuple(reduction)}): {found}. "
                "Use normlab.backends.use('auto') to fall back to the composite backend."
            )
        backends._record("composite")
        return None
    backends._record(kernel)
    return found


def choose_add(x, residual, weight, bias, reduction, center) -> Plan | None:
    """``choose`` for the fused residual add: the rows kernel, with a contiguous residual."""
    found = choose(x, weight, bias, reduction, center, None, None, None)
    if found is None or (found.layout == "rows" and residual.is_contiguous()):
        return found
    if backends.get_backend() != "auto":
        raise ValueError(
            f"backend {backends.get_backend()!r} cannot run this fused add: it needs the "
            "normalized axes trailing and a contiguous residual"
        )
    backends._record("composite")
    return None
