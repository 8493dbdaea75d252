"""The backend registry: which family runs a normalization, decided once per call.

A call (``Call``: a ``normlab.spec.NormSpec``, the input and its tensors) reaches ``run``,
``run_add`` or ``run_power`` from ``normlab.ops``. ``decide`` picks the family, records it
(``normlab.backends.record``; ``last_used()`` reports it) and nothing below decides again:

- the backend requested (``normlab.backends.get_backend()``) names a family, or "auto":
  Triton for CUDA tensors, Numba for the others;
- that family's ``takes(call)`` returns None or the reason it cannot take the call (device,
  dtype, contiguity, and the kernel layout of ``normlab.spec.layout``, which it stores on
  the call); "auto" also leaves inputs under ``AUTO_MIN_ELEMENTS`` to the composite;
- a refused forced family raises a ValueError with the reason; "auto" falls back to the
  composite, which takes every call (and the calls with a statistics hook, SyncBatchNorm's,
  whatever the backend).

Each ``Family`` declares ``takes`` and how it runs each kind of call: ``forward`` (the
normalization), ``add`` (the fused residual add) and ``power`` (PowerNorm after warmup).
Their backward and fake (meta) implementations are attached where they run: the
composite's in ``normlab.ops.composite_op`` (an autograd.Function; plain torch operations
need no fake), the kernels' in the custom ops of ``normlab.ops.kernel_ops``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from normlab import backends, spec
from normlab.backends import _last, native, plans
from normlab.kernels import composite
from normlab.kernels.gpu import interpreting
from normlab.ops import composite_op, kernel_ops

KERNEL_DTYPES = {
    # float16/bfloat16: the rows kernels only (``ROWS_ONLY_DTYPES``).
    "numba": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    # float64 is left to the composite: the Triton kernels accumulate in float32.
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}

# Dtypes of KERNEL_DTYPES that a family's kernels take in the rows layout only (LayerNorm,
# RMSNorm, the fused add): the Numba group, channel and column kernels read float32/float64.
ROWS_ONLY_DTYPES = {"numba": (torch.float16, torch.bfloat16), "triton": ()}

# Layouts whose custom ops have a Triton implementation (``kernel_ops.TRITON``); "columns"
# (LayerNorm/RMSNorm over a non-trailing axis) is Numba-only.
TRITON_LAYOUTS = frozenset({"rows", "groups", "channels"})

ADD_REASON = "the fused add needs the normalized axes trailing and a contiguous residual"


class Call:
    """One normalization call as the registry sees it. ``mean``/``var`` are the given
    statistics (keepdim; PowerNorm: ``var`` is the running quadratic mean), ``residual``
    the fused add's, ``sync`` a statistics hook (SyncBatchNorm's: the composite only).
    ``layout`` is set by the ``takes`` of the family that accepts the call."""

    __slots__ = (
        "bias", "eps", "exporting", "layout", "mask", "mean", "residual", "spec", "stats", "sync",
        "var", "weight", "x",
    )  # fmt: skip

    def __init__(
        self,
        spec,
        x,
        weight,
        bias,
        eps,
        mean=None,
        var=None,
        mask=None,
        residual=None,
        sync=None,
        stats=True,
    ):
        self.spec, self.x, self.weight, self.bias, self.eps = spec, x, weight, bias, eps
        self.mean, self.var, self.mask, self.residual = mean, var, mask, residual
        self.sync = sync
        self.stats = stats  # False: the caller discards the statistics (a family may skip them)
        self.layout = None
        self.exporting = False  # torch.onnx.export is tracing (set by "auto")


@dataclass(frozen=True)
class Family:
    """A backend family: what it takes and how it runs each kind of call."""

    name: str
    takes: Callable[[Call], str | None]
    forward: Callable  # (call) -> (y, mean, var)
    add: Callable  # (call) -> (y, x + residual)
    power: Callable  # (call, nu, alpha_bkw) -> y
    # (call) -> runner (x, weight, bias, eps) -> y for the calls of its plan key, or None
    plan: Callable = lambda call: None


# --- what a kernel family takes ------------------------------------------------------------


def _device_reason(x, family: str) -> str | None:
    """Why ``family`` cannot take x's device or dtype, or None."""
    if family == "numba":
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
    if x.dtype not in KERNEL_DTYPES[family]:
        names = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES[family])
        return f"input dtype {x.dtype}, the {family} kernels take {names}"
    return None


