"""The norms and backends the edge-case battery (issue #8, tests/test_battery_*.py) runs over.

A ``NormCase`` is one norm module in one mode (training or eval) on a small input whose
axis 0 is the batch: how to build it with random parameters and running statistics, its
float64 reference (forward and input gradient), its torch.nn twin where torch has one, and
which outputs share statistics with an input element (``affected``). Every battery test that
says "every norm" takes its cases from ``CASES``; every test that says "every backend" runs on
``BACKENDS``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab import backends
from normlab import reference as ref

# "auto" takes the Numba kernels wherever they apply (conftest sets AUTO_MIN_ELEMENTS=0),
# "composite" the plain torch backend. A backend added to normlab.backends.BACKENDS (e.g.
# "triton", on the CPU interpreter here) joins the battery through CHEAP_BACKENDS below.
BACKENDS = ["auto", "composite"]
EXTRA_BACKENDS = [b for b in backends.BACKENDS if b not in (*BACKENDS, "numba")]
CHEAP_BACKENDS = BACKENDS + EXTRA_BACKENDS

over_backends = pytest.mark.parametrize("backend", BACKENDS, indirect=True)
over_cheap_backends = pytest.mark.parametrize("backend", CHEAP_BACKENDS, indirect=True)


@contextlib.contextmanager
def applicable(backend: str) -> Iterator[None]:
    """Skip the test where a forced extra backend refuses the case with its documented
    ValueError ("backend 'triton' cannot run this normalization ...": another layout or
    dtype); every other error is raised."""
    try:
        yield
    except ValueError as error:
        if backend in EXTRA_BACKENDS and f"backend '{backend}' cannot run" in str(error):
            pytest.skip(f"{backend} does not take this case")
        raise


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().cpu().numpy().copy()


@dataclass(frozen=True)
class NormCase:
    """One norm module in one mode.

    build: ``build(dtype, **options)`` -> the normlab module (random parameters and
        running statistics).
    shape: the input shape; axis 0 is the batch.
    training: the module's mode.
    forward_ref / backward_ref: float64 NumPy y, and dx for an upstream dy, computed from the
        module's state *before* its forward (which may update running statistics).
    shared: the axes whose elements share one statistic ("reduced"), () for elementwise
        norms (eval, PowerNorm after warmup); GroupNorm adds ``groups``.
    torch_twin: ``torch_twin(dtype)`` -> the torch.nn module with the same state_dict, or None.
    running_ref: ``running_ref(module, x)`` -> {buffer name: float64 value after the
        forward}, for the buffers a training forward updates (from the state before it).
    channel: the input axis the running statistics (and weight/bias) are indexed by.
    """

    name: str
    build: Builder
    shape: tuple[int, ...]
    training: bool
    forward_ref: Callable
    backward_ref: Callable
    shared: tuple[int, ...]
    groups: int = 0
    torch_twin: Callable[[torch.dtype], nn.Module] | None = None
    running_ref: Callable | None = None  # (m, x) -> {buffer: float64 value after forward}
    channel: int = 1  # the axis of the running statistics' entries

    def with_batch(self, n: int) -> tuple[int, ...]:
        return (n, *self.shape[1:])

    def make(self, dtype=torch.float32, **options) -> nn.Module:
        """The module (constructor ``options`` added to the case's own), in its mode."""
        module = self.build(dtype, **options)
        module.train(self.training)
        return module

    def twin(self, module: nn.Module) -> nn.Module | None:
        """The torch.nn module with ``module``'s state, or None."""
        if self.torch_twin is None:
            return None
        dtype = next(iter(module.state_dict().values())).dtype
        theirs = self.torch_twin(dtype)
        theirs.load_state_dict(module.state_dict(), strict=True)
        theirs.train(self.training)
        return theirs

    def affected(self, shape, index) -> np.ndarray:
        """Bool array of ``shape``: the outputs that share a statistic with input ``index``
        (the element itself for elementwise norms)."""
        index = tuple(i % n for i, n in zip(index, shape, strict=True))
        out = np.ones(shape, dtype=bool)
        for axis, i in enumerate(index):
            if axis in self.shared:
                continue
            if axis == 1 and self.groups:  # GroupNorm: the channels of index's group
                per = shape[1] // self.groups
                keep = np.zeros(shape[1], dtype=bool)
                keep[(i // per) * per : (i // per + 1) * per] = True
            else:
                keep = np.zeros(shape[axis], dtype=bool)
                keep[i] = True
            out &= keep.reshape([-1 if a == axis else 1 for a in range(len(shape))])
        return out


def randomize(module: nn.Module) -> nn.Module:
    """Random affine parameters (weight near 1), running statistics (variance in [0.5, 1.5])."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            scale = 1.0 if name == "weight" else 0.0
            param.copy_(scale + 0.5 * torch.randn(param.shape, dtype=torch.float64))
        for name, buffer in module.named_buffers():
            if name in ("running_mean", "running_grad_stat"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, dtype=torch.float64))
            elif name in ("running_var", "running_phi"):
                buffer.copy_(torch.rand(buffer.shape, dtype=torch.float64) + 0.5)
    return module


def _p(module, name):
    return _np(getattr(module, name, None))


def _affine(m):
    return _p(m, "weight"), _p(m, "bias")


def _layer_norm_case(name, make, shape, dim=None):
    def fwd(m, x):
        return ref.layer_norm(x, m.normalized_shape, *_affine(m), m.eps, dim)

    def bwd(m, x, dy):
        return ref.layer_norm_backward(dy, x, m.normalized_shape, *_affine(m), m.eps, dim)[0]

    reduced = (len(shape) - 1,) if dim is None else (dim,)
    twin = None if dim is not None else (lambda dt: nn.LayerNorm(shape[-1], dtype=dt))
    return NormCase(name, make, shape, True, fwd, bwd, reduced, torch_twin=twin)


def _rms_norm_case(name, make, shape):
    def fwd(m, x):
        return ref.rms_norm(x, m.normalized_shape, _p(m, "weight"), m.eps)

    def bwd(m, x, dy):
        return ref.rms_norm_backward(dy, x, m.normalized_shape, _p(m, "weight"), m.eps)[0]

    twin = lambda dt: nn.RMSNorm(shape[-1], dtype=dt)  # noqa: E731
    return NormCase(name, make, shape, True, fwd, bwd, (len(shape) - 1,), torch_twin=twin)


def _batch_norm_case(name, make, shape, training, dim=1, twin=None):
    channel = dim % len(shape)
    reduced = tuple(a for a in range(len(shape)) if a != channel) if training else ()

    def fwd(m, x):
        if training:
            return ref.batch_norm_train(x, *_affine(m), m.eps, dim)
        stats = _p(m, "running_mean"), _p(m, "running_var")
        return ref.batch_norm_eval(x, *stats, *_affine(m), m.eps, dim)

    def bwd(m, x, dy):
        if training:
            return ref.batch_norm_train_backward(dy, x, *_affine(m), m.eps, dim)[0]
        stats = _p(m, "running_mean"), _p(m, "running_var")
        return ref.batch_norm_eval_backward(dy, x, *stats, *_affine(m), m.eps, dim)[0]

    def running(m, x):
        stats = _p(m, "running_mean"), _p(m, "running_var")
        mean, var = ref.batch_norm_update_running_stats(x, *stats, m.momentum, dim)
        return {"running_mean": mean, "running_var": var}

    return NormCase(
        name,
        make,
        shape,
        training,
        fwd,
        bwd,
        reduced,
        0,
        twin,
        running if training else None,
        channel,
    )


def _batch_renorm_case(name, make, shape):
    def state(m):
        return _p(m, "running_mean"), _p(m, "running_var"), *_affine(m)

    def fwd(m, x):
        return ref.batch_renorm_train(x, *state(m), m.eps, m.r_max, m.d_max)

    def bwd(m, x, dy):
        return ref.batch_renorm_train_backward(dy, x, *state(m), m.eps, m.r_max, m.d_max)[0]

    def running(m, x):
        stats = _p(m, "running_mean"), _p(m, "running_var")
        mean, var = ref.batch_norm_update_running_stats(x, *stats, m.momentum)
        return {"running_mean": mean, "running_var": var}

    reduced = tuple(a for a in range(len(shape)) if a != 1)
    return NormCase(name, make, shape, True, fwd, bwd, reduced, 0, None, running)


def _power_norm_case(name, make, shape, warmup):
    def fwd(m, x):
        if warmup:
            return ref.power_norm_warmup(x, *_affine(m), m.eps, m.dim)
        return ref.power_norm_forward(x, _p(m, "running_phi"), *_affine(m), m.eps, m.dim)

    def bwd(m, x, dy):
        if warmup:
            return ref.power_norm_warmup_backward(dy, x, *_affine(m), m.eps, m.dim)[0]
        state = _p(m, "running_phi"), _p(m, "running_grad_stat"), *_affine(m)
        return ref.power_norm_backward(dy, x, *state, m.eps, m.alpha_bkw, m.dim)[0]

    def running(m, x):  # the first training step: factor 1 in warmup, else 1 - alpha_fwd
        momentum = 1.0 if warmup else 1.0 - m.alpha_fwd
        phi = ref.power_norm_update_running_phi(x, _p(m, "running_phi"), momentum, m.dim)
        return {"running_phi": phi}

    # After warmup the forward divides by the running statistic: elementwise.
    reduced = tuple(range(len(shape) - 1)) if warmup else ()
    return NormCase(name, make, shape, True, fwd, bwd, reduced, 0, None, running, len(shape) - 1)


def _group_norm_case(name, make, shape, groups):
    def fwd(m, x):
        return ref.group_norm(x, groups, *_affine(m), m.eps)

    def bwd(m, x, dy):
        return ref.group_norm_backward(dy, x, groups, *_affine(m), m.eps)[0]

    twin = lambda dt: nn.GroupNorm(groups, shape[1], dtype=dt)  # noqa: E731
    reduced = tuple(range(2, len(shape)))
    return NormCase(name, make, shape, True, fwd, bwd, reduced, groups, twin)


def _instance_norm_case(name, make, shape, twin):
    def fwd(m, x):
        return ref.instance_norm(x, *_affine(m), m.eps)

    def bwd(m, x, dy):
        return ref.instance_norm_backward(dy, x, *_affine(m), m.eps)[0]

    def running(m, x):
        stats = _p(m, "running_mean"), _p(m, "running_var")
        mean, var = ref.instance_norm_update_running_stats(x, *stats, m.momentum)
        return {"running_mean": mean, "running_var": var}

    reduced = tuple(range(2, len(shape)))
    return NormCase(name, make, shape, True, fwd, bwd, reduced, 0, twin, running)


@dataclass(frozen=True)
class Builder:
    """``Builder(cls, args, kwargs)(dtype)``: a randomized ``cls(*args, **kwargs)``."""

    cls: type
    args: tuple
    kwargs: dict

    def __call__(self, dtype=torch.float32, **options) -> nn.Module:
        return randomize(self.cls(*self.args, dtype=dtype, **{**self.kwargs, **options}))


def _built(cls, *args, **kwargs):
    return Builder(cls, args, kwargs)


_CASES = [
    _layer_norm_case("LayerNorm", _built(normlab.LayerNorm, 8), (6, 5, 8)),
    _layer_norm_case("LayerNorm-dim1", _built(normlab.LayerNorm, 4, dim=1), (6, 4, 5), dim=1),
    _rms_norm_case("RMSNorm", _built(normlab.RMSNorm, 8), (6, 5, 8)),
    _batch_norm_case(
        "BatchNorm1d-train",
        _built(normlab.BatchNorm1d, 4),
        (6, 4, 5),
        True,
        twin=lambda dt: nn.BatchNorm1d(4, dtype=dt),
    ),
    _batch_norm_case(
        "BatchNorm1d-eval",
        _built(normlab.BatchNorm1d, 4),
        (6, 4, 5),
        False,
        twin=lambda dt: nn.BatchNorm1d(4, dtype=dt),
    ),
    _batch_norm_case(
        "BatchNorm2d-train",
        _built(normlab.BatchNorm2d, 3),
        (4, 3, 3, 4),
        True,
        twin=lambda dt: nn.BatchNorm2d(3, dtype=dt),
    ),
    _batch_norm_case("BatchNorm-dim-1", _built(normlab.BatchNorm, 4, dim=-1), (6, 5, 4), True, -1),
    _batch_renorm_case("BatchRenorm1d", _built(normlab.BatchRenorm1d, 4), (6, 4, 5)),
    _group_norm_case("GroupNorm", _built(normlab.GroupNorm, 2, 4), (6, 4, 5), 2),
    _instance_norm_case(
        "InstanceNorm1d",
        _built(normlab.InstanceNorm1d, 4, affine=True, track_running_stats=True),
        (6, 4, 5),
        lambda dt: nn.InstanceNorm1d(4, affine=True, track_running_stats=True, dtype=dt),
    ),
    _instance_norm_case(
        "InstanceNorm2d",
        _built(normlab.InstanceNorm2d, 3, affine=True, track_running_stats=True),
        (4, 3, 3, 4),
        lambda dt: nn.InstanceNorm2d(3, affine=True, track_running_stats=True, dtype=dt),
    ),
    _power_norm_case("PowerNorm-warmup", _built(normlab.PowerNorm, 4), (6, 5, 4), True),
    _power_norm_case(
        "PowerNorm-after-warmup", _built(normlab.PowerNorm, 4, warmup_iters=0), (6, 5, 4), False
    ),
]

CASES = {case.name: case for case in _CASES}
over_cases = pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
