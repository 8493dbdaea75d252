"""Fold inference-mode BatchNorms into the Linear or convolution that feeds them.

``fold_batchnorm(model)`` rewrites ``layer -> BatchNorm`` into one ``layer`` whose weight and
bias absorb the BatchNorm's affine map over its running statistics::

    scale = gamma / sqrt(running_var + eps)          (per output channel)
    W'    = W * scale                                (along the output-channel axis)
    b'    = (b - running_mean) * scale + beta        (b = 0 where the layer had no bias)

computed in float64 and cast back to the layer's dtype. The BatchNorm is replaced by
``nn.Identity``. Only eval-mode models are folded (in training a BatchNorm normalizes with
batch statistics, which no fixed weight can reproduce).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from normlab.modules.batch_norm import BatchNorm as _NormlabBatchNorm
from normlab.modules.batch_norm import FixedRank as _FixedRank

__all__ = ["FoldSummary", "fold_batchnorm"]

_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_BN_TYPES = (*_TORCH_BN, _NormlabBatchNorm)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYER_TYPES = (nn.Linear, *_CONV, *_CONV_T)


@dataclass
class FoldSummary:
    """What ``fold_batchnorm`` did.

    ``folded``: ``(bn_name, layer_name)`` per folded BatchNorm; ``skipped``:
    ``(bn_name, reason)`` per BatchNorm left in place; ``traced``: True when the model went
    through torch.fx (the result is then a ``GraphModule``), False for the ``nn.Sequential``
    path. Names are the modules' qualified names in the model.
    """

    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    traced: bool = False

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm(s), skipped {len(self.skipped)}"]
        lines += [f"  folded  {bn} -> {layer}" for bn, layer in self.folded]
        lines += [f"  skipped {bn}: {reason}" for bn, reason in self.skipped]
        return "\n".join(lines)


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, FoldSummary]:
    """Fold each eval-mode BatchNorm that directly follows a Linear/Conv/ConvTranspose.

    BatchNorms: ``torch.nn.BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, normlab's ``BatchNorm``
    family (``BatchNorm1d/2d/3d``, and ``BatchRenorm``/``SyncBatchNorm``, which in eval apply
    the same running-statistics affine map). Layers: ``nn.Linear``, ``nn.Conv1d/2d/3d``,
    ``nn.ConvTranspose1d/2d/3d`` (any ``groups``). The BatchNorm's channel axis must be the
    layer's output channels: axis 1 after a convolution; after a Linear either ``dim=-1``
    (features last, e.g. ``(B, L, C)``) or a channel-axis-1 BatchNorm that is not a fixed
    rank-4/5 one (``BatchNorm1d``, ``BatchNorm(dim=1)``), which assumes a 2D ``(N, C)`` input.

    ``nn.Sequential`` models (nested Sequentials flattened in order) are folded in place of
    their structure: the result is the same Sequential with ``nn.Identity`` where each folded
    BatchNorm was. Any other model is traced with ``torch.fx`` (normlab modules kept as
    leaves); a BatchNorm is folded where it is called with one positional input that is the
    output of a Linear/Conv call whose output has no other user; the BatchNorm's node is
    removed, its module path holds ``nn.Identity``, and a ``GraphModule`` is returned.

    Skipped (left in place, reason in the summary): BatchNorms without running statistics
    (``track_running_stats=False``), not directly after a supported layer, after a layer whose
    output has other users (a residual), modules called or registered more than once (shared
    weights), a layer whose parameters the forward reads directly, a channel count or channel
    axis that does not match, extra arguments (``mask``/``lengths``) to the BatchNorm.

    ``inplace=False`` (default) folds a deep copy; ``inplace=True`` changes ``model`` itself
    (on the fx path the layers are updated and the BatchNorms replaced by ``nn.Identity`` in
    ``model`` too, so it stays equivalent to the returned GraphModule).

    Raises ``ValueError`` naming the module when any module of ``model`` is in training
    mode, and when a non-Sequential model cannot be traced by torch.fx.

    Returns ``(folded_model, summary)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    training = [name for name, m in model.named_modules() if m.training]
    if training:
        bn_training = [n for n in training if isinstance(model.get_submodule(n), _BN_TYPES)]
        name = (bn_training or training)[0]
        label = f"module '{name}'" if name else f"the model ({type(model).__name__})"
        more = f" (and {len(training) - 1} more)" if len(training) > 1 else ""
        raise ValueError(
            f"fold_batchnorm folds inference-mode models only: {label}{more} is in training "
            "mode, where BatchNorm normalizes with batch statistics; call model.eval() first"
        )
    original = model
    if not inplace:
        model = copy.deepcopy(model)
    counts = _registration_counts(model)
    if _is_plain_sequential(model) and _all_bns_in_sequentials(model):
        return model, _fold_sequential(model, counts)
    return _fold_traced(model, counts, original if inplace else None)