def _param_ok(x, t) -> bool:
    return t is None or (t.dim() == x.dim() and t.dtype == x.dtype and t.device == x.device)


def _kernel_takes(family: str):
    def takes(call: Call) -> str | None:
        x = call.x
        reason = _device_reason(x, family)
        if reason is not None:
            return reason
        if x.numel() == 0:
            return "empty input"
        for t in (call.weight, call.bias, call.mean, call.var):
            if not _param_ok(x, t):
                return "parameters or statistics of another dtype, device or rank than the input"
        mask = call.mask
        if mask is not None and (mask.dim() != x.dim() or mask.device != x.device):
            return "mask of another rank or device than the input"
        affine = call.weight is not None or call.bias is not None
        found = spec.layout(call.spec, x.shape, affine)
        if isinstance(found, str):
            return found
        if not x.is_contiguous() and (family != "numba" or found.kind != "rows"):
            return "input is not contiguous (the Numba kernels take strided rows only)"
        if call.residual is not None and (
            found.kind != "rows" or not call.residual.is_contiguous()
        ):
            return ADD_REASON
        if call.spec.stats == "power" and found.kind != "channels":
            return "PowerNorm's kernels are channel kernels"
        if family == "triton" and found.kind not in TRITON_LAYOUTS:
            return f"no Triton kernel for the {found.kind} layout"
        if found.kind != "rows" and x.dtype in ROWS_ONLY_DTYPES[family]:
            return (
                f"input dtype {x.dtype}: the {family} kernels take half precision in the rows "
                f"layout only (LayerNorm/RMSNorm over trailing axes), not the {found.kind} layout"
            )
        call.layout = found
        return None

    return takes


def _composite_takes(call: Call) -> None:
    return None


# --- how the kernel families run a call -----------------------------------------------------


def _flat(t):
    return None if t is None else t.reshape(-1)


def _kernel_forward(family: str):
    def forward(call: Call):
        x, layout, eps = call.x, call.layout, float(call.eps)
        acc = composite.accumulation_dtype(x.dtype)
        keep = call.spec.keep_shape(x.shape)
        # strided rows: one copy (a plan without gradient reads evenly spaced rows in place)
        view = x.reshape(layout.view).contiguous()
        w, b = _flat(call.weight), _flat(call.bias)
        if layout.kind == "rows":
            y, mean, rstd = kernel_ops.row_norm(view, w, b, eps, call.spec.center, family)
            var = rstd.pow(-2) - eps  # for the record only: no caller of rows uses it
        elif layout.kind == "columns":
            y, mean, rstd = kernel_ops.column_norm(view, w, b, eps, call.spec.center, family)
            var = rstd.pow(-2) - eps
        elif layout.kind == "groups":
            m = layout.kernel_mask(x, call.mask)
            y, mean, var, _ = kernel_ops.group_norm(view, w, b, layout.groups, eps, m, family)
        elif call.spec.stats == "given":
            mean, var = call.mean, call.var
            y, _, _ = kernel_ops.batch_norm_given(view, w, b, _flat(mean), _flat(var), eps, family)
            return y.reshape(x.shape), mean.to(acc), var.to(acc)
        else:
            m = layout.kernel_mask(x, call.mask)
            y, mean, var, _, _ = kernel_ops.batch_norm_train(view, w, b, eps, m, family)
        return y.reshape(x.shape), mean.reshape(keep).to(acc), var.reshape(keep).to(acc)

    return forward


def _kernel_add(family: str):
    def add(call: Call):
        x, view = call.x, call.layout.view
        y, total, _, _ = kernel_ops.add_row_norm(
            x.reshape(view).contiguous(),  # strided rows: one copy
            call.residual.reshape(view),
            _flat(call.weight),
            _flat(call.bias),
            float(call.eps),
            call.spec.center,
            family,
        )
        return y.reshape(x.shape), total.reshape(x.shape)

    return add


