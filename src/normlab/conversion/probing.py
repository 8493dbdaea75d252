"""Look-alike norms of model libraries (Hugging Face's LlamaRMSNorm, T5LayerNorm, OLMo's
parameter-free LayerNorm...) for :func:`normlab.convert`: which torch computation a module's
forward performs, found by running it on probes, and the normlab module that replaces it."""

from __future__ import annotations

import copy
import numbers

import torch
from torch import nn

from normlab.conversion.mapping import ConversionEntry, class_name
from normlab.modules import LayerNorm, RMSNorm

# The probe of look-alike norms: its input and the tolerance of the comparison.
_PROBE_ROWS = 3
_PROBE_TOL = 1e-5


# Probed computations: (kind, centred, offset). "offset" multiplies by (1 + weight).
_KINDS = (
    ("rms_norm", False, False),
    ("layer_norm", True, False),
    ("rms_norm_offset", False, True),
    ("layer_norm_offset", True, True),
)
# The eps values tried, in this order, on a norm that does not expose its eps.
_COMMON_EPS = (1e-5, 1e-6, 1e-12, 1e-8, 1e-3, 1e-4, 1e-7, 1e-10, 1e-9, 1e-2, 0.0)
# A parameter-free norm with no ``normalized_shape`` is probed at this width.
_FREE_PROBE_WIDTH = 16


def _lookalike_eps(module: nn.Module):
    for attr in ("eps", "variance_epsilon"):
        if hasattr(module, attr):
            return attr, getattr(module, attr, None)
    return None, None


def convert_lookalike(name: str, module: nn.Module, fold_offset: bool):
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return _convert_parameter_free(name, module)
    eps_attr, eps = _lookalike_eps(module)
    if eps_attr is None:
        return None, None  # does not look like a norm
    source = class_name(type(module))

    def skip(reason: str):
        return None, ConversionEntry(name, source, None, reason)

    if any(True for _ in module.children()):
        return skip("looks like a norm (weight and eps) but has child modules")
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return skip(f"looks like a norm but weight is not a 1-D parameter ({tuple(weight.shape)})")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        return skip(f"looks like a norm but {eps_attr}={eps!r} is not a float")
    bias = getattr(module, "bias", None)
    if bias is not None and not (isinstance(bias, nn.Parameter) and bias.shape == weight.shape):
        return skip("looks like a norm but its bias is not a parameter shaped like weight")
    if weight.device.type == "meta":
        return skip("looks like a norm but its weight is on the meta device (cannot probe)")
    eps = float(eps)
    hidden = weight.numel()
    match = _probe(module, (hidden,), eps, affine=True, has_bias=bias is not None)
    if match is None:
        return skip(
            f"looks like a norm ({eps_attr}={eps}) but its forward on a (3, {hidden}) probe "
            "matches neither RMSNorm nor LayerNorm, with weight or with (1 + weight)"
        )
    if match.startswith("error"):
        return skip(f"looks like a norm but its forward failed on a (3, {hidden}) probe: {match}")
    offset = match.endswith("_offset")
    fold = offset and fold_offset
    # (1 + weight): normlab's offset=1.0 keeps the weight (and the state_dict) as it is;
    # fold_offset=True stores 1 + weight in a plain norm instead.
    kept = 1.0 if offset and not fold else 0.0
    factory = {"device": weight.device, "dtype": weight.dtype}
    with torch.no_grad():
        if match.startswith("layer_norm"):
            new = LayerNorm(hidden, eps, True, bias is not None, **factory, offset=kept)
            if bias is not None:
                new.bias.copy_(bias)
                new.bias.requires_grad_(bias.requires_grad)
        else:
            new = RMSNorm(hidden, eps, True, **factory, offset=kept)
        new.weight.copy_(weight + 1 if fold else weight)
        new.weight.requires_grad_(weight.requires_grad)
    note = ""
    if fold:
        note = "folded the (1 + weight) offset: new weight = 1 + old weight"
    elif offset:
        note = "scales by (1 + weight): offset=1.0, weight kept"
    new.train(module.training)
    return new, ConversionEntry(name, source, class_name(type(new)), note)


