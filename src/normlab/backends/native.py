"""The "torch" family: torch's own normalization ops, where their semantics equal normlab's.

normlab's kernels win on large contiguous tensors; torch's fused ops win where normlab has
no kernel or where a kernel launch costs more than the work: one decode token, bfloat16 and
float16 on the CPU, strided views, small LayerNorm over a channel axis (the ConvNeXt case,
which torch runs as permute, LayerNorm, permute back; from ``AUTO_TORCH_COLUMN_ELEMENTS`` on
the Numba column kernel wins). They also export: under ``torch.onnx.export``
they become ONNX's LayerNormalization, RMSNormalization and BatchNormalization. The family
takes exactly the calls whose result torch computes by the same formula:

- LayerNorm/RMSNorm: batch statistics over trailing axes that also carry the parameters
  (``torch.native_layer_norm``, ``torch._fused_rms_norm``; one non-trailing reduced axis is
  moved last and back, a view), no mask, no residual other than an added one;
- BatchNorm with given statistics (eval): ``F.batch_norm`` with ``training=False`` on the
  (A, C, B) view, every tensor of the input's dtype.

Masked, grouped, batch-statistics BatchNorm and PowerNorm calls stay with the kernels or the
composite. Gradients are torch's own (autograd through these ops, double backward included);
the statistics returned (LayerNorm/RMSNorm) are torch's mean and 1/rstd^2 - eps, as the row
kernels return them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from normlab import spec as _spec
from normlab.backends import _last
from normlab.backends import record as _record
from normlab.kernels import composite

HALF = (torch.float16, torch.bfloat16)


def _rows_axis(call) -> int | str:
    """-1 when the call is LayerNorm/RMSNorm over trailing axes; the axis to move last when
    it reduces one other axis (channels-first LayerNorm); else the reason neither holds."""
    s, nd = call.spec, call.x.dim()
    plain = call.weight is None and call.bias is None  # then the feature axes do not matter
    if s.stats == "batch" and (s.feature == s.reduction or plain):
        if s.reduction == tuple(range(nd - len(s.reduction), nd)):
            return -1
        if len(s.reduction) == 1:
            return s.reduction[0]
    return "not a LayerNorm/RMSNorm over trailing axes or over one axis"


def takes(call) -> str | None:
    """None if torch's ops compute ``call`` (see the module docstring), else the reason."""
    x, s = call.x, call.spec
    if not x.is_floating_point():
        return f"input dtype {x.dtype}"
    if s.masked or call.mask is not None:
        return "masked statistics"
    if call.sync is not None:
        return "synchronized statistics"
    tensors = [t for t in (call.weight, call.bias, call.mean, call.var) if t is not None]
    if (
        x.dtype in HALF
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (x, *tensors, call.residual) if t is not None)
    ):
        return "a float16/bfloat16 gradient (torch's is less exact than normlab's tolerance)"
    if any(t.dtype != x.dtype or t.device != x.device for t in tensors):
        return "parameters or statistics of another dtype or device than the input"
    if s.stats == "given":
        if not s.center or call.mean is None or call.var is None:
            return "given statistics without a mean (PowerNorm's quadratic mean)"
        if call.residual is not None:
            return "a fused add with given statistics"
        found = _spec.layout(s, x.shape, bool(tensors))
        if not isinstance(found, _spec.Layout) or found.kind != "channels":
            return "given statistics outside a per-channel (BatchNorm) layout"
        call.layout = found
        return None
    if s.stats != "batch":
        return "PowerNorm's running statistic"
    axis = _rows_axis(call)
    if isinstance(axis, str):
        found = _spec.layout(s, x.shape, bool(tensors))
        if not isinstance(found, _spec.Layout) or found.kind != "groups":
            return f"{axis}, nor a GroupNorm/InstanceNorm"
        if call.residual is not None or x.numel() == 0:
            return "a fused add or an empty input in a GroupNorm/InstanceNorm layout"
        call.layout = found
        return None
    if call.residual is not None and axis != -1:
        return "a fused add over a non-trailing axis"
    call.layout = axis  # what forward reads: -1 (trailing axes) or the axis to move last
    return None


def _pivot(x, k: int):
    """Each sample's first element over the trailing ``k`` axes, keepdim, without gradient."""
    if k == 1:
        return x.detach().narrow(-1, 0, 1)
    first = x.detach().flatten(x.dim() - k)[..., :1]
    return first.reshape(first.shape[:-1] + (1,) * k)


def _stats_out(x, mean, rstd, eps):
    acc = composite.accumulation_dtype(x.dtype)
    mean = mean.detach().to(acc)
    return mean, (rstd.detach().to(acc).pow(-2) - eps)