def _kernel_plan(family: str):
    def plan(call: Call):
        """Rows (LayerNorm/RMSNorm), columns (LayerNorm/RMSNorm over a non-trailing axis),
        groups (GroupNorm/InstanceNorm) and BatchNorm with given statistics: the view is
        fixed by the plan key (shape, contiguity); weight, bias and statistics come flat."""
        layout, s = call.layout, call.spec
        if call.stats or call.residual is not None or s.masked:
            return None
        if layout.kind in ("rows", "columns") and s.stats == "batch":
            name = "row_norm" if layout.kind == "rows" else "column_norm"
            center = s.center

            def tail(eps):
                return eps, center
        elif layout.kind == "groups" and s.stats == "batch":
            name, groups = "group_norm", layout.groups

            def tail(eps):
                return groups, eps, None
        elif layout.kind == "channels" and s.stats == "given":
            name = "batch_norm_given"

            def tail(eps):
                return (eps,)
        else:
            return None
        view = layout.view
        if family == "numba" and name in ("row_norm", "column_norm") and _pointer_launch(call):
            from normlab.kernels.cpu import launchers

            x = call.x
            step = None if x.is_contiguous() else _row_step(x, view)
            copy = step is None and not x.is_contiguous()  # rows of other strides
            launch = launchers.norm_inference(layout.kind, view, x.dtype, center, step, copy)

            def inference(x, weight, bias, eps):
                _last["backend"] = "numba"
                return launch(x, weight, bias, eps)

            return inference
        if family == "numba" and name == "group_norm" and _groups_by_address(call):
            from normlab.kernels.cpu import launchers

            grouped = launchers.group_norm_inference(view, call.x.dtype, layout.groups)

            def groups_inference(x, weight, bias, eps):
                _last["backend"] = "numba"
                return grouped(x, weight, bias, eps)

            # it reads x by address: any view of the same contiguous memory (group_norm
            # hands it the input rather than the grouped view)
            groups_inference.by_address = True
            return groups_inference
        if family == "numba" and name == "batch_norm_given" and _given_by_address(call):
            from normlab.kernels.cpu import launchers

            given = launchers.batch_norm_given_inference(view, call.x.dtype)

            def given_inference(x, weight, bias, eps, mean, var):
                _last["backend"] = "numba"
                return given(x, weight, bias, eps, mean, var)

            return given_inference
        op, launcher = getattr(kernel_ops, name), kernel_ops.implementation(family, name)

        def run(x, weight, bias, eps, *stats):
            backends.record(family)
            tensors = (
                x.reshape(view).contiguous(),  # strided rows: one copy
                None if weight is None else weight.reshape(-1),
                None if bias is None else bias.reshape(-1),
                *stats,
            )
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
                return op(*tensors, *tail(eps), family)[0].view(x.shape)
            # no graph to record: the launcher itself, without the op's dispatch
            return launcher(*tensors, *tail(eps))[0].view(x.shape)

        return run

    return plan


_FLOATS = (torch.float32, torch.float64)
_HALVES = (torch.bfloat16, torch.float16)


def _addressable(call: Call, dtypes, tensors, rows=False) -> bool:
    """What every by-address launch needs of the calls of ``call``'s plan key (the key fixes
    all of it): no gradient, a non-empty input of one of ``dtypes``, C-contiguous unless
    ``rows`` (the rows kernel reads evenly spaced rows in place and a contiguous copy of
    other strides), and ``tensors`` (parameters, statistics) of its dtype or None."""
    x = call.x
    return (
        not _needs_grad(call)
        and x.numel() > 0
        and (rows or x.is_contiguous())
        and x.dtype in dtypes
        and all(t is None or t.dtype == x.dtype for t in tensors)
    )


def _row_step(x, view) -> int | None:
    """The bytes from one row's start to the next's when x is ``view`` = (rows, N): rows of
    N contiguous elements evenly spaced (C-contiguous; or a view of each row's first
    features, a split of a fused projection; or an expanded row); None for other strides."""
    try:
        rows = x.view(view)
    except RuntimeError:
        return None
    if view[1] > 1 and rows.stride(1) != 1:
        return None
    return rows.stride(0) * x.element_size()


def _pointer_launch(call: Call) -> bool:
    """Whether the rows or columns kernel can run ``call``'s plan by address
    (``launchers.norm_inference``): float16/bfloat16 and strides over trailing axes only."""
    rows = call.layout == -1 or getattr(call.layout, "kind", None) == "rows"
    dtypes = _FLOATS + _HALVES if rows else _FLOATS
    return _addressable(call, dtypes, (call.weight, call.bias), rows)


def _given_by_address(call: Call) -> bool:
    """Whether the channels kernel can run ``call``'s plan (BatchNorm with given statistics)
    by address (``launchers.batch_norm_given_inference``): statistics of x's dtype, without
    gradient."""
    mean, var = call.mean, call.var
    return (
        call.spec.stats == "given"
        and call.spec.center  # BatchNorm; not PowerNorm's quadratic mean
        and mean is not None
        and var is not None
        and not (mean.requires_grad or var.requires_grad)
        and _addressable(call, _FLOATS, (call.weight, call.bias, mean, var))
    )


