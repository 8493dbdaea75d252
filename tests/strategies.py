"""Hypothesis settings and strategies shared by the property tests and the API fuzz.

Settings live here, in one place: the profile is chosen by ``NORMLAB_HYPOTHESIS_PROFILE``:

- ``ci`` (default): derandomized (every run draws the same examples, so CI is reproducible),
  no example database, ``deadline=None`` (Numba compiles a kernel at its first call with
  a new signature, which would trip any deadline), and each test's own small example count.
- ``long``: random seeds (hypothesis prints how to reproduce a failure), the same settings
  otherwise, and ``LONG_FACTOR`` times the examples, for runs outside CI.

Hypothesis draws the structure of a case (shapes, axes, dtypes, layouts, flags) and one
seed; the values come from NumPy with that seed (drawing thousands of floats one by one
through hypothesis is slow, and shrinking a shape is what makes a failure readable).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

LONG_FACTOR = 40

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
settings.register_profile("long", parent=settings.get_profile("ci"), derandomize=False)
PROFILE = os.environ.get("NORMLAB_HYPOTHESIS_PROFILE", "ci")


def budget(ci_examples: int) -> settings:
    """The settings of one test: ``ci_examples`` examples in CI, LONG_FACTOR times more in
    the long profile."""
    factor = LONG_FACTOR if PROFILE == "long" else 1
    return settings(settings.get_profile(PROFILE), max_examples=ci_examples * factor)


FLOAT_KERNEL_DTYPES = (torch.float32, torch.float64)  # what every Numba kernel takes
FLOAT_DTYPES = (*FLOAT_KERNEL_DTYPES, torch.float16, torch.bfloat16)

# How a tensor lies in memory: the Numba backend takes contiguous input only, so the other
# layouts check the fallback (and the composite's stride handling).
# permuted: stored in a random axis order (channels_last is one of them);
# gapped: every other element of a twice longer axis.
LAYOUTS = ("contiguous", "permuted", "gapped")

seeds = st.integers(0, 2**32 - 1)


def tensor(values, dtype, layout="contiguous", rng=None, requires_grad=False) -> torch.Tensor:
    """A leaf tensor of ``dtype`` holding ``values`` (float64 NumPy), laid out as ``layout``."""
    t = torch.from_numpy(np.array(values, dtype=np.float64)).to(dtype)
    if layout == "permuted" and t.dim() > 1:
        order = [int(a) for a in rng.permutation(t.dim())]
        t = t.permute(order).contiguous().permute([order.index(a) for a in range(t.dim())])
    elif layout == "gapped" and t.dim() >= 1:
        axis = int(rng.integers(t.dim()))
        wide = list(t.shape)
        wide[axis] *= 2
        index = [slice(None)] * t.dim()
        index[axis] = slice(0, None, 2)
        view = torch.zeros(wide, dtype=dtype)[tuple(index)]
        view.copy_(t)
        t = view
    return t.detach().requires_grad_(requires_grad)


def normal(rng, shape, scale=1.0, offset=0.0) -> np.ndarray:
    return offset + scale * rng.standard_normal(tuple(shape))


def nondegenerate(rng, shape, reduction) -> np.ndarray:
    """Values whose every group (the elements sharing a statistic: all of ``reduction``) has
    a mean in [-1, 1] and a standard deviation in [0.5, 2]: no group has a variance near 0,
    where eps would dominate and float rounding of the input would decide the output (a
    property like scale invariance holds there only up to that rounding). Groups need at
    least 2 elements."""
    z = rng.standard_normal(tuple(shape))
    z = z - z.mean(axis=reduction, keepdims=True)
    z = z / np.sqrt(np.square(z).mean(axis=reduction, keepdims=True))
    stat_shape = [1 if d in reduction else n for d, n in enumerate(shape)]
    return rng.uniform(-1, 1, stat_shape) + rng.uniform(0.5, 2, stat_shape) * z


def weight_values(rng, n) -> np.ndarray:
    """A weight far from ones (so a missing or misplaced weight shows)."""
    return 1 + 0.5 * rng.standard_normal(n)


# ----------------------------------------------------------------------------------------------
# Valid calls of normlab.functional: (name, keyword arguments). Every call drawn here must
# succeed; ``check_call`` (tests/fuzz_api.py) compares it with the float64 reference.


def _sizes(draw, rank, max_size, long_axis):
    """``rank`` sizes in [1, max_size]; with ``long_axis`` one of them may be long (up to
    ``long_axis``) to reach the kernels' blocked loops."""
    shape = [draw(st.integers(1, max_size)) for _ in range(rank)]
    if long_axis and rank and draw(st.integers(0, 4)) == 0:
        shape[draw(st.integers(0, rank - 1))] = draw(st.integers(max_size, long_axis))
    return shape


def _param(draw, rng, n, dtype, kind="weight", optional=True):
    if optional and draw(st.booleans()):
        return None
    values = weight_values(rng, n) if kind == "weight" else rng.standard_normal(n)
    return torch.tensor(values, dtype=dtype, requires_grad=True)


