"""The inputs of a case and the implementations that compete on them.

For each case: torch eager (``torch.nn.functional``; for the fused add, ``x + r`` then the
norm), or for masked BatchNorm the plain-torch masked implementations
(``plain_masked``), which are also what ``torch.compile`` compiles; and normlab's
functional op, run under a backend chosen by the caller. Every implementation gets the same
input tensors (its own running-statistics buffers) and allocates its outputs itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import normlab.functional as nlf
from normlab.bench import plain_masked
from normlab.bench.cases import Case

MOMENTUM = 0.1
EPS = 1e-5


@dataclass(frozen=True)
class Implementation:
    """A function and a factory of its arguments (fresh running buffers for each call of
    the factory, shared inputs)."""

    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    make_args: Callable[[], tuple]

    def bind(self, fn: Callable | None = None) -> Callable[[], tuple[torch.Tensor, ...]]:
        """A zero-argument call of ``fn`` (default: this implementation's function, or a
        compiled version of it) on one set of arguments; always returns a tuple."""
        target = self.fn if fn is None else fn
        args = self.make_args()

        def call() -> tuple[torch.Tensor, ...]:
            outputs = target(*args)
            return outputs if isinstance(outputs, tuple) else (outputs,)

        return call


@dataclass
class Workload:
    """A case's tensors and implementations.

    ``baselines`` maps a name to a plain-torch implementation ("torch eager", or the masked
    variants); ``normlab`` is normlab's op. ``differentiable`` are the tensors the backward
    differentiates (input, residual, weight, bias), ``output_grads`` the incoming gradients.
    """

    case: Case
    baselines: dict[str, Implementation]
    normlab: Implementation
    differentiable: tuple[torch.Tensor, ...]
    output_grads: tuple[torch.Tensor, ...]


def padded_lengths(batch: int, length: int, padding: float) -> torch.Tensor:
    """Lengths spread evenly from ``(1 - 2 * padding) * length`` to ``length``: a fraction
    ``padding`` of the positions is padding on average, every sample keeps 2 or more."""
    fractions = torch.linspace(1.0 - 2.0 * padding, 1.0, batch, dtype=torch.float64)
    return (fractions * length).round().long().clamp(min=2, max=length)


def _randn(shape, generator: torch.Generator, dtype: torch.dtype = torch.float32):
    """Standard normal values of ``dtype`` on the generator's device."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)


