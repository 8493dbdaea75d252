"""Properties every normalization must have, over random shapes, axes, dtypes, masks, memory
layouts and backends (hypothesis; settings in tests/strategies.py).

- LayerNorm cannot see a per-sample shift and positive scale of its input (RMSNorm: scale).
- BatchNorm (and Batch Renorm, PowerNorm) in training commutes with a permutation of the
  batch: outputs, running statistics and gradients.
- Masked norms cannot see extra padding: appending padded positions (of any value, NaN too)
  changes nothing at the original positions, nor the running statistics or the gradients.
- LayerNorm's input gradient sums to zero over the normalized axes.
- Every backend equals the float64 reference: outputs, running statistics and gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, reject
from hypothesis import strategies as st

import normlab.reference as ref
import strategies as S
from fuzz_api import check_call
from normlab import axes as _axes
from normlab import backends
from normlab import functional as F
from normlab.backends import registry as dispatch
from tolerances import grad_tol, tol

# The backends every property runs on. A backend added to normlab.backends.BACKENDS joins
# test_every_backend_equals_the_reference through BACKEND_CALLS below.
PROPERTY_BACKENDS = ["auto", "composite"]


def _close(actual, expected, tolerance, **kw):
    torch.testing.assert_close(actual, expected, **tolerance, equal_nan=True, **kw)


def _min_variance(x, norm_axes, mask=None):
    return float(ref.statistics(x, norm_axes, mask=mask)[1].min())


# ----------------------------------------------------------------------------------------------
# LayerNorm: invariant to a per-sample shift and positive scale


@st.composite
def feature_cases(draw, dtypes=S.FLOAT_KERNEL_DTYPES):
    """(x values, reduction axes, normalized_shape, dim, dtype, layout, rng): LayerNorm over
    the trailing axes or over ``dim``, at least 2 elements per sample, non-degenerate
    values (S.nondegenerate: the variance of each sample is at least 0.25)."""
    rng = np.random.default_rng(draw(S.seeds))
    rank = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 5)) for _ in range(rank)]
    count = draw(st.integers(1, rank))
    if draw(st.booleans()):
        axes, dim = tuple(range(rank - count, rank)), None
    else:
        axes = tuple(sorted(draw(st.permutations(range(rank)))[:count]))
        dim = tuple(a - rank if draw(st.booleans()) else a for a in axes)
    if np.prod([shape[a] for a in axes]) < 2:
        shape[axes[-1]] = draw(st.integers(2, 5))
    values = S.nondegenerate(rng, shape, axes)
    normalized = tuple(shape[a] for a in axes)
    dtype = draw(st.sampled_from(dtypes))
    return values, axes, normalized, dim, dtype, draw(st.sampled_from(S.LAYOUTS)), rng


# Not the default 1e-5: eps / var is the relative amount by which eps breaks the invariance
# (the variance changes under the scale, eps does not); with var >= 0.25 * 0.5**2 here, 1e-12
# keeps that below float64's rounding.
INVARIANCE_EPS = 1e-12


@pytest.mark.parametrize("backend", PROPERTY_BACKENDS, indirect=True)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@S.budget(40)
@given(case=feature_cases())
def test_layer_norm_is_invariant_to_per_sample_shift_and_positive_scale(backend, norm, case):
    values, axes, normalized, dim, dtype, layout, rng = case
    stat_shape = [1 if d in axes else n for d, n in enumerate(values.shape)]
    # Per sample: a positive scale in [0.5, 2] and (LayerNorm; RMSNorm is not centred, so it
    # sees a shift) a shift in [-2, 2]; transformed in float64, then rounded once to dtype.
    scale = rng.uniform(0.5, 2, stat_shape)
    shift = rng.uniform(-2, 2, stat_shape) if norm == "layer_norm" else 0.0
    weight = torch.tensor(S.weight_values(rng, normalized), dtype=dtype)
    kwargs = {"normalized_shape": normalized, "weight": weight, "dim": dim, "eps": INVARIANCE_EPS}
    if norm == "layer_norm":
        kwargs["bias"] = torch.tensor(rng.standard_normal(normalized), dtype=dtype)
    fn = getattr(F, norm)
    y = fn(S.tensor(values, dtype, layout, rng), **kwargs)
    y_transformed = fn(S.tensor(scale * values + shift, dtype, layout, rng), **kwargs)
    _close(y_transformed, y, tol(dtype))


# ----------------------------------------------------------------------------------------------
# BatchNorm in training: equivariant to a permutation of the batch


@st.composite
def channel_cases(draw, fns=("batch_norm", "batch_renorm", "power_norm")):
    """A BatchNorm-family training call on (N, ...) with the channel axis ``dim`` >= 1,
    optionally masked, whose real values per channel have a variance of at least 0.01 (so
    the order of summation, which a permutation changes, moves the output by rounding only).
    Returns (fn, values, mask or None, keyword arguments without input and mask, layout,
    rng)."""
    rng = np.random.default_rng(draw(S.seeds))
    fn = draw(st.sampled_from(fns))
    rank = draw(st.integers(2, 4))
    shape = [draw(st.integers(2, 6)), *(draw(st.integers(1, 4)) for _ in range(rank - 1))]
    channel = draw(st.integers(1, rank - 1))
    channels = shape[channel]
    dtype = draw(st.sampled_from(S.FLOAT_KERNEL_DTYPES))
    values = S.normal(rng, shape, 2.0, 0.5)
    mask = None
    if draw(st.booleans()):
        mask = rng.random([n for d, n in enumerate(shape) if d != channel]) < 0.7
    norm_axes = _axes.channel_norm_axes(rank, channel)
    real = None if mask is None else np.expand_dims(mask, channel)
    count = np.prod(shape) // channels if mask is None else mask.sum()
    assume_ok = count >= 2 and _min_variance(values, norm_axes, real) >= 0.01
    if not assume_ok:
        reject()
    kwargs = {
        "dim": channel - rank if draw(st.booleans()) else channel,
        "training": True,
        "weight": torch.tensor(S.weight_values(rng, channels), dtype=dtype, requires_grad=True),
        "bias": torch.tensor(rng.standard_normal(channels), dtype=dtype, requires_grad=True),
        "momentum": 0.5,
    }
    if fn == "power_norm":
        kwargs["running_phi"] = torch.tensor(rng.uniform(0.5, 2, channels), dtype=dtype)
        kwargs["running_grad_stat"] = torch.tensor(rng.standard_normal(channels), dtype=dtype)
        kwargs["warmup"] = draw(st.booleans())
    else:
        kwargs["running_mean"] = torch.tensor(rng.standard_normal(channels), dtype=dtype)
        kwargs["running_var"] = torch.tensor(rng.uniform(0.5, 2, channels), dtype=dtype)
    if fn == "batch_renorm":  # limits that clip, so r and d are not the identity
        kwargs.update(r_max=1.2, d_max=0.3)
    return fn, values, mask, kwargs, dtype, draw(st.sampled_from(S.LAYOUTS)), rng


def _copy_kwargs(kwargs):
    """The same arguments with fresh parameters (own gradients) and fresh buffers."""
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().clone().requires_grad_(value.requires_grad)
        out[name] = value
    return out


BUFFER_NAMES = ("running_mean", "running_var", "running_phi", "running_grad_stat")


@pytest.mark.parametrize("backend", PROPERTY_BACKENDS, indirect=True)
@S.budget(40)
@given(case=channel_cases())
def test_batch_norm_training_is_equivariant_to_permutation_of_the_batch(backend, case):
    fn, values, mask, kwargs, dtype, layout, rng = case
    perm = rng.permutation(values.shape[0])
    dy = rng.standard_normal(values.shape)
    runs = []
    for order in (np.arange(values.shape[0]), perm):
        x = S.tensor(values[order], dtype, layout, rng, requires_grad=True)
        args = _copy_kwargs(kwargs)
        m = None if mask is None else torch.from_numpy(mask[order])
        y = getattr(F, fn)(x, mask=m, **args)
        y.backward(torch.tensor(dy[order], dtype=dtype))
        runs.append((x, y, args))
    (x, y, args), (x_p, y_p, args_p) = runs
    index = torch.from_numpy(perm)
    _close(y_p, y.detach()[index], tol(dtype))
    _close(x_p.grad, x.grad[index], grad_tol(dtype))
    for name in ("weight", "bias"):
        _close(args_p[name].grad, args[name].grad, grad_tol(dtype))
    for name in BUFFER_NAMES:  # updated in the forward, and nu in PowerNorm's backward
        if name in args:
            _close(args_p[name], args[name], grad_tol(dtype))


# ----------------------------------------------------------------------------------------------
# Masked norms: invariant to extra padding


PADDING_VALUES = (np.nan, np.inf, -np.inf, 1e30, -3e4)


@st.composite
def padded_cases(draw):
    """A masked training call and the same call with 1-3 padded positions appended along a
    padding axis (any axis but the channel axis for the BatchNorm family; a spatial axis
    for InstanceNorm/GroupNorm), holding NaN, Inf or huge values. The real values of each
    statistic have a variance of at least 0.01 (rounding, not the padding, is then all that
    moves the output when the kernels' loops change length).
    Returns (fn, base values, base mask, pad axis, extra count, pad value, kwargs, dtype,
    use_lengths, rng)."""
    rng = np.random.default_rng(draw(S.seeds))
    fn = draw(
        st.sampled_from(["batch_norm", "batch_renorm", "power_norm", "instance_norm", "group_norm"])
    )
    dtype = draw(st.sampled_from(S.FLOAT_KERNEL_DTYPES))
    rank = draw(st.integers(3 if fn in ("instance_norm", "group_norm") else 2, 4))
    shape = [draw(st.integers(1, 4)) for _ in range(rank)]
    groups = 1
    if fn == "group_norm":
        groups = draw(st.integers(1, 3))
        shape[1] = groups * draw(st.integers(1, 2))
    if fn in ("instance_norm", "group_norm"):
        channel = 1
        pad_axis = draw(st.integers(2, rank - 1))
    else:
        channel = draw(st.integers(0, rank - 1))
        pad_axis = draw(st.sampled_from([d for d in range(rank) if d != channel]))
    positional = [d for d in range(1, rank) if d != channel]
    use_lengths = (
        channel != 0 and positional == [pad_axis] and draw(st.booleans())
    )  # lengths: the one sequence axis
    mask_shape = [n for d, n in enumerate(shape) if d != channel]
    if use_lengths:
        lengths = rng.integers(0, shape[pad_axis] + 1, shape[0])
        mask = np.arange(shape[pad_axis]) < lengths[:, None]
    else:
        mask = rng.random(mask_shape) < 0.7
    values = S.normal(rng, shape, 2.0, 0.5)
    # The statistics' groups, to require >= 2 real values and a variance >= 0.01 in each.
    if fn in ("batch_norm", "batch_renorm", "power_norm"):
        norm_axes, grouped, real = _axes.channel_norm_axes(rank, channel), values, None
        real = np.expand_dims(mask, channel)
    else:
        per_sample = groups if fn == "group_norm" else shape[1]  # InstanceNorm: C groups
        grouped = values.reshape(_axes.grouped_shape(shape, per_sample))
        norm_axes = _axes.group_norm_axes()
        real = mask.reshape(shape[0], 1, 1, -1)
    counts = np.broadcast_to(real, grouped.shape).sum(axis=norm_axes.reduction)
    if counts.min() < 2 or _min_variance(grouped, norm_axes, real) < 0.01:
        reject()
    kwargs = {}
    channels = shape[channel]
    if fn != "group_norm":
        kwargs["weight"] = torch.tensor(
            S.weight_values(rng, channels), dtype=dtype, requires_grad=True
        )
    kwargs["bias"] = torch.tensor(rng.standard_normal(channels), dtype=dtype, requires_grad=True)
    if fn in ("batch_norm", "batch_renorm", "power_norm"):
        kwargs.update(dim=channel, training=True, momentum=0.5)
    if fn == "group_norm":
        kwargs["num_groups"] = groups
        kwargs["weight"] = torch.tensor(
            S.weight_values(rng, channels), dtype=dtype, requires_grad=True
        )
    elif fn == "power_norm":
        kwargs["running_phi"] = torch.tensor(rng.uniform(0.5, 2, channels), dtype=dtype)
        kwargs["running_grad_stat"] = torch.tensor(rng.standard_normal(channels), dtype=dtype)
        kwargs["warmup"] = draw(st.booleans())
    else:
        kwargs["running_mean"] = torch.tensor(rng.standard_normal(channels), dtype=dtype)
        kwargs["running_var"] = torch.tensor(rng.uniform(0.5, 2, channels), dtype=dtype)
    if fn == "batch_renorm":
        kwargs.update(r_max=1.2, d_max=0.3)
    extra = draw(st.integers(1, 3))
    pad_value = draw(st.sampled_from(PADDING_VALUES))
    mask_axis = pad_axis - (pad_axis > channel)
    return fn, values, mask, pad_axis, mask_axis, extra, pad_value, kwargs, dtype, use_lengths, rng


@pytest.mark.parametrize("backend", PROPERTY_BACKENDS, indirect=True)
@S.budget(40)
@given(case=padded_cases())
def test_masked_norms_are_invariant_to_extra_padding(backend, case):
    fn, values, mask, pad_axis, mask_axis, extra, pad_value, kwargs, dtype, use_lengths, rng = case
    pad_shape = list(values.shape)
    pad_shape[pad_axis] = extra
    padded_values = np.concatenate([values, np.full(pad_shape, pad_value)], axis=pad_axis)
    mask_pad_shape = list(mask.shape)
    mask_pad_shape[mask_axis] = extra
    padded_mask = np.concatenate([mask, np.zeros(mask_pad_shape, bool)], axis=mask_axis)
    # The upstream gradient: random on the original positions, 0 on the appended padding.
    dy = rng.standard_normal(values.shape)
    padded_dy = np.concatenate([dy, np.zeros(pad_shape)], axis=pad_axis)
    runs = []
    for v, m, g in ((values, mask, dy), (padded_values, padded_mask, padded_dy)):
        x = S.tensor(v, dtype, "contiguous", rng, requires_grad=True)
        args = _copy_kwargs(kwargs)
        if use_lengths:
            args["lengths"] = torch.from_numpy(m.sum(1))
        else:
            args["mask"] = torch.from_numpy(m)
        y = getattr(F, fn)(x, **args)
        y.backward(torch.tensor(g, dtype=dtype))
        runs.append((x, y, args))
    (x, y, args), (x_p, y_p, args_p) = runs
    original = tuple(slice(0, n) for n in values.shape)
    _close(y_p.detach()[original], y.detach(), tol(dtype))
    _close(x_p.grad[original], x.grad, grad_tol(dtype))
    appended = [slice(None)] * values.ndim
    appended[pad_axis] = slice(values.shape[pad_axis], None)
    assert torch.equal(x_p.grad[tuple(appended)], torch.zeros_like(x_p.grad[tuple(appended)]))
    for name in ("weight", "bias"):
        if name in args:
            _close(args_p[name].grad, args[name].grad, grad_tol(dtype))
    for name in BUFFER_NAMES:
        if name in args:
            _close(args_p[name], args[name], grad_tol(dtype))


# ----------------------------------------------------------------------------------------------
# LayerNorm: the input gradient sums to zero over the normalized axes


@pytest.mark.parametrize("backend", PROPERTY_BACKENDS, indirect=True)
@pytest.mark.parametrize("norm", ["layer_norm", "add_layer_norm"])
@S.budget(40)
@given(case=feature_cases())
def test_layer_norm_input_gradient_sums_to_zero_over_the_normalized_axes(backend, norm, case):
    # y depends on x only through x - mean, so moving a whole sample by a constant does not
    # change y: the gradient is orthogonal to that direction. Non-degenerate values keep
    # rstd bounded, so the rounding of the sum stays relative to the size of its terms.
    values, axes, normalized, dim, dtype, layout, rng = case
    x = S.tensor(values, dtype, layout, rng, requires_grad=True)
    weight = torch.tensor(S.weight_values(rng, normalized), dtype=dtype, requires_grad=True)
    bias = torch.tensor(rng.standard_normal(normalized), dtype=dtype, requires_grad=True)
    if norm == "layer_norm":
        y = F.layer_norm(x, normalized, weight, bias, dim=dim)
        inputs = [x]
    else:
        residual = S.tensor(rng.standard_normal(values.shape), dtype, layout, rng, True)
        y, _ = F.add_layer_norm(x - residual.detach(), residual, normalized, weight, bias, dim=dim)
        inputs = [x, residual]
    y.backward(torch.tensor(rng.standard_normal(values.shape), dtype=dtype))
    for t in inputs:
        grad = t.grad.double()
        total = grad.sum(dim=axes)
        size = grad.abs().sum(dim=axes)
        bound = grad_tol(dtype)["rtol"] * size + grad_tol(dtype)["atol"]
        assert bool((total.abs() <= bound).all()), (total, size)


# ----------------------------------------------------------------------------------------------
# Every backend equals the reference


def _backend_calls():
    """backend -> strategy of the calls it runs. A forced kernel backend refuses calls it
    cannot take (a ValueError saying why); those examples are rejected, not failed. Triton
    (on CPU in its interpreter, slow) gets small contiguous inputs of the norms whose layouts
    have Triton kernels (dispatch.TRITON_LAYOUTS)."""
    cases = {
        "auto": S.calls(long_axis=80),
        "composite": S.calls(long_axis=80),
        "numba": S.calls(dtypes=S.FLOAT_KERNEL_DTYPES, long_axis=80),
    }
    if "triton" in backends.BACKENDS and backends.triton_available():
        wired = {"rows": S.FUNCTIONS[:4], "channels": S.FUNCTIONS[4:7], "groups": S.FUNCTIONS[7:]}
        cases["triton"] = S.calls(
            dtypes=dispatch.KERNEL_DTYPES["triton"],
            max_size=4,
            functions=sum((wired[layout] for layout in sorted(dispatch.TRITON_LAYOUTS)), ()),
            layouts=("contiguous",),
        )
    return cases


BACKEND_CALLS = _backend_calls()
EXAMPLES = {"auto": 100, "composite": 100, "numba": 60, "triton": 20}


@pytest.mark.parametrize("backend", list(BACKEND_CALLS), indirect=True)
def test_every_backend_equals_the_reference(backend):
    checked = []

    @S.budget(EXAMPLES[backend])
    @given(case=BACKEND_CALLS[backend], seed=S.seeds)
    def check(case, seed):
        fn, args = case
        try:
            check_call(fn, args, np.random.default_rng(seed))
        except ValueError as error:
            if f"backend {backend!r} cannot run" in str(error):
                reject()
            raise
        checked.append(fn)

    check()
    # Not vacuous: most examples ran on the backend (a forced one refuses some), every
    # functional among them where the backend runs them all.
    print(f"{backend}: {len(checked)} calls checked against the reference")
    assert len(checked) >= EXAMPLES[backend] // 2