# --------------------------------------------------------------------------- helpers


def _registration_counts(model: nn.Module) -> dict[int, int]:
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return counts


def _is_plain_sequential(m: nn.Module) -> bool:
    """An nn.Sequential (or subclass) that runs its children in order: forward not overridden."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _all_bns_in_sequentials(model: nn.Sequential) -> bool:
    """True when every BatchNorm is reached from the root through Sequentials only."""
    reachable: set[int] = set()
    stack: list[nn.Module] = [model]
    while stack:
        seq = stack.pop()
        for child in seq.children():
            reachable.add(id(child))
            if _is_plain_sequential(child):
                stack.append(child)
    return all(id(m) in reachable for m in model.modules() if isinstance(m, _BN_TYPES))


def _flatten(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module, nn.Module, str]]:
    """(qualified name, module, parent Sequential, key in parent) in execution order."""
    out = []
    for key, child in seq._modules.items():
        if child is None:
            continue
        name = f"{prefix}{key}"
        if _is_plain_sequential(child):
            out += _flatten(child, name + ".")
        else:
            out.append((name, child, seq, key))
    return out


def _channel_problem(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn`` does not normalize ``layer``'s output channels, or None when it does."""
    out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != out_channels:
        return (
            f"num_features={bn.num_features} differs from the layer's {out_channels} "
            "output channels"
        )
    dim = getattr(bn, "dim", 1)
    fixed_ranks = (
        getattr(bn, "_ranks", ())
        if isinstance(bn, _FixedRank)
        else {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}.get(type(bn))
    )
    if isinstance(layer, nn.Linear):
        if dim == -1:
            return None
        if dim == 1 and (fixed_ranks is None or 2 in fixed_ranks):
            return None  # (N, C) input: the features are axis 1
        return (
            f"{type(bn).__name__} (channel axis {dim}) does not normalize the Linear's output "
            "features (the last axis)"
        )
    rank = len(layer.kernel_size) + 2
    if dim in (1, 1 - rank) and (not fixed_ranks or rank in fixed_ranks):
        return None
    return (
        f"{type(bn).__name__} (channel axis {dim}) does not normalize the output channels "
        f"(axis 1) of {type(layer).__name__}"
    )


def _bn_problem(bn: nn.Module) -> str | None:
    if nn.parameter.is_lazy(bn.running_mean) or nn.parameter.is_lazy(bn.weight):
        return "the BatchNorm's parameters are not initialized (lazy module)"
    if bn.running_mean is None or bn.running_var is None:
        return (
            "no running statistics (track_running_stats=False): it normalizes with batch "
            "statistics in eval too, so it cannot be folded"
        )
    return None