def _groups_by_address(call: Call) -> bool:
    """Whether the groups kernel can run ``call``'s plan (GroupNorm/InstanceNorm in the
    groups layout) by address (``launchers.group_norm_inference``): no mask."""
    return (
        getattr(call.layout, "kind", None) == "groups"
        and call.mask is None
        and not call.spec.masked
        and call.spec.stats == "batch"
        and _addressable(call, _FLOATS, (call.weight, call.bias))
    )


def _needs_grad(call: Call) -> bool:
    """Whether a tensor of ``call`` needs a gradient under the current grad mode."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (call.x, call.weight, call.bias, call.residual)
    )


def _composite_add(call: Call):
    total = call.x + call.residual
    s = spec.NormSpec(call.spec.reduction, call.spec.feature, call.spec.center)
    y, _, _ = run(Call(s, total, call.weight, call.bias, call.eps))
    return y, total


def _power(family: str):
    def power(call: Call, nu, alpha_bkw):
        from normlab.ops import power_norm

        return power_norm.apply(family, call, nu, alpha_bkw)

    return power


COMPOSITE = Family(
    "composite", _composite_takes, composite_op.forward, _composite_add, _power("composite")
)
TORCH = Family("torch", native.takes, native.forward, native.add, _power("composite"), native.plan)
NUMBA, TRITON = (
    Family(
        name,
        _kernel_takes(name),
        _kernel_forward(name),
        _kernel_add(name),
        _power(name),
        _kernel_plan(name),
    )
    for name in ("numba", "triton")
)
FAMILIES = {family.name: family for family in (COMPOSITE, NUMBA, TRITON, TORCH)}


# --- the decision ------------------------------------------------------------------------


def _refusal(wanted: str, call: Call, reason: str) -> ValueError:
    if reason == ADD_REASON:
        return ValueError(
            f"backend {wanted!r} cannot run this fused add: it needs the normalized axes "
            "trailing and a contiguous residual"
        )
    x = call.x
    return ValueError(
        f"backend {wanted!r} cannot run this normalization (input {list(x.shape)} "
        f"{x.dtype} on {x.device}, reduction axes {call.spec.reduction}): {reason}. "
        "Use normlab.backends.use('auto') to fall back to the composite backend."
    )


def _exporting_onnx() -> str | None:
    """ "dynamo" or "torchscript" while ``torch.onnx.export`` traces with that exporter, else
    None. Reads the exporters' flags where this torch keeps them (``is_in_onnx_export``
    imports them anew on every call, which costs as much as a small norm); never imports
    torch.onnx itself."""
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    if flags is not None and getattr(flags, "_is_onnx_exporting", False):
        return "dynamo"
    if torch.compiler.is_compiling():
        return None  # the TorchScript exporter does not trace with dynamo
    script = sys.modules.get("torch.onnx._internal.torchscript_exporter._globals")
    if script is not None and script.GLOBALS.in_onnx_export:
        return "torchscript"
    onnx = sys.modules.get("torch.onnx")  # another torch version: ask it
    if flags is None and script is None and onnx is not None and onnx.is_in_onnx_export():
        return "dynamo"
    return None


def _auto(call: Call) -> Family:
    """ "auto": the fused kernel of the input's device (Triton on CUDA; Numba on the CPU
    from ``AUTO_MIN_ELEMENTS`` elements on, below which a launch costs more than it saves;
    LayerNorm/RMSNorm that torch's ops take from ``AUTO_TORCH_ELEMENTS`` on, over one
    non-trailing axis from ``AUTO_TORCH_COLUMN_ELEMENTS`` on) where it takes
    the call, else torch's own op where it computes the same thing, else the
    composite. Under ONNX export, torch's ops (they export as standard ONNX normalization
    ops) or the composite (plain arithmetic): never a custom op ONNX does not know."""
    exporting = _exporting_onnx()
    call.exporting = exporting is not None
    if exporting is None:
        kernel = TRITON if call.x.device.type == "cuda" else NUMBA
        small = False
        if kernel is NUMBA:
            if (_by_address(call) or _given_by_address(call)) and kernel.takes(call) is None:
                return kernel
            if (
                TORCH.takes(call) is None
                and kernel.takes(call) is None
                and _groups_by_address(call)
            ):
                return kernel  # (the groups layout: known after the kernel's takes)
            n = call.x.numel()
            small = n < backends.AUTO_MIN_ELEMENTS or (
                call.spec.stats in ("batch", "given")
                and TORCH.takes(call) is None
                and n < _torch_bound(call)
            )
        if not small and kernel.takes(call) is None:
            return kernel
        if (
            small
            and call.x.dtype in native.HALF
            and TORCH.takes(call) is not None
            and kernel.takes(call) is None
        ):
            # A small float16/bfloat16 call torch's ops do not take (a gradient): the
            # kernel's launch costs less than the composite's float32 round trips.
            return kernel
    elif exporting == "torchscript":
        # That exporter knows aten::layer_norm and batch_norm, not aten::rms_norm, and
        # exports the composite's autograd.Function wrongly: refuse rather than mis-export.
        reason = "RMSNorm" if not call.spec.center else TORCH.takes(call)
        if reason is not None:
            raise RuntimeError(
                "normlab: the TorchScript ONNX exporter (torch.onnx.export(..., "
                f"dynamo=False)) cannot export this normalization ({reason}); export with "
                "torch.onnx.export(..., dynamo=True), which exports every normlab layer"
            )
    return TORCH if TORCH.takes(call) is None else COMPOSITE


def _by_address(call: Call) -> bool:
    """LayerNorm/RMSNorm over the trailing axes or over one other axis (the calls torch's
    ops take; ``call.layout`` the axis), without a fused add, that the Numba rows or columns
    kernel runs by address once planned (``_pointer_launch``): faster than the torch family
    at every size measured (2026-12-08, 2 cores, inference; rows: 4 to 512K elements,
    float32 and bfloat16, 1.4-4x; docs/benchmarks.md), so "auto" takes the kernel for them."""
    return (
        call.residual is None
        and not call.stats
        and TORCH.takes(call) is None
        and type(call.layout) is int
        and _pointer_launch(call)
    )


def _torch_bound(call: Call) -> int:
    """The size from which "auto" prefers the Numba kernel to the torch family for a call
    the torch family took (its layout set): ``AUTO_TORCH_GIVEN_ELEMENTS`` for BatchNorm with
    given statistics; ``AUTO_TORCH_COLUMN_ELEMENTS`` for LayerNorm/RMSNorm over one moved
    axis (the column kernel's calls, where torch's path pays a permuted copy);
    ``AUTO_TORCH_ELEMENTS``, or ``AUTO_TORCH_TRAINING_ELEMENTS`` for a call that needs a
    gradient, for LayerNorm/RMSNorm over trailing axes and GroupNorm/InstanceNorm."""
    if call.spec.stats == "given":
        return backends.AUTO_TORCH_GIVEN_ELEMENTS
    groups = isinstance(call.layout, spec.Layout)  # GroupNorm/InstanceNorm
    if not groups and call.layout != -1:
        return backends.AUTO_TORCH_COLUMN_ELEMENTS[0 if call.spec.center else 1]
    bounds = (
        backends.AUTO_TORCH_TRAINING_ELEMENTS if _needs_grad(call) else backends.AUTO_TORCH_ELEMENTS
    )
    return bounds[2 if groups else 0 if call.spec.center else 1]


def decide(call: Call) -> Family:
    """The family that runs ``call`` (see the module docstring); records it."""
    wanted = backends.get_backend()
    family = COMPOSITE
    # A statistics hook (SyncBatchNorm) runs on the composite whatever the backend: the
    # kernels compute their statistics locally.
    if wanted == "auto" and call.sync is None:
        family = _auto(call)
    elif wanted != "composite" and call.sync is None:
        reason = FAMILIES[wanted].takes(call)
        if reason is not None:
            raise _refusal(wanted, call, reason)
        family = FAMILIES[wanted]
    backends.record(family.name)
    return family


def run(call: Call, plan_key=None):
    """(y, mean, var) of the normalization ``call``, statistics in the accumulation dtype
    and without gradient. ``plan_key``: the call's ``plans.key``; the decision is then
    remembered as the family's runner for the later calls of that key."""
    family = decide(call)
    out = family.forward(call)
    if plan_key is not None:
        plans.put(plan_key, family.plan(call))
    return out


def run_add(call: Call):
    """(normalized x + residual, x + residual)."""
    return decide(call).add(call)


def run_power(call: Call, nu, alpha_bkw):
    """PowerNorm after warmup (``spec.stats == "power"``): y, with the approximate backward
    that updates ``nu`` in place."""
    return decide(call).power(call, nu, alpha_bkw)