def _given(x, weight, bias, eps, mean, var, exporting=False):
    """BatchNorm of the (A, C, B) view x with the given (C,) statistics, as constants.
    torch's eval BatchNorm computes x * scale + (bias - mean * scale), whose two large terms
    cancel and lose a large mean's digits in float32 (1e4 + 1e-3 noise: outputs 0.1 off);
    it is handed x - mean (exact where x is near the mean) and a zero mean instead (1e-7
    off). float64 has the digits and half precision rounds its output anyway; an exported
    graph keeps torch's op as it is (ONNX BatchNormalization)."""
    mean, var = mean.detach(), var.detach()
    if x.dtype == torch.float32 and not exporting:
        x, mean = x - mean.view(-1, 1), torch.zeros_like(mean)
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)


def _given_channels_first(x):
    """``_given`` as one flat runner for an (N, C, *) input, the eval BatchNorm of a CNN at
    batch 1 (a few microseconds of work: each frame and tensor op here shows)."""
    if x.dtype != torch.float32:

        def given_plain(x, weight, bias, eps, mean, var):
            _last["backend"] = "torch"
            return torch.batch_norm(
                x, weight, bias, mean.detach(), var.detach(), False, 0.0, eps, False
            )

        return given_plain
    channels = (x.shape[1],) + (1,) * (x.dim() - 2)
    zero = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)  # never written: eval

    def given_centered(x, weight, bias, eps, mean, var):
        _last["backend"] = "torch"
        if mean.requires_grad or var.requires_grad:  # statistics are constants
            mean, var = mean.detach(), var.detach()
        return torch.batch_norm(
            x - mean.view(channels), weight, bias, zero, var, False, 0.0, eps, False
        )

    return given_centered


