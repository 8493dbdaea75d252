"""The torch.nn <-> normlab mapping of :func:`normlab.convert`: which class becomes which, the
constructor arguments they share, what has no twin, and how a replacement is rebuilt (its
state_dict, ``requires_grad`` and training mode carried over)."""

from __future__ import annotations

from dataclasses import dataclass

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

TARGETS = ("normlab", "torch")

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
TORCH_NORMS = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,
)
NORMLAB_NORMS = (LayerNorm, RMSNorm, GroupNorm, NormWithRunningStats, PowerNorm)


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


def class_name(cls: type) -> str:
    if cls in _TORCH_TO_NORMLAB:
        return f"torch.nn.{cls.__name__}"
    if cls.__module__.startswith("normlab."):
        return f"normlab.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def convert_exact(name: str, module: nn.Module, to: str):
    """The replacement of a module of an exact torch.nn class (``to="normlab"``) or of a
    normlab class with a torch.nn twin (``to="torch"``) and its entry; ``(None, None)`` when
    the mapping does not know the class."""
    cls = type(module)
    source = class_name(cls)
    target = (_TORCH_TO_NORMLAB if to == "normlab" else _NORMLAB_TO_TORCH).get(cls)
    if target is None:
        return None, None
    if to == "torch":
        problem = _torch_incompatibility(module)
        if problem:
            return None, ConversionEntry(name, source, None, problem)
    new = rebuild(module, target, _torch_args(module))
    return new, ConversionEntry(name, source, class_name(target))


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
    if isinstance(m, (LayerNorm, RMSNorm)) and m.offset != 0:
        return (
            f"offset={m.offset} (scales by offset + weight): torch.nn.{type(m).__name__} has "
            "no offset; convert(..., fold_offset=True) from the original model folds it"
        )
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


def rebuild(old: nn.Module, target: type, args_kwargs, state_dict=None) -> nn.Module:
    args, kwargs = args_kwargs
    new = target(*args, **kwargs, **_factory(old))
    new.load_state_dict(old.state_dict() if state_dict is None else state_dict, strict=True)
    old_params = dict(old.named_parameters(recurse=False))
    for pname, param in new.named_parameters(recurse=False):
        param.requires_grad_(old_params[pname].requires_grad)
    new.train(old.training)
    return new
