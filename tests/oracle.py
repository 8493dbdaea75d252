"""The float64 reference (``normlab.reference``) of one ``normlab.functional`` call.

A call is the functional's name and its keyword arguments. ``expected`` gives what the call
must return, the buffers it must leave behind and, for an upstream gradient, the gradients
of its tensor arguments, all computed in float64 from the values of the call's tensors (so a
half-precision input is compared with the reference of its rounded values).
``sensitivity`` estimates how much of a float32 backend's rounding an ill-conditioned call
(a group whose variance is tiny next to its values) legitimately shows in each result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from normlab import axes as _axes
from normlab import masks as _masks
from normlab import reference as ref

# Arguments that hold running statistics the call updates in place.
BUFFERS = ("running_mean", "running_var", "running_phi", "running_grad_stat")

# The positional order of each functional (to read calls written with defaults).
DEFAULTS = {
    "layer_norm": {"weight": None, "bias": None, "eps": 1e-5, "dim": None, "offset": 0.0},
    "rms_norm": {"weight": None, "eps": None, "dim": None, "offset": 0.0},
    "add_layer_norm": {"weight": None, "bias": None, "eps": 1e-5, "dim": None, "offset": 0.0},
    "add_rms_norm": {"weight": None, "eps": None, "dim": None, "offset": 0.0},
    "batch_norm": {
        "weight": None,
        "bias": None,
        "training": False,
        "momentum": 0.1,
        "eps": 1e-5,
        "dim": 1,
        "mask": None,
        "lengths": None,
        "virtual_batch_size": None,
    },
    "batch_renorm": {
        "weight": None,
        "bias": None,
        "training": False,
        "momentum": 0.1,
        "eps": 1e-5,
        "r_max": 3.0,
        "d_max": 5.0,
        "dim": 1,
        "mask": None,
        "lengths": None,
    },
    "group_norm": {"weight": None, "bias": None, "eps": 1e-5, "mask": None, "lengths": None},
    "instance_norm": {
        "running_mean": None,
        "running_var": None,
        "weight": None,
        "bias": None,
        "use_input_stats": True,
        "momentum": 0.1,
        "eps": 1e-5,
        "mask": None,
        "lengths": None,
    },
    "power_norm": {
        "weight": None,
        "bias": None,
        "training": False,
        "momentum": 0.1,
        "alpha_bkw": 0.9,
        "eps": 1e-5,
        "dim": -1,
        "warmup": False,
        "mask": None,
        "lengths": None,
    },
}


@dataclass
class Expected:
    """outputs: the returned tensor(s); buffers: running statistics after the call (those
    updated in the backward too, e.g. PowerNorm's nu, under ``after_backward``); gradients:
    a function of the upstream gradients (one per output) -> {argument: gradient}."""

    outputs: tuple[np.ndarray, ...]
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    gradients: object = None
    after_backward: dict[str, np.ndarray] = field(default_factory=dict)


def f64(t):
    """A copy of a tensor's values as float64 NumPy (None stays None); a copy, because the
    call updates its buffers in place."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64).numpy().copy()
    return np.asarray(t, dtype=np.float64)


def _mask(x, channel_axis, mask, lengths):
    """The mask (input shape without the channel axis) as NumPy, built from lengths if given
    (over the one axis besides the batch axis 0 and the channel axis)."""
    if lengths is not None:
        (sequence,) = [d for d in range(1, x.dim()) if d != channel_axis]
        mask = _masks.lengths_to_mask(torch.as_tensor(lengths), x.shape[sequence])
    return None if mask is None else f64(mask)


SCALARS = ("eps", "momentum", "r_max", "d_max", "alpha_bkw", "offset")


def _full_args(fn, args):
    full = dict(DEFAULTS[fn])
    full.update(args)
    for name in SCALARS:  # a Python float to the functional (NumPy float32 would compute in it)
        if isinstance(full.get(name), (torch.Tensor, np.generic)):
            full[name] = float(full[name])
    return full


def expected(fn: str, args: dict) -> Expected:
    """The reference result of ``normlab.functional.<fn>(**args)``; ``args`` as passed (their
    tensors' current values: call this *before* running the call, which updates buffers)."""
    a = _full_args(fn, args)
    return _ORACLES[fn](a)


def _feature(a, center):
    x = a["input"]
    ns, dim, eps, offset = a["normalized_shape"], a["dim"], a["eps"], a["offset"]
    if eps is None:
        eps = float(torch.finfo(x.dtype).eps)
    w, b = f64(a["weight"]), f64(a.get("bias"))
    residual = a.get("residual")
    if residual is None:
        s = f64(x)
    else:  # the sum is rounded to the input dtype before it is normalized
        s = f64(x.detach() + residual.detach())
    if center:
        y = ref.layer_norm(s, ns, w, b, eps, dim, offset)
    else:
        y = ref.rms_norm(s, ns, w, eps, dim, offset)

    def gradients(dy, dtotal=None):
        if center:
            dx, dw, db = ref.layer_norm_backward(dy, s, ns, w, b, eps, dim, offset)
        else:
            dx, dw, db = ref.rms_norm_backward(dy, s, ns, w, eps, dim, offset)
        grads = {"input": dx, "weight": dw, "bias": db}
        if residual is not None:
            total = dx if dtotal is None else dx + dtotal
            grads.update(input=total, residual=total)
        return grads

    outputs = (y,) if residual is None else (y, s)
    return Expected(outputs, gradients=gradients)


def _given_stats_norm(x, norm_axes, mean, var, w, b, eps, center=True):
    """Normalization with given statistics (eval): forward and backward."""
    shape = norm_axes.param_shape(x.shape)
    mean = np.zeros(shape) if mean is None else f64(mean).reshape(shape)
    var = f64(var).reshape(shape)
    y = ref.normalize(f64(x), norm_axes, w, b, eps, center=center, mean=mean, var=var)

    def gradients(dy):
        dx, dw, db = ref.normalize_backward(
            dy, f64(x), norm_axes, w, b, eps, center=center, mean=mean, var=var
        )
        return {"input": dx, "weight": dw, "bias": db}

    return Expected((y,), gradients=gradients)


def _with_buffers(result, a, updated):
    """Keep the updated buffers the call was given (a buffer passed as None stays None)."""
    for name, value in updated.items():
        if a.get(name) is not None:
            result.buffers[name] = value
    return result


def _batch_norm(a):
    x, dim, eps = a["input"], a["dim"], a["eps"]
    w, b = f64(a["weight"]), f64(a["bias"])
    channel = _axes.channel_norm_axes(x.dim(), dim).feature[0]
    if not a["training"]:
        norm_axes = _axes.channel_norm_axes(x.dim(), dim)
        return _given_stats_norm(x, norm_axes, a["running_mean"], a["running_var"], w, b, eps)
    mask = _mask(x, channel, a["mask"], a["lengths"])
    vbs = a["virtual_batch_size"]
    xs = f64(x)
    y = ref.batch_norm_train(xs, w, b, eps, dim, mask, vbs)

    def gradients(dy):
        dx, dw, db = ref.batch_norm_train_backward(dy, xs, w, b, eps, dim, mask, vbs)
        return {"input": dx, "weight": dw, "bias": db}

    result = Expected((y,), gradients=gradients)
    rm, rv = a["running_mean"], a["running_var"]
    if (rm is not None or rv is not None) and _enough(xs, channel, mask, vbs):
        rm0 = np.zeros(x.shape[channel]) if rm is None else f64(rm)
        rv0 = np.ones(x.shape[channel]) if rv is None else f64(rv)
        new_mean, new_var = ref.batch_norm_update_running_stats(
            xs, rm0, rv0, a["momentum"], dim, mask, vbs
        )
        _with_buffers(result, a, {"running_mean": new_mean, "running_var": new_var})
    elif rm is not None or rv is not None:  # an empty batch leaves them as they were
        _with_buffers(result, a, {"running_mean": f64(rm), "running_var": f64(rv)})
    return result


def _enough(xs, channel, mask, vbs=None):
    """An empty batch (no values per statistic) updates no running statistics."""
    count = np.prod([n for d, n in enumerate(xs.shape) if d != channel])
    if vbs is not None:
        count //= xs.shape[0] // vbs if xs.shape[0] else 1
    return count >= 2 or mask is not None


def _batch_renorm(a):
    if not a["training"]:
        return _batch_norm(a)
    x, dim, eps = a["input"], a["dim"], a["eps"]
    w, b = f64(a["weight"]), f64(a["bias"])
    rm, rv = f64(a["running_mean"]), f64(a["running_var"])
    channel = _axes.channel_norm_axes(x.dim(), dim).feature[0]
    mask = _mask(x, channel, a["mask"], a["lengths"])
    r_max, d_max = a["r_max"], a["d_max"]
    xs = f64(x)
    y = ref.batch_renorm_train(xs, rm, rv, w, b, eps, r_max, d_max, dim, mask)

    def gradients(dy):
        dx, dw, db = ref.batch_renorm_train_backward(
            dy, xs, rm, rv, w, b, eps, r_max, d_max, dim, mask
        )
        return {"input": dx, "weight": dw, "bias": db}

    result = Expected((y,), gradients=gradients)
    if _enough(xs, channel, mask):
        new_mean, new_var = ref.batch_norm_update_running_stats(
            xs, rm, rv, a["momentum"], dim, mask
        )
        result.buffers.update(running_mean=new_mean, running_var=new_var)
    else:
        result.buffers.update(running_mean=rm, running_var=rv)
    return result


def _group_norm(a):
    x, groups, eps = a["input"], a["num_groups"], a["eps"]
    w, b = f64(a["weight"]), f64(a["bias"])
    mask = _mask(x, 1, a["mask"], a["lengths"])
    xs = f64(x)
    y = ref.group_norm(xs, groups, w, b, eps, mask)

    def gradients(dy):
        dx, dw, db = ref.group_norm_backward(dy, xs, groups, w, b, eps, mask)
        return {"input": dx, "weight": dw, "bias": db}

    return Expected((y,), gradients=gradients)


def _instance_norm(a):
    x, eps = a["input"], a["eps"]
    w, b = f64(a["weight"]), f64(a["bias"])
    norm_axes = _axes.instance_norm_axes(x.dim())
    if not a["use_input_stats"]:
        return _given_stats_norm(x, norm_axes, a["running_mean"], a["running_var"], w, b, eps)
    mask = _mask(x, 1, a["mask"], a["lengths"])
    xs = f64(x)
    y = ref.instance_norm(xs, w, b, eps, mask)

    def gradients(dy):
        dx, dw, db = ref.instance_norm_backward(dy, xs, w, b, eps, mask)
        return {"input": dx, "weight": dw, "bias": db}

    result = Expected((y,), gradients=gradients)
    rm, rv = a["running_mean"], a["running_var"]
    if rm is not None or rv is not None:
        if x.shape[0] and _enough(xs[:, :1], 1, mask):  # (an instance without values: no update)
            rm0 = np.zeros(x.shape[1]) if rm is None else f64(rm)
            rv0 = np.ones(x.shape[1]) if rv is None else f64(rv)
            new_mean, new_var = ref.instance_norm_update_running_stats(
                xs, rm0, rv0, a["momentum"], mask
            )
        else:
            new_mean, new_var = f64(rm), f64(rv)
        _with_buffers(result, a, {"running_mean": new_mean, "running_var": new_var})
    return result


def _power_norm(a):
    x, dim, eps = a["input"], a["dim"], a["eps"]
    w, b = f64(a["weight"]), f64(a["bias"])
    phi, nu = f64(a["running_phi"]), f64(a["running_grad_stat"])
    norm_axes = _axes.channel_norm_axes(x.dim(), dim)
    if not a["training"]:
        return _given_stats_norm(x, norm_axes, None, phi, w, b, eps, center=False)
    channel = norm_axes.feature[0]
    mask = _mask(x, channel, a["mask"], a["lengths"])
    xs = f64(x)
    new_phi = phi
    if _enough(xs, channel, mask):
        new_phi = ref.power_norm_update_running_phi(xs, phi, a["momentum"], dim, mask)
    if a["warmup"]:
        y = ref.power_norm_warmup(xs, w, b, eps, dim, mask)

        def gradients(dy):
            dx, dw, db = ref.power_norm_warmup_backward(dy, xs, w, b, eps, dim, mask)
            return {"input": dx, "weight": dw, "bias": db}

        return Expected((y,), {"running_phi": new_phi}, gradients)
    y = ref.power_norm_forward(xs, phi, w, b, eps, dim)
    result = Expected((y,), {"running_phi": new_phi})

    def approximate_gradients(dy):
        dx, dw, db, new_nu = ref.power_norm_backward(
            dy, xs, phi, nu, w, b, eps, a["alpha_bkw"], dim, mask
        )
        # an empty batch leaves nu as it is (normlab's policy, docs/edge-cases.md)
        result.after_backward["running_grad_stat"] = new_nu if xs.size else nu
        return {"input": dx, "weight": dw, "bias": db}

    result.gradients = approximate_gradients
    return result


_ORACLES = {
    "layer_norm": lambda a: _feature(a, True),
    "rms_norm": lambda a: _feature(a, False),
    "add_layer_norm": lambda a: _feature(a, True),
    "add_rms_norm": lambda a: _feature(a, False),
    "batch_norm": _batch_norm,
    "batch_renorm": _batch_renorm,
    "group_norm": _group_norm,
    "instance_norm": _instance_norm,
    "power_norm": _power_norm,
}


def perturbed(args: dict, relative: float, rng: np.random.Generator) -> dict:
    """The call with its input (and residual) multiplied by 1 + relative * U(-1, 1), in
    float64: how far the reference moves under a perturbation of that size tells how
    conditioned the call is (a backend's rounding is such a perturbation)."""
    out = dict(args)
    if out.get("eps", 0) is None:  # RMSNorm's default eps is that of the input dtype
        out["eps"] = float(torch.finfo(args["input"].dtype).eps)
    for name in ("input", "residual"):
        t = args.get(name)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            noise = 1 + relative * rng.uniform(-1, 1, size=tuple(t.shape))
            out[name] = torch.as_tensor(f64(t) * noise)
    return out