def _groups(x, layout, weight, bias, eps, stats=False, exporting=False):
    """(y, mean, var) of GroupNorm/InstanceNorm on the (N, C, S) view of ``layout`` with
    ``layout.groups`` groups (weight and bias (C,)), statistics (N, groups) or None. As
    LayerNorm's rows, each group is shifted by its first element first: torch's float32
    GroupNorm loses a large mean's digits (1e4 + 1e-3 noise: 0.16 off). Not in an exported
    graph (torch's op alone)."""
    n, c, s = layout.view
    g = layout.groups
    if exporting and not stats:  # the op both ONNX exporters know
        return (
            torch.group_norm(x.reshape(n, c, s), g, weight, bias, eps).reshape(x.shape),
            None,
            None,
        )
    shifted, pivot = x.reshape(n, c, s), None
    if not exporting:
        grouped = x.reshape(n, g, (c // g) * s)
        pivot = grouped.detach().narrow(-1, 0, 1)
        shifted = (grouped - pivot).reshape(n, c, s)
    shifted = shifted.contiguous()  # the op takes contiguous input only
    y, mean, rstd = torch.native_group_norm(shifted, weight, bias, n, c, s, g, eps)
    y = y.reshape(x.shape)
    if not stats:
        return y, None, None
    acc = composite.accumulation_dtype(x.dtype)
    mean = mean.detach().to(acc)
    if pivot is not None:
        mean = mean + pivot.reshape(n, g).to(acc)
    return y, mean, rstd.detach().to(acc).pow(-2) - eps


def _rows(x, call):
    """(y, mean, var) over the trailing ``len(reduction)`` axes of x (any strides)."""
    s, eps = call.spec, float(call.eps)
    shape = tuple(x.shape[x.dim() - len(s.reduction) :])
    weight = None if call.weight is None else call.weight.reshape(shape)
    bias = None if call.bias is None else call.bias.reshape(shape)
    if s.center:
        # LayerNorm is blind to a shift of each row: normalize x - k, k the row's first
        # element (as the kernels' pivot), so that torch's float32 statistics keep the
        # variance of data far from zero (1e4 + 1e-3 noise). Not in an exported graph.
        pivot = None
        if not getattr(call, "exporting", False):
            pivot = _pivot(x, len(shape))
            x = x - pivot
        y, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        if not call.stats:
            return y, None, None
        mean, var = _stats_out(x, mean if pivot is None else mean + pivot, rstd, eps)
        return y, mean, var
    if not call.stats:
        return torch.rms_norm(x, shape, weight, eps), None, None
    if hasattr(torch, "_fused_rms_norm"):  # torch >= 2.8: output and rstd in one op
        y, rstd = torch._fused_rms_norm(x, list(shape), weight, eps)
    else:
        y = F.rms_norm(x, shape, weight, eps)
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        rstd = x.detach().float().pow(2).mean(dims, keepdim=True).add(eps).rsqrt()
    _, var = _stats_out(x, rstd, rstd, eps)
    return y, torch.zeros_like(var), var


def forward(call):
    """(y, mean, var) of ``call`` with torch's ops (``takes`` accepted it and stored its
    layout); statistics keepdim, without gradient."""
    x = call.x
    if call.spec.stats == "given":
        a, c, b = call.layout.view
        y = _given(
            x.reshape(a, c, b),
            *(None if t is None else t.reshape(c) for t in (call.weight, call.bias)),
            float(call.eps),
            call.mean.reshape(c),
            call.var.reshape(c),
            call.exporting,
        )
        acc = composite.accumulation_dtype(x.dtype)
        return y.reshape(x.shape), call.mean.to(acc), call.var.to(acc)
    if isinstance(call.layout, _spec.Layout):  # groups
        flat = [None if t is None else t.reshape(-1) for t in (call.weight, call.bias)]
        eps = float(call.eps)
        y, mean, var = _groups(x, call.layout, *flat, eps, call.stats, call.exporting)
        if mean is None:
            return y, None, None
        keep = call.spec.keep_shape(x.shape)
        return y, mean.reshape(keep), var.reshape(keep)
    axis = call.layout  # set by takes
    if axis == -1:
        return _rows(x, call)
    # One reduced axis that is not last: LayerNorm over it as a trailing axis, of a view.
    y, mean, var = _rows(x.movedim(axis, -1), _Moved(call, axis))
    if mean is None:
        return y.movedim(-1, axis), None, None
    return y.movedim(-1, axis), mean.movedim(-1, axis), var.movedim(-1, axis)


def plan(call):
    """A runner ``(x, weight, bias, eps) -> y`` for the calls of ``call``'s plan key
    (``normlab.backends.plans``): the LayerNorm/RMSNorm whose statistics are discarded,
    weight and bias as the caller passed them (of ``normalized_shape``); ``(x, weight,
    bias, eps, mean, var) -> y`` for BatchNorm with given statistics, each (C,). None for
    the others."""
    s = call.spec
    if s.stats == "given":
        view, x = call.layout.view, call.x
        if x.dim() >= 2 and view == (x.shape[0], x.shape[1], math.prod(x.shape[2:])):
            return _given_channels_first(x)

        def given(x, weight, bias, eps, mean, var):
            _record("torch")
            return _given(x.reshape(view), weight, bias, eps, mean, var).reshape(x.shape)

        return given
    if s.stats != "batch" or call.stats or call.residual is not None:
        return None
    if isinstance(call.layout, _spec.Layout):  # groups: weight and bias (C,)
        layout = call.layout

        def groups(x, weight, bias, eps):
            _record("torch")
            return _groups(x, layout, weight, bias, eps)[0]

        return groups
    shape = tuple(call.x.shape[d] for d in s.reduction)
    axis = call.layout
    if axis == -1 and s.center and len(shape) == 1:
        # The decode-size case, flat: each frame and tensor op here is a measurable share of
        # a 4096-element call. The pivot needs no detach when x has no gradient.

        def layer_norm_rows(x, weight, bias, eps):
            _last["backend"] = "torch"
            first = x.narrow(-1, 0, 1)
            if x.requires_grad:
                first = first.detach()
            return torch.native_layer_norm(x - first, shape, weight, bias, eps)[0]

        return layer_norm_rows
    if axis == -1 and not s.center:

        def rms_norm_rows(x, weight, bias, eps):
            _last["backend"] = "torch"
            return torch.rms_norm(x, shape, weight, eps)

        return rms_norm_rows
    if s.center:
        k = len(shape)

        def rows(x, weight, bias, eps):
            return torch.native_layer_norm(x - _pivot(x, k), shape, weight, bias, eps)[0]
    else:

        def rows(x, weight, bias, eps):
            return torch.rms_norm(x, shape, weight, eps)

    if axis == -1:
        run = rows
    else:

        def run(x, weight, bias, eps):
            return rows(x.movedim(axis, -1), weight, bias, eps).movedim(-1, axis)

    def recorded(x, weight, bias, eps):
        _record("torch")
        return run(x, weight, bias, eps)

    return recorded


class _Moved:
    """``call`` with its one reduced axis moved last (what ``_rows`` reads of it)."""

    def __init__(self, call, axis):
        nd = call.x.dim()
        self.spec = _spec.NormSpec((nd - 1,), (nd - 1,), call.spec.center)
        self.eps, self.stats, self.exporting = call.eps, call.stats, call.exporting
        self.weight = None if call.weight is None else call.weight.movedim(axis, -1)
        self.bias = None if call.bias is None else call.bias.movedim(axis, -1)


def add(call):
    """(norm of x + residual, x + residual)."""
    total = call.x + call.residual
    y, _, _ = _rows(total, call)
    return y, total