@st.composite
def feature_calls(draw, fn, dtypes=FLOAT_DTYPES, max_size=5, long_axis=0, layouts=LAYOUTS):
    """layer_norm, rms_norm, add_layer_norm, add_rms_norm over trailing axes or ``dim``."""
    rng = np.random.default_rng(draw(seeds))
    dtype = draw(st.sampled_from(dtypes))
    rank = draw(st.integers(1, 4))
    shape = _sizes(draw, rank, max_size, long_axis)
    count = draw(st.integers(1, rank))
    if draw(st.booleans()):
        axes = tuple(range(rank - count, rank))
        dim = None
    else:
        axes = tuple(sorted(draw(st.permutations(range(rank)))[:count]))
        dim = tuple(a - rank if draw(st.booleans()) else a for a in axes)
        if count == 1 and draw(st.booleans()):
            dim = dim[0]
    normalized = tuple(shape[a] for a in axes)
    normalized_shape = normalized[0] if count == 1 and draw(st.booleans()) else normalized
    layout = draw(st.sampled_from(layouts))
    x = tensor(normal(rng, shape, 2.0, 0.5), dtype, layout, rng, requires_grad=True)
    args = {"input": x, "normalized_shape": normalized_shape, "dim": dim}
    args["weight"] = _param(draw, rng, normalized, dtype)
    if fn in ("layer_norm", "add_layer_norm"):
        args["bias"] = _param(draw, rng, normalized, dtype, "bias")
        args["eps"] = draw(st.sampled_from([1e-5, 1e-6, 1e-3]))
    else:
        args["eps"] = draw(st.sampled_from([None, 1e-6, 1e-3]))
    if args["weight"] is not None and draw(st.booleans()):
        args["offset"] = draw(st.sampled_from([1.0, -0.5]))  # Gemma's (1 + weight) and another
    if fn.startswith("add_"):
        residual_layout = draw(st.sampled_from(layouts))
        args["residual"] = tensor(normal(rng, shape), dtype, residual_layout, rng, True)
    return fn, args


def _mask_values(rng, draw, shape, broadcast=True):
    """A bool mask of ``shape`` (about 70% real), some axes possibly of size 1 (broadcast)."""
    shape = [1 if broadcast and n > 1 and draw(st.integers(0, 4)) == 0 else n for n in shape]
    return torch.from_numpy(rng.random(shape) < 0.7)


def _enough_real(x_shape, channel_axes, mask, per_sample=False, virtual_batch_size=None):
    """Every statistic has at least 2 real values: the statistics are per channel(s)
    (``channel_axes`` kept), per sample too with ``per_sample``, per virtual batch with it."""
    mask_shape = [n for d, n in enumerate(x_shape) if d not in channel_axes[:1]]
    real = np.ones(mask_shape) if mask is None else np.broadcast_to(mask.numpy(), mask_shape)
    if virtual_batch_size is not None:
        real = real.reshape(-1, virtual_batch_size, *real.shape[1:])
        return bool(real.reshape(real.shape[0], -1).sum(1).min() >= 2)
    if per_sample:
        return bool(real.reshape(real.shape[0], -1).sum(1).min() >= 2) if real.shape[0] else True
    return real.sum() >= 2


@st.composite
def channel_calls(draw, fn, dtypes=FLOAT_DTYPES, max_size=5, long_axis=0, layouts=LAYOUTS):
    """batch_norm, batch_renorm, power_norm: one channel axis ``dim`` anywhere, training or
    eval, masks/lengths, ghost batches, running statistics."""
    rng = np.random.default_rng(draw(seeds))
    dtype = draw(st.sampled_from(dtypes))
    rank = draw(st.integers(2, 4))
    shape = _sizes(draw, rank, max_size, long_axis)
    channel = draw(st.integers(0, rank - 1))
    channels = shape[channel]
    training = draw(st.booleans())
    layout = draw(st.sampled_from(layouts))
    x = tensor(normal(rng, shape, 2.0, 0.5), dtype, layout, rng, requires_grad=True)
    dim = channel - rank if draw(st.booleans()) else channel
    args = {
        "input": x,
        "dim": dim,
        "training": training,
        "eps": draw(st.sampled_from([1e-5, 1e-3])),
    }
    args["weight"] = _param(draw, rng, channels, dtype)
    args["bias"] = _param(draw, rng, channels, dtype, "bias")
    args["momentum"] = draw(st.sampled_from([0.1, 0.5, 1.0, 0.0]))
    if fn == "power_norm":
        args["running_phi"] = torch.tensor(rng.uniform(0.5, 2, channels), dtype=dtype)
        args["running_grad_stat"] = torch.tensor(0.1 * rng.standard_normal(channels), dtype=dtype)
        args["warmup"] = draw(st.booleans())
        args["alpha_bkw"] = draw(st.sampled_from([0.9, 0.5]))
    elif fn == "batch_renorm" or not training or draw(st.booleans()):
        args["running_mean"] = torch.tensor(rng.standard_normal(channels), dtype=dtype)
        args["running_var"] = torch.tensor(rng.uniform(0.5, 2, channels), dtype=dtype)
    else:
        args["running_mean"] = args["running_var"] = None
    if fn == "batch_renorm":
        args["r_max"] = draw(st.sampled_from([1.0, 1.5, 3.0]))
        args["d_max"] = draw(st.sampled_from([0.0, 0.5, 5.0]))
    vbs = None
    if fn == "batch_norm" and training and channel != 0 and draw(st.integers(0, 3)) == 0:
        vbs = draw(st.sampled_from([v for v in range(1, shape[0] + 1) if shape[0] % v == 0]))
        args["virtual_batch_size"] = vbs
    if training:
        _draw_padding(draw, rng, args, shape, channel, vbs is None)
        mask = args.get("mask")
        if "lengths" in args:
            mask = _lengths_mask(args["lengths"], shape, channel)
        assume(_enough_real(shape, (channel,), mask, virtual_batch_size=vbs))
    return fn, args


