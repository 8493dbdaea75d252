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

The mapping between torch.nn and normlab classes is ``conversion.mapping``; the probing of
look-alike norms ``conversion.probing``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from normlab.conversion.mapping import (
    NORMLAB_NORMS,
    TARGETS,
    TORCH_NORMS,
    ConversionEntry,
    class_name,
    convert_exact,
)
from normlab.conversion.probing import convert_lookalike

__all__ = ["ConversionEntry", "ConversionSummary", "convert"]


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
      ``1 + weight`` (Gemma's, Gemma 2's and Gemma 3's RMSNorm, Nemotron's LayerNorm1P)
      becomes the normlab norm with ``offset=1.0``: it keeps ``weight`` as it is, so the
      state_dict keys and values are the original's (checkpoints load both ways), and
      computes as Gemma does (``1 + weight`` in float32 for a half weight). With
      ``fold_offset=True`` it becomes a plain norm holding ``weight + 1`` instead, as the
      summary says: the outputs match, but an original checkpoint no longer loads as is.
    - a module with no parameters, buffers or children and a ``normalized_shape`` or an eps
      attribute (OLMo's LayerNorm): it becomes a normlab LayerNorm/RMSNorm without affine
      when a probe finds it computes one. Without an eps attribute, eps is searched among
      common values (1e-5, 1e-6, 1e-12, ...) and the one found is named in the summary;
      without ``normalized_shape`` (Llama 4's L2Norm works on any width) it is skipped.

    Any other module with a ``weight`` and an ``eps``/``variance_epsilon`` is left, with the
    reason; a subclass of a torch.nn BatchNorm, GroupNorm or InstanceNorm is left too.

    ``to="torch"`` converts normlab's LayerNorm, RMSNorm, BatchNorm1d/2d/3d, SyncBatchNorm,
    GroupNorm and InstanceNorm1d/2d/3d. Left in place with the reason: a LayerNorm/RMSNorm
    whose ``dim`` is not the trailing axes or with an ``offset`` (torch.nn has none; with
    ``strict=True`` that raises), a BatchNorm1d/2d/3d with ``virtual_batch_size``, a
    SyncBatchNorm with ``dim != 1``, and the normlab norms without a torch.nn twin
    (BatchNorm with any rank, BatchRenorm*, PowerNorm).

    Args:
        model: the model (or a single norm module, then the returned model is the new one).
        to: ``"normlab"`` or ``"torch"``.
        inplace: modify ``model`` itself; by default it is deep-copied first.
        strict: raise ``ValueError`` (naming every module) when a norm-like module would be
            left unconverted; the model is then not modified.
        fold_offset: convert Gemma-style ``(1 + weight)`` norms to plain ones holding
            ``1 + weight`` rather than to ``offset=1.0`` ones (see above).

    The new modules keep the device, dtype, parameter values, ``requires_grad``, buffers
    and training mode. A module shared at several places stays shared. Hooks registered on a
    replaced module are not carried over.
    """
    if to not in TARGETS:
        raise ValueError(f"to: expected one of {list(TARGETS)}, got {to!r}")
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


def _convert_one(name: str, module: nn.Module, to: str, fold_offset: bool):
    """The replacement of ``module`` (None to keep it) and its summary entry (None when the
    module is not a norm at all)."""
    new, entry = convert_exact(name, module, to)
    if entry is not None:
        return new, entry
    source = class_name(type(module))
    if to == "normlab":
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
            return convert_lookalike(name, module, fold_offset)  # a subclass: probe it
        if isinstance(module, TORCH_NORMS):
            return None, ConversionEntry(
                name, source, None, "subclass of a torch.nn norm: its forward may differ"
            )
        if isinstance(module, NORMLAB_NORMS):
            return None, None  # already normlab
        return convert_lookalike(name, module, fold_offset)
    if isinstance(module, NORMLAB_NORMS):
        return None, ConversionEntry(name, source, None, f"{source} has no torch.nn equivalent")
    return None, None