def _affine(
    n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32, grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    weight = 1.0 + 0.1 * _randn(n, generator, dtype)
    bias = 0.1 * _randn(n, generator, dtype)
    return weight.requires_grad_(grad), bias.requires_grad_(grad)


def _fixed(*tensors):
    """An argument factory that always returns the same tensors."""
    return lambda: tensors


# Eager functions (module level, so that torch.compile sees ordinary Python functions).


def torch_layer_norm(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def torch_rms_norm(x, weight):
    return F.rms_norm(x, (x.shape[-1],), weight)


def torch_add_layer_norm(x, residual, weight, bias):
    total = x + residual
    return F.layer_norm(total, (total.shape[-1],), weight, bias, EPS), total


def torch_add_rms_norm(x, residual, weight):
    total = x + residual
    return F.rms_norm(total, (total.shape[-1],), weight), total


def torch_batch_norm(x, running_mean, running_var, weight, bias, training, channel_dim):
    """BatchNorm of channel axis 1, or of the last axis as (rows, C) without a copy."""
    if channel_dim == 1:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)
    rows = x.reshape(-1, x.shape[-1])
    y = F.batch_norm(rows, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)
    return y.reshape(x.shape)


def torch_group_norm(x, groups, weight, bias):
    return F.group_norm(x, groups, weight, bias, EPS)


def torch_instance_norm(x, weight, bias):
    return F.instance_norm(x, None, None, weight, bias, True, MOMENTUM, EPS)


# normlab's ops with the same arguments.


def normlab_layer_norm(x, weight, bias):
    return nlf.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def torch_channels_first_layer_norm(x, weight, bias):
    """What a ConvNeXt block does in torch: permute to channels last, LayerNorm, permute
    back (a view; the LayerNorm copies its non-contiguous input)."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, EPS)
    return y.permute(0, 3, 1, 2)


def normlab_channels_first_layer_norm(x, weight, bias):
    return nlf.layer_norm(x, (x.shape[1],), weight, bias, EPS, dim=1)


def normlab_rms_norm(x, weight):
    return nlf.rms_norm(x, (x.shape[-1],), weight)


def normlab_add_layer_norm(x, residual, weight, bias):
    return nlf.add_layer_norm(x, residual, (x.shape[-1],), weight, bias, EPS)


def normlab_add_rms_norm(x, residual, weight):
    return nlf.add_rms_norm(x, residual, (x.shape[-1],), weight)


def normlab_batch_norm(x, running_mean, running_var, weight, bias, training, channel_dim, lengths):
    return nlf.batch_norm(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        MOMENTUM,
        EPS,
        dim=channel_dim,
        lengths=lengths,
    )


def normlab_group_norm(x, groups, weight, bias):
    return nlf.group_norm(x, groups, weight, bias, EPS)


def normlab_instance_norm(x, weight, bias):
    return nlf.instance_norm(x, None, None, weight, bias, True, MOMENTUM, EPS)


def _feature_input(case: Case, g: torch.Generator) -> torch.Tensor:
    """x in the case's layout, a leaf that requires grad (but for inference): contiguous,
    or a strided view (every other block of ``features`` columns of a twice-as-wide
    tensor)."""
    dtype = case.torch_dtype
    if case.layout == "strided":
        rows, features = case.shape
        x = _randn((rows, 2 * features), g, dtype)[:, :features]
    else:
        x = _randn(case.shape, g, dtype)
    return x.detach().requires_grad_(not case.inference)


def _feature_workload(case: Case, g: torch.Generator) -> Workload:
    dtype = case.torch_dtype
    x = _feature_input(case, g)
    features = case.shape[1] if case.layout == "channels_first" else case.shape[-1]
    weight, bias = _affine(features, g, dtype, grad=not case.inference)
    dy = _randn(case.shape, g, dtype)
    if case.op in ("add_layer_norm", "add_rms_norm"):
        residual = _randn(case.shape, g, dtype).requires_grad_(not case.inference)
        dsum = _randn(case.shape, g, dtype)
        if case.op == "add_layer_norm":
            args, eager, ours = (
                (x, residual, weight, bias),
                torch_add_layer_norm,
                normlab_add_layer_norm,
            )
        else:
            args, eager, ours = (x, residual, weight), torch_add_rms_norm, normlab_add_rms_norm
        return Workload(
            case,
            {"torch eager": Implementation(eager, _fixed(*args))},
            Implementation(ours, _fixed(*args)),
            args,
            (dy, dsum),
        )
    if case.op == "layer_norm" and case.layout == "channels_first":
        args = (x, weight, bias)
        eager, ours = torch_channels_first_layer_norm, normlab_channels_first_layer_norm
    elif case.op == "layer_norm":
        args, eager, ours = (x, weight, bias), torch_layer_norm, normlab_layer_norm
    else:
        args, eager, ours = (x, weight), torch_rms_norm, normlab_rms_norm
    return Workload(
        case,
        {"torch eager": Implementation(eager, _fixed(*args))},
        Implementation(ours, _fixed(*args)),
        args,
        (dy,),
    )


def _batch_norm_workload(case: Case, g: torch.Generator) -> Workload:
    x = torch.randn(case.shape, generator=g).requires_grad_(not case.inference)
    channels = case.shape[case.channel_dim]
    weight, bias = _affine(channels, g, grad=not case.inference)
    dy = torch.randn(case.shape, generator=g)
    mean0 = 0.1 * torch.randn(channels, generator=g)
    var0 = 1.0 + 0.1 * torch.rand(channels, generator=g)

    def args_with(*tail):
        def make():
            return (x, mean0.clone(), var0.clone(), weight, bias, *tail)

        return make

    if case.masked:
        batch, length = case.shape[0], case.shape[2 if case.channel_dim == 1 else 1]
        lengths = padded_lengths(batch, length, case.padding)

        def masked_args():
            return (x, lengths, weight, bias, mean0.clone(), var0.clone(), case.channel_dim)

        baselines = {
            f"plain masked: {name}": Implementation(fn, masked_args)
            for name, fn in plain_masked.VARIANTS.items()
        }
        ours = Implementation(
            normlab_batch_norm, args_with(case.training, case.channel_dim, lengths)
        )
    else:
        baselines = {
            "torch eager": Implementation(
                torch_batch_norm, args_with(case.training, case.channel_dim)
            )
        }
        ours = Implementation(normlab_batch_norm, args_with(case.training, case.channel_dim, None))
    return Workload(case, baselines, ours, (x, weight, bias), (dy,))


def _image_workload(case: Case, g: torch.Generator) -> Workload:
    x = torch.randn(case.shape, generator=g).requires_grad_(not case.inference)
    weight, bias = _affine(case.shape[1], g, grad=not case.inference)
    dy = torch.randn(case.shape, generator=g)
    if case.op == "group_norm":
        args = (x, case.groups, weight, bias)
        eager, ours = torch_group_norm, normlab_group_norm
    else:
        args = (x, weight, bias)
        eager, ours = torch_instance_norm, normlab_instance_norm
    return Workload(
        case,
        {"torch eager": Implementation(eager, _fixed(*args))},
        Implementation(ours, _fixed(*args)),
        (x, weight, bias),
        (dy,),
    )


def build_workload(case: Case, seed: int = 0, device: str = "cpu") -> Workload:
    """Random inputs for ``case`` on ``device`` (deterministic in ``seed``; the feature
    norms in the case's dtype, the others float32 on the CPU) and its implementations."""
    g = torch.Generator(device=device).manual_seed(seed)
    if case.op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
        return _feature_workload(case, g)
    if case.op == "batch_norm":
        return _batch_norm_workload(case, g)
    if case.op in ("group_norm", "instance_norm"):
        return _image_workload(case, g)
    raise ValueError(f"no workload for op {case.op!r}")