def _convert_parameter_free(name: str, module: nn.Module):
    """A norm without parameters (OLMo's LayerNorm, Llama 4's L2Norm): a module with no
    parameters, buffers or children and a ``normalized_shape`` or an eps attribute, whose
    forward is found by probing. Anything else, or a probe that matches no norm, is not
    reported (such modules are not norms)."""
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return None, None
    if any(True for _ in module.children()):
        return None, None
    eps_attr, eps = _lookalike_eps(module)
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, numbers.Integral):
        shape = (shape,)
    if shape is not None:
        if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) > 0) or not all(
            isinstance(n, numbers.Integral) and n > 0 for n in shape
        ):
            return None, None
        shape = tuple(int(n) for n in shape)
    if eps_attr is None and shape is None:
        return None, None
    if eps_attr is not None and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)):
        return None, None
    probe_shape = shape or (_FREE_PROBE_WIDTH,)
    candidates = (float(eps),) if eps_attr is not None else _COMMON_EPS
    for candidate in candidates:
        match = _probe(module, probe_shape, candidate, affine=False, has_bias=False)
        if match in ("rms_norm", "layer_norm"):
            eps = candidate
            break
    else:
        return None, None  # not a norm, or one we do not recognise: nothing to report
    source = class_name(type(module))
    kind = "RMSNorm" if match == "rms_norm" else "LayerNorm"
    if shape is None:
        return None, ConversionEntry(
            name,
            source,
            None,
            f"computes a parameter-free {kind} of the last axis whatever its size; normlab."
            f"{kind} needs a normalized_shape and the module does not give one",
        )
    cls = RMSNorm if match == "rms_norm" else LayerNorm
    new = cls(shape, eps, elementwise_affine=False)
    new.train(module.training)
    note = "" if eps_attr is not None else f"eps={eps:g} found by probing (no eps attribute)"
    return new, ConversionEntry(name, source, class_name(cls), note)


def _probe(
    module: nn.Module, shape: tuple, eps: float, *, affine: bool, has_bias: bool
) -> str | None:
    """Which computation ``module`` performs on ``(3, *shape)`` inputs: a kind of
    ``_KINDS`` (with the module's weight and bias set to random values when ``affine``),
    None (none of them) or "error: ..." (its forward raised). Two probes, of standard
    deviation 1 and 0.01, the second one where eps matters."""
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(shape, generator=gen) + 0.5
    b = torch.randn(shape, generator=gen) if has_bias else None
    probes = [
        (torch.randn(_PROBE_ROWS, *shape, generator=gen) + 0.5) * scale  # not centred
        for scale in (1.0, 0.01)
    ]
    kinds = [k for k in _KINDS if affine or not k[2]]
    if has_bias:
        kinds = [k for k in kinds if k[1]]  # a bias goes with a centred norm
    dims = tuple(range(-len(shape), 0))
    with torch.no_grad():
        try:  # on a float32 CPU copy with random weight (and bias): the model is not touched
            probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float32)
            if affine:
                probe.weight.copy_(w.reshape(probe.weight.shape))
                if has_bias:
                    probe.bias.copy_(b.reshape(probe.bias.shape))
            outs = [probe(x.clone()) for x in probes]
        except Exception as error:  # any failure means "not a norm we can take"
            return f"error: {type(error).__name__}: {error}"
        if not all(
            isinstance(o, torch.Tensor) and o.shape == x.shape
            for o, x in zip(outs, probes, strict=True)
        ):
            return None
        for kind, centred, offset in kinds:
            if all(
                torch.allclose(
                    out.float(),
                    _expected(x, dims, eps, centred, w + 1 if offset else w, b, affine),
                    atol=_PROBE_TOL,
                    rtol=_PROBE_TOL,
                )
                for out, x in zip(outs, probes, strict=True)
            ):
                return kind
    return None


def _expected(x, dims, eps, centred, weight, bias, affine):
    """The probed norm, in float64 (the reference the module's output must match)."""
    x = x.double()
    if centred:
        x = x - x.mean(dims, keepdim=True)
    y = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
    if affine:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y.float()