def _lengths_mask(lengths, shape, channel):
    (sequence,) = [d for d in range(1, len(shape)) if d != channel]
    return torch.arange(shape[sequence]) < lengths.reshape(-1, 1)


def _draw_padding(draw, rng, args, shape, channel, broadcast):
    """Maybe a mask (shape without the channel axis) or, where the input has exactly one
    sequence axis, lengths."""
    kind = draw(st.sampled_from(["none", "mask", "lengths"]))
    positional = [d for d in range(1, len(shape)) if d != channel]
    if kind == "lengths" and channel != 0 and len(positional) == 1:
        length = shape[positional[0]]
        args["lengths"] = torch.from_numpy(rng.integers(0, length + 1, shape[0]))
    elif kind != "none":
        mask_shape = [n for d, n in enumerate(shape) if d != channel]
        args["mask"] = _mask_values(rng, draw, mask_shape, broadcast)


@st.composite
def spatial_calls(draw, fn, dtypes=FLOAT_DTYPES, max_size=5, long_axis=0, layouts=LAYOUTS):
    """group_norm, instance_norm on (N, C, *spatial) with masks/lengths and (InstanceNorm)
    running statistics."""
    rng = np.random.default_rng(draw(seeds))
    dtype = draw(st.sampled_from(dtypes))
    rank = draw(st.integers(2, 4))
    shape = _sizes(draw, rank, max_size, long_axis)
    groups = 1
    if fn == "group_norm":
        groups = draw(st.integers(1, 4))
        shape[1] = groups * draw(st.integers(1, 3))
    channels = shape[1]
    layout = draw(st.sampled_from(layouts))
    x = tensor(normal(rng, shape, 2.0, 0.5), dtype, layout, rng, requires_grad=True)
    args = {"input": x, "eps": draw(st.sampled_from([1e-5, 1e-3]))}
    args["weight"] = _param(draw, rng, channels, dtype)
    args["bias"] = _param(draw, rng, channels, dtype, "bias")
    use_input_stats = True
    if fn == "group_norm":
        args["num_groups"] = groups
    else:
        use_input_stats = draw(st.booleans())
        args["use_input_stats"] = use_input_stats
        args["momentum"] = draw(st.sampled_from([0.1, 1.0]))
        if not use_input_stats or draw(st.booleans()):
            args["running_mean"] = torch.tensor(rng.standard_normal(channels), dtype=dtype)
            args["running_var"] = torch.tensor(rng.uniform(0.5, 2, channels), dtype=dtype)
    if use_input_stats:
        _draw_padding(draw, rng, args, shape, 1, True)
        mask = args.get("mask")
        if "lengths" in args:
            mask = _lengths_mask(args["lengths"], shape, 1)
        per_group = shape[1] // groups if fn == "group_norm" else 1
        real = np.ones([shape[0], *shape[2:]]) if mask is None else mask.numpy()
        real = np.broadcast_to(real, [shape[0], *shape[2:]]).reshape(shape[0], -1)
        assume(shape[0] == 0 or real.sum(1).min() * per_group >= 2)
    return fn, args


FUNCTIONS = (
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "batch_renorm",
    "power_norm",
    "group_norm",
    "instance_norm",
)

_CALLS = {
    "layer_norm": feature_calls,
    "rms_norm": feature_calls,
    "add_layer_norm": feature_calls,
    "add_rms_norm": feature_calls,
    "batch_norm": channel_calls,
    "batch_renorm": channel_calls,
    "power_norm": channel_calls,
    "group_norm": spatial_calls,
    "instance_norm": spatial_calls,
}


def calls(dtypes=FLOAT_DTYPES, max_size=5, long_axis=0, functions=FUNCTIONS, layouts=LAYOUTS):
    """A valid call of any of ``functions``: (name, keyword arguments)."""
    options = {"dtypes": dtypes, "max_size": max_size, "long_axis": long_axis, "layouts": layouts}
    return st.sampled_from(functions).flatmap(lambda fn: _CALLS[fn](fn, **options))
