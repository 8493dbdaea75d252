"""Swap the norm layers of a model between torch.nn and normlab: :func:`convert`.

``convert(model, to="normlab")`` replaces every ``torch.nn`` LayerNorm, RMSNorm,
BatchNorm1d/2d/3d, SyncBatchNorm, GroupNorm and InstanceNorm1d/2d/3d by its normlab twin, and
every *look-alike* norm that a model library defines itself (Hugging Face's LlamaRMSNorm,
T5LayerNorm, ...) by normlab's RMSNorm or LayerNorm when its forward is found to compute one.
``convert(model, to="torch")`` does the reverse for the normlab modules that have a torch.nn
twin. Each replacement is built with the constructor arguments read from the old module, on
its device and dtype, loads its state_dict with ``strict=True``, keeps ``requires_grad`` of
every parameter and the training mode. What was converted and what was left (with the
reason) comes back as a :class:`ConversionSummary`.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from normlab.modules import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    PowerNorm,
    RMSNorm,
    SyncBatchNorm,
)
from normlab.modules.running_stats import NormWithRunningStats

__all__ = ["ConversionEntry", "ConversionSummary", "convert"]

_TARGETS = ("normlab", "torch")

# torch.nn class -> normlab class, matched on the exact type (a subclass may change forward).
_TORCH_TO_NORMLAB: dict[type, type] = {
    nn.LayerNorm: LayerNorm,
    nn.RMSNorm: RMSNorm,
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
    nn.GroupNorm: GroupNorm,
    nn.InstanceNorm1d: InstanceNorm1d,
    nn.InstanceNorm2d: InstanceNorm2d,
    nn.InstanceNorm3d: InstanceNorm3d,
}
_NORMLAB_TO_TORCH: dict[type, type] = {v: k for k, v in _TORCH_TO_NORMLAB.items()}

# Norm base classes: a module of one of these that is not converted is reported as skipped.
_TORCH_NORMS = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,
)
_NORMLAB_NORMS = (LayerNorm, RMSNorm, GroupNorm, NormWithRunningStats, PowerNorm)

# The probe of look-alike norms: its input and the tolerance of the comparison.
_PROBE_ROWS = 3
_PROBE_TOL = 1e-5


@dataclass(frozen=True)
class ConversionEntry:
    """One norm-like module met by :func:`convert`: ``name`` is its qualified name in the
    model (``""`` for the model itself), ``to_class`` is None when it was left in place and
    ``reason`` says why (or, for a converted one, anything to know, e.g. a folded offset)."""

    name: str
    from_class: str
    to_class: str | None
    reason: str = ""

    @property
    def converted(self) -> bool:
        return self.to_class is not None

    def __str__(self) -> str:
        name = self.name or "(model)"
        if self.converted:
            note = f"  [{self.reason}]" if self.reason else ""
            return f"{name}: {self.from_class} -> {self.to_class}{note}"
        return f"{name}: {self.from_class} skipped: {self.reason}"


@dataclass
class ConversionSummary:
    """The entries of one :func:`convert` call, in module-tree order."""

    to: str
    entries: list[ConversionEntry] = field(default_factory=list)

    @property
    def converted(self) -> list[ConversionEntry]:
        return [e for e in self.entries if e.converted]

    @property
    def skipped(self) -> list[ConversionEntry]:
        return [e for e in self.entries if not e.converted]

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        head = (
            f"convert(to={self.to!r}): {len(self.converted)} converted, {len(self.skipped)} skipped"
        )
        return "\n".join([head, *(f"  {e}" for e in self.entries)])


def convert(
    model: nn.Module,
    *,
    to: str = "normlab",
    inplace: bool = False,
    strict: bool = False,
    fold_offset: bool = False,
) -> tuple[nn.Module, ConversionSummary]:
    """Replace the norm layers of ``model`` by their normlab (``to="normlab"``) or torch.nn
    (``to="torch"``) twins. Returns ``(model, summary)``.

    ``to="normlab"`` converts the torch.nn LayerNorm, RMSNorm, BatchNorm1d/2d/3d,
    SyncBatchNorm, GroupNorm and InstanceNorm1d/2d/3d (exact classes), and look-alike norms
    found by behaviour:

    - a module with a 1-D ``weight`` parameter, a float ``eps`` or ``variance_epsilon`` and
      no children (Hugging Face's LlamaRMSNorm, T5LayerNorm, CohereLayerNorm, ...), or a
      subclass of torch.nn LayerNorm/RMSNorm (its forward may differ). Its forward, with
      random weight (and bias) values, runs on float32 probes of shape ``(3, H)`` (standard
      deviations 1 and 0.01, so eps matters); it becomes ``normlab.RMSNorm`` when it equals
      RMSNorm with that weight and eps (within 1e-5), ``normlab.LayerNorm`` when it equals
      LayerNorm (with its ``bias`` if it has one). A forward equal to the norm with
      ``1 + weight`` (Gemma's RMSNorm, Nemotron's LayerNorm1P) is skipped unless
      ``fold_offset=True``, which builds the norm with ``weight + 1`` and says so in the
      summary: the outputs match, but the converted state_dict holds ``1 + w``, so an
      original checkpoint no longer loads into the converted model as is.
    - a module with no parameters, buffers or children and a ``normalized_shape`` or an eps
      attribute (OLMo's LayerNorm): it becomes a normlab LayerNorm/RMSNorm without affine
      when a probe finds it computes one. Without an eps attribute, eps is searched among
      common values (1e-5, 1e-6, 1e-12, ...) and the one found is named in the summary;
      without ``normalized_shape`` (Llama 4's L2Norm works on any width) it is skipped.

    Any other module with a ``weight`` and an ``eps``/``variance_epsilon`` is left, with the
    reason; a subclass of a torch.nn BatchNorm, GroupNorm or InstanceNorm is left too.

    ``to="torch"`` converts normlab's LayerNorm, RMSNorm, BatchNorm1d/2d/3d, SyncBatchNorm,
    GroupNorm and InstanceNorm1d/2d/3d. Left in place with the reason: a LayerNorm/RMSNorm
    whose ``dim`` is not the trailing axes, a BatchNorm1d/2d/3d with ``virtual_batch_size``,
    a SyncBatchNorm with ``dim != 1``, and the normlab norms without a torch.nn twin
    (BatchNorm with any rank, BatchRenorm*, PowerNorm).

    Args:
        model: the model (or a single norm module, then the returned model is the new one).
        to: ``"normlab"`` or ``"torch"``.
        inplace: modify ``model`` itself; by default it is deep-copied first.
        strict: raise ``ValueError`` (naming every module) when a norm-like module would be
            left unconverted; the model is then not modified.
        fold_offset: convert Gemma-style ``(1 + weight)`` RMSNorms (see above).

    The new modules keep the device, dtype, parameter values, ``requires_grad``, buffers
    and training mode. A module shared at several places stays shared. Hooks registered on a
    replaced module are not carried over.
    """
    if to not in _TARGETS:
        raise ValueError(f"to: expected one of {list(_TARGETS)}, got {to!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    summary = ConversionSummary(to=to)
    replacements: dict[int, nn.Module | None] = {}
    for name, module in model.named_modules():  # each module once, even if shared
        new, entry = _convert_one(name, module, to, fold_offset)
        if entry is not None:
            summary.entries.append(entry)
        replacements[id(module)] = new
    if strict and summary.skipped:
        raise ValueError(
            f"convert(to={to!r}, strict=True): {len(summary.skipped)} norm-like module(s) "
            "cannot be converted:\n" + "\n".join(f"  {e}" for e in summary.skipped)
        )
    root = replacements.get(id(model))
    if root is not None:
        return root, summary
    _replace(model, replacements, set())
    return model, summary


def _replace(module: nn.Module, replacements: dict, seen: set) -> None:
    if id(module) in seen:
        return
    seen.add(id(module))
    # _modules, not named_children(): that skips the second place of a shared child.
    for child_name, child in list(module._modules.items()):
        if child is None:
            continue
        new = replacements.get(id(child))
        if new is not None:
            setattr(module, child_name, new)  # ModuleList/ModuleDict/Sequential accept this
        else:
            _replace(child, replacements, seen)


def _class_name(cls: type) -> str:
    if cls in _TORCH_TO_NORMLAB:
        return f"torch.nn.{cls.__name__}"
    if cls.__module__.startswith("normlab."):
        return f"normlab.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _convert_one(name: str, module: nn.Module, to: str, fold_offset: bool):
    """The replacement of ``module`` (None to keep it) and its summary entry (None when the
    module is not a norm at all)."""
    cls = type(module)
    source = _class_name(cls)
    if to == "normlab":
        target = _TORCH_TO_NORMLAB.get(cls)
        if target is not None:
            new = _rebuild(module, target, _torch_args(module))
            return new, ConversionEntry(name, source, _class_name(target))
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
            return _convert_lookalike(name, module, fold_offset)  # a subclass: probe it
        if isinstance(module, _TORCH_NORMS):
            return None, ConversionEntry(
                name, source, None, "subclass of a torch.nn norm: its forward may differ"
            )
        if isinstance(module, _NORMLAB_NORMS):
            return None, None  # already normlab
        return _convert_lookalike(name, module, fold_offset)
    # to == "torch"
    target = _NORMLAB_TO_TORCH.get(cls)
    if target is None:
        if isinstance(module, _NORMLAB_NORMS):
            return None, ConversionEntry(name, source, None, f"{source} has no torch.nn equivalent")
        return None, None
    problem = _torch_incompatibility(module)
    if problem:
        return None, ConversionEntry(name, source, None, problem)
    new = _rebuild(module, target, _torch_args(module))
    return new, ConversionEntry(name, source, _class_name(target))


def _torch_args(m: nn.Module) -> tuple[tuple, dict]:
    """The constructor arguments shared by a torch.nn norm and its normlab twin."""
    if isinstance(m, (nn.LayerNorm, LayerNorm)):
        return (tuple(m.normalized_shape), m.eps, m.elementwise_affine), {
            "bias": m.bias is not None or not m.elementwise_affine
        }
    if isinstance(m, (nn.RMSNorm, RMSNorm)):
        return (tuple(m.normalized_shape), m.eps, m.elementwise_affine), {}
    if isinstance(m, (nn.GroupNorm, GroupNorm)):
        return (m.num_groups, m.num_channels, m.eps, m.affine), {
            "bias": m.bias is not None or not m.affine
        }
    # BatchNorm*, SyncBatchNorm, InstanceNorm*
    args = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm)):
        args += (m.process_group,)
    return args, {"bias": m.bias is not None or not m.affine}


def _torch_incompatibility(m: nn.Module) -> str:
    if isinstance(m, (LayerNorm, RMSNorm)) and m.dim is not None:
        trailing = tuple(range(-len(m.normalized_shape), 0))
        if tuple(m.dim) != trailing:
            return (
                f"dim={m.dim} is not the trailing axes {trailing} that torch.nn."
                f"{type(m).__name__} normalizes"
            )
    if isinstance(m, SyncBatchNorm) and m.dim != 1:
        return f"dim={m.dim}: torch.nn.SyncBatchNorm has its channels at dim=1"
    if isinstance(m, BatchNorm) and m.virtual_batch_size is not None:
        return (
            f"virtual_batch_size={m.virtual_batch_size} (ghost BatchNorm) has no torch.nn "
            "equivalent"
        )
    return ""


def _factory(module: nn.Module) -> dict:
    """The device and dtype of the module's first floating tensor (empty if it has none)."""
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if tensor is not None and tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        return {"device": tensor.device}
    return {}


def _rebuild(old: nn.Module, target: type, args_kwargs, state_dict=None) -> nn.Module:
    args, kwargs = args_kwargs
    new = target(*args, **kwargs, **_factory(old))
    new.load_state_dict(old.state_dict() if state_dict is None else state_dict, strict=True)
    old_params = dict(old.named_parameters(recurse=False))
    for pname, param in new.named_parameters(recurse=False):
        param.requires_grad_(old_params[pname].requires_grad)
    new.train(old.training)
    return new


# Look-alike norms (model libraries' own RMSNorm / LayerNorm classes).

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


def _convert_lookalike(name: str, module: nn.Module, fold_offset: bool):
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return _convert_parameter_free(name, module)
    eps_attr, eps = _lookalike_eps(module)
    if eps_attr is None:
        return None, None  # does not look like a norm
    source = _class_name(type(module))

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
    if offset and not fold_offset:
        base = "RMSNorm" if match.startswith("rms") else "LayerNorm"
        return skip(
            f"computes {base} with (1 + weight) (Gemma-style offset), which normlab.{base} "
            "has not; convert(..., fold_offset=True) folds it into weight"
        )
    factory = {"device": weight.device, "dtype": weight.dtype}
    with torch.no_grad():
        if match.startswith("layer_norm"):
            new = LayerNorm(hidden, eps, True, bias is not None, **factory)
            if bias is not None:
                new.bias.copy_(bias)
                new.bias.requires_grad_(bias.requires_grad)
        else:
            new = RMSNorm(hidden, eps, True, **factory)
        new.weight.copy_(weight + 1 if offset else weight)
        new.weight.requires_grad_(weight.requires_grad)
    note = "folded the (1 + weight) offset: new weight = 1 + old weight" if offset else ""
    new.train(module.training)
    return new, ConversionEntry(name, source, _class_name(type(new)), note)


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
    source = _class_name(type(module))
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
    return new, ConversionEntry(name, source, _class_name(cls), note)


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