def _layer_problem(layer: nn.Module) -> str | None:
    if nn.parameter.is_lazy(layer.weight):
        return "the layer's parameters are not initialized (lazy module)"
    return None


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn``'s eval-mode affine map into ``layer``'s weight and bias."""
    weight = layer.weight
    f64 = {"dtype": torch.float64, "device": weight.device}
    mean = bn.running_mean.to(**f64)
    var = bn.running_var.to(**f64)
    gamma = bn.weight.to(**f64) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.to(**f64) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    w = weight.to(torch.float64)
    if isinstance(layer, _CONV_T):
        # weight: (in, out / groups, *kernel); output channel g * (out / groups) + j is
        # weight[g-th block of in, j].
        g = layer.groups
        in_ch, out_per_group = w.shape[0], w.shape[1]
        kernel = w.shape[2:]
        w = w.reshape(g, in_ch // g, out_per_group, *kernel)
        s = scale.reshape(g, 1, out_per_group, *([1] * len(kernel)))
        w = (w * s).reshape(in_ch, out_per_group, *kernel)
    else:
        # Linear (out, in) and Conv (out, in / groups, *kernel): output channels on axis 0.
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    old_bias = layer.bias.to(**f64) if layer.bias is not None else torch.zeros_like(mean)
    new_bias = (old_bias - mean) * scale + beta
    weight.copy_(w.to(weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_(new_bias.to(layer.bias.dtype))
    else:
        layer.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=weight.requires_grad)


def _reason_not_foldable(
    layer_name: str, layer: nn.Module, bn: nn.Module, counts: dict[int, int]
) -> str | None:
    for problem in (_bn_problem(bn), _layer_problem(layer), _channel_problem(layer, bn)):
        if problem:
            return problem
    if counts.get(id(layer), 1) > 1:
        return f"'{layer_name}' is registered more than once in the model (shared module)"
    if counts.get(id(bn), 1) > 1:
        return "the BatchNorm is registered more than once in the model (shared module)"
    return None


# ------------------------------------------------------------------------ Sequential


def _fold_sequential(model: nn.Sequential, counts: dict[int, int]) -> FoldSummary:
    summary = FoldSummary(traced=False)
    flat = _flatten(model, "")
    for i, (name, bn, parent, key) in enumerate(flat):
        if not isinstance(bn, _BN_TYPES):
            continue
        if i == 0 or not isinstance(flat[i - 1][1], _LAYER_TYPES):
            before = "nothing (first module)" if i == 0 else type(flat[i - 1][1]).__name__
            summary.skipped.append(
                (name, f"not directly after a Linear/Conv/ConvTranspose (after {before})")
            )
            continue
        layer_name, layer = flat[i - 1][0], flat[i - 1][1]
        reason = _reason_not_foldable(layer_name, layer, bn, counts)
        if reason:
            summary.skipped.append((name, reason))
            continue
        _fold_into(layer, bn)
        parent._modules[key] = nn.Identity()
        summary.folded.append((name, layer_name))
    return summary


# ------------------------------------------------------------------------------ fx


class _Tracer(fx.Tracer):
    """torch.fx's tracer with normlab modules (and the foldable BatchNorms) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (*_BN_TYPES, *_LAYER_TYPES)):
            return True
        if type(m).__module__.startswith("normlab.") and not isinstance(m, nn.Sequential):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[attr] = module


def _fold_traced(
    model: nn.Module, counts: dict[int, int], original: nn.Module | None
) -> tuple[fx.GraphModule, FoldSummary]:
    summary = FoldSummary(traced=True)
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises several types for untraceable code
        raise ValueError(
            f"fold_batchnorm cannot trace {type(model).__name__} with torch.fx ({exc}); fold "
            "an nn.Sequential, or the traceable submodules one by one"
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    nodes = list(graph.nodes)
    calls: dict[str, int] = {}
    for node in nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    attr_reads = [n.target for n in nodes if n.op == "get_attr"]

    seen_bn: set[str] = set()
    for node in nodes:
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(node.target)
        if not isinstance(bn, _BN_TYPES) or node.target in seen_bn:
            continue
        name = node.target
        seen_bn.add(name)
        reason = None
        prod = node.args[0] if node.args else None
        if calls[name] > 1:
            reason = f"called {calls[name]} times in the forward"
        elif len(node.args) != 1 or any(v is not None for v in node.kwargs.values()):
            reason = "called with arguments besides its input (mask/lengths)"
        elif not (
            isinstance(prod, fx.Node)
            and prod.op == "call_module"
            and isinstance(gm.get_submodule(prod.target), _LAYER_TYPES)
        ):
            src = prod.format_node() if isinstance(prod, fx.Node) else repr(prod)
            reason = f"its input is not the output of a Linear/Conv/ConvTranspose ({src})"
        elif len(prod.users) != 1:
            others = sorted(u.name for u in prod.users if u is not node)
            reason = (
                f"the output of '{prod.target}' also feeds {others}: folding would change "
                "their input"
            )
        elif calls[prod.target] > 1:
            reason = f"'{prod.target}' is called {calls[prod.target]} times in the forward"
        elif any(t.startswith(prod.target + ".") for t in attr_reads):
            reason = f"the forward reads the parameters of '{prod.target}' directly"
        else:
            reason = _reason_not_foldable(prod.target, gm.get_submodule(prod.target), bn, counts)
        if reason:
            summary.skipped.append((name, reason))
            continue
        _fold_into(gm.get_submodule(prod.target), bn)
        node.replace_all_uses_with(prod)
        graph.erase_node(node)
        _set_submodule(gm, name, nn.Identity())
        if original is not None:
            _set_submodule(original, name, nn.Identity())
        summary.folded.append((name, prod.target))

    for name, m in model.named_modules():
        if isinstance(m, _BN_TYPES) and name not in seen_bn:
            summary.skipped.append((name, "not called as a module in the traced forward"))
    graph.lint()
    gm.recompile()
    return gm, summary
