"""The defining properties of each normalization, as property tests through the torch API.

Each test states what a norm *is* (which groups end up with mean 0 and variance 1, which
transforms of the input it cannot see, how the norms relate), draws shapes and inputs with
hypothesis and checks the property on ``normlab.functional`` and the modules in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normlab
from normlab import functional as NF
from tolerances import tol

F64 = torch.float64
TOL = tol(F64)

# Small eps so the statistics are those of the definition; its effect on the variance of the
# output is 1 - v / (v + eps) <= eps / v, which each test adds to its tolerance explicitly.
EPS = 1e-12

# The autouse seed fixture of conftest is harmless here (inputs come from hypothesis' seed).
SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

seeds = st.integers(0, 2**32 - 1)
sizes = st.integers(1, 5)
scales = st.floats(0.1, 10.0)
offsets = st.floats(-10.0, 10.0)


def _input(seed, shape, scale=1.0, offset=0.0):
    rng = np.random.default_rng(seed)
    return torch.as_tensor(offset + scale * rng.normal(size=shape), dtype=F64)


def _rng(seed, salt):
    return np.random.default_rng([seed, salt])


def _assert_standardized(y, x, dims, eps=EPS):
    """mean_dims(y) == 0 and var_dims(y) (biased) == 1, the latter up to the eps effect
    eps / var_dims(x) (each group's own input variance)."""
    dims = tuple(dims)
    mean = y.mean(dim=dims)
    var = y.var(dim=dims, unbiased=False)
    x_var = x.var(dim=dims, unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=TOL["atol"], rtol=0)
    eps_effect = float((eps / x_var).max())
    torch.testing.assert_close(var, torch.ones_like(var), atol=TOL["atol"] + eps_effect, rtol=0)


# --- LayerNorm ---------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=seeds,
    batch=st.lists(sizes, min_size=0, max_size=2),
    features=st.lists(st.integers(2, 6), min_size=1, max_size=2),
    scale=scales,
    offset=offsets,
    use_module=st.booleans(),
)
def test_layer_norm_output_has_zero_mean_unit_variance_per_sample(
    seed, batch, features, scale, offset, use_module
):
    x = _input(seed, (*batch, *features), scale, offset)
    if use_module:
        module = normlab.LayerNorm(features, eps=EPS, elementwise_affine=False, dtype=F64)
        y = module(x)
    else:
        y = NF.layer_norm(x, features, eps=EPS)
    assert y.shape == x.shape
    _assert_standardized(y, x, range(len(batch), x.dim()))


@SETTINGS
@given(seed=seeds, n=sizes, c=st.integers(2, 6), h=sizes, w=sizes, scale=scales, offset=offsets)
def test_layer_norm_with_dim_1_has_zero_mean_unit_variance_per_position_over_channels(
    seed, n, c, h, w, scale, offset
):
    x = _input(seed, (n, c, h, w), scale, offset)
    y = normlab.LayerNorm(c, eps=EPS, elementwise_affine=False, dim=1, dtype=F64)(x)
    _assert_standardized(y, x, (1,))


@SETTINGS
@given(seed=seeds, n=st.integers(2, 6), features=st.integers(2, 8), k=st.integers(1, 6))
def test_layer_norm_rows_are_independent_of_the_rest_of_the_batch(seed, n, features, k):
    k = min(k, n)
    x = _input(seed, (n, features), 3.0, 1.0)
    module = normlab.LayerNorm(features, dtype=F64)
    with torch.no_grad():  # a non-trivial affine must not mix rows either
        module.weight.copy_(torch.as_tensor(_rng(seed, 1).uniform(0.5, 2, features)))
        module.bias.copy_(torch.as_tensor(_rng(seed, 2).normal(size=features)))
    torch.testing.assert_close(module(x)[:k], module(x[:k]), **TOL)
    # a different rest of the batch does not change the first k rows
    other = torch.cat([x[:k], 100.0 * _input(seed + 1, (n - k + 1, features))])
    torch.testing.assert_close(module(other)[:k], module(x)[:k], **TOL)


def _invariance_tol(*group_stats):
    """Tolerance for norm(a*x + b) == norm(x). Both sides differ from the eps-free value by a
    relative eps / (2 v) (v: each group's variance, or mean square for RMSNorm), so the bound is
    eps / min(v) over both inputs. Removing a shift |b| <= 10 from a*x with a >= 0.1 and a
    typical std >= ~1e-3 costs at most log2(1e5) ~ 17 of the 52 bits, ~1e-11 on an O(1)
    output: 1e-9 bounds that. A broken norm (no centring, wrong scale) is off by O(1)."""
    spread = min(float(s.min()) for s in group_stats)
    bound = 1e-9 + EPS / spread
    return {"atol": bound, "rtol": bound}


def _positive_per(seed, salt, shape):
    return torch.as_tensor(_rng(seed, salt).uniform(0.1, 10.0, size=shape), dtype=F64)


def _shift_per(seed, salt, shape):
    return torch.as_tensor(_rng(seed, salt).uniform(-10.0, 10.0, size=shape), dtype=F64)


@SETTINGS
@given(seed=seeds, n=sizes, m=sizes, features=st.integers(3, 8))
def test_layer_norm_without_affine_is_invariant_to_per_sample_affine_input_transform(
    seed, n, m, features
):
    x = _input(seed, (n, m, features))
    a = _positive_per(seed, 1, (n, m, 1))
    b = _shift_per(seed, 2, (n, m, 1))
    xt = a * x + b
    y = NF.layer_norm(x, (features,), eps=EPS)
    torch.testing.assert_close(
        NF.layer_norm(xt, (features,), eps=EPS),
        y,
        **_invariance_tol(x.var(-1, unbiased=False), xt.var(-1, unbiased=False)),
    )


# --- BatchNorm -----------------------------------------------------------------------------------


def _batch_norm_module(kind, c):
    if kind == "1d":
        return normlab.BatchNorm1d(c, eps=EPS, dtype=F64)
    if kind == "2d":
        return normlab.BatchNorm2d(c, eps=EPS, dtype=F64)
    return normlab.BatchNorm(c, eps=EPS, dim=-1, dtype=F64)


# (module kind, input rank) -> the channel axis
BN_LAYOUTS = [
    ("1d", 2, 1),
    ("1d", 3, 1),
    ("2d", 4, 1),
    ("last", 2, -1),
    ("last", 3, -1),
    ("last", 4, -1),
]


@st.composite
def batch_norm_inputs(draw):
    kind, rank, channel = draw(st.sampled_from(BN_LAYOUTS))
    shape = [draw(sizes) for _ in range(rank)]
    shape[channel] = draw(st.integers(1, 5))
    shape[0] = draw(st.integers(2, 5))  # at least 2 values per channel in training
    return kind, tuple(shape), channel % rank


@SETTINGS
@given(seed=seeds, case=batch_norm_inputs(), scale=scales, offset=offsets)
def test_batch_norm_training_output_has_zero_mean_unit_variance_per_feature(
    seed, case, scale, offset
):
    kind, shape, channel = case
    x = _input(seed, shape, scale, offset)
    module = _batch_norm_module(kind, shape[channel])
    assert module.training
    y = module(x)
    _assert_standardized(y, x, [d for d in range(x.dim()) if d != channel])


@SETTINGS
@given(seed=seeds, case=batch_norm_inputs())
def test_batch_norm_training_is_invariant_to_per_channel_affine_input_transform(seed, case):
    kind, shape, channel = case
    x = _input(seed, shape)
    stat_shape = [1] * len(shape)
    stat_shape[channel] = shape[channel]
    a = _positive_per(seed, 1, stat_shape)
    b = _shift_per(seed, 2, stat_shape)
    module = _batch_norm_module(kind, shape[channel])
    with torch.no_grad():
        module.weight.copy_(torch.as_tensor(_rng(seed, 3).uniform(0.5, 2, shape[channel])))
        module.bias.copy_(torch.as_tensor(_rng(seed, 4).normal(size=shape[channel])))
    xt = a * x + b
    dims = [d for d in range(x.dim()) if d != channel]
    torch.testing.assert_close(
        module(xt),
        module(x),
        **_invariance_tol(x.var(dims, unbiased=False), xt.var(dims, unbiased=False)),
    )


# --- InstanceNorm -------------------------------------------------------------------------------


@st.composite
def instance_norm_inputs(draw):
    spatial_dims = draw(st.integers(1, 3))
    spatial = [draw(st.integers(1, 4)) for _ in range(spatial_dims)]
    spatial[0] = draw(st.integers(2, 5))  # at least 2 positions per instance
    return (draw(sizes), draw(sizes), *spatial)


@SETTINGS
@given(
    seed=seeds, shape=instance_norm_inputs(), scale=scales, offset=offsets, use_module=st.booleans()
)
def test_instance_norm_output_has_zero_mean_unit_variance_per_sample_and_channel(
    seed, shape, scale, offset, use_module
):
    x = _input(seed, shape, scale, offset)
    if use_module:
        cls = {3: normlab.InstanceNorm1d, 4: normlab.InstanceNorm2d, 5: normlab.InstanceNorm3d}
        y = cls[len(shape)](shape[1], eps=EPS, dtype=F64)(x)
    else:
        y = NF.instance_norm(x, eps=EPS)
    _assert_standardized(y, x, range(2, x.dim()))


# --- RMSNorm -------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=seeds,
    batch=st.lists(sizes, min_size=0, max_size=2),
    features=st.lists(sizes, min_size=1, max_size=2),
    scale=scales,
    offset=offsets,
    use_module=st.booleans(),
)
def test_rms_norm_output_has_unit_mean_square_per_sample(
    seed, batch, features, scale, offset, use_module
):
    x = _input(seed, (*batch, *features), scale, offset)
    if use_module:
        y = normlab.RMSNorm(features, eps=EPS, elementwise_affine=False, dtype=F64)(x)
    else:
        y = NF.rms_norm(x, features, eps=EPS)
    dims = tuple(range(len(batch), x.dim()))
    mean_square = y.square().mean(dim=dims)
    eps_effect = float((EPS / x.square().mean(dim=dims)).max())
    torch.testing.assert_close(
        mean_square, torch.ones_like(mean_square), atol=TOL["atol"] + eps_effect, rtol=0
    )
    # no centring: each sample is only rescaled (by 1 / rms, up to the same eps effect)
    torch.testing.assert_close(
        y * x.square().mean(dim=dims, keepdim=True).sqrt(),
        x,
        atol=TOL["atol"],
        rtol=TOL["rtol"] + eps_effect,
    )


@SETTINGS
@given(seed=seeds, n=sizes, features=st.integers(1, 8))
def test_rms_norm_is_invariant_to_per_sample_positive_scaling(seed, n, features):
    x = _input(seed, (n, 2, features))
    a = _positive_per(seed, 1, (n, 2, 1))
    weight = torch.as_tensor(_rng(seed, 2).uniform(0.5, 2, features), dtype=F64)
    xt = a * x
    y = NF.rms_norm(x, (features,), weight, eps=EPS)
    torch.testing.assert_close(
        NF.rms_norm(xt, (features,), weight, eps=EPS),
        y,
        **_invariance_tol(x.square().mean(-1), xt.square().mean(-1)),
    )


# --- GroupNorm relations -------------------------------------------------------------------------


@st.composite
def group_norm_inputs(draw, min_positions=1):
    spatial = [draw(st.integers(1, 4)) for _ in range(draw(st.integers(0, 2)))]
    if spatial:
        spatial[0] = max(spatial[0], min_positions)
    elif min_positions > 1:
        spatial = [min_positions]
    return (draw(sizes), draw(st.integers(2, 6)), *spatial)


@SETTINGS
@given(seed=seeds, shape=group_norm_inputs(), scale=scales, offset=offsets)
def test_group_norm_with_one_group_equals_layer_norm_over_channels_and_positions(
    seed, shape, scale, offset
):
    x = _input(seed, shape, scale, offset)
    expected = NF.layer_norm(x, x.shape[1:], eps=1e-5)
    torch.testing.assert_close(NF.group_norm(x, 1, eps=1e-5), expected, **TOL)
    module = normlab.GroupNorm(1, shape[1], eps=1e-5, affine=False, dtype=F64)
    torch.testing.assert_close(module(x), expected, **TOL)


@SETTINGS
@given(seed=seeds, shape=group_norm_inputs(min_positions=2), scale=scales, offset=offsets)
def test_group_norm_with_one_group_per_channel_equals_instance_norm(seed, shape, scale, offset):
    x = _input(seed, shape, scale, offset)
    c = shape[1]
    weight = torch.as_tensor(_rng(seed, 1).uniform(0.5, 2, c), dtype=F64)
    bias = torch.as_tensor(_rng(seed, 2).normal(size=c), dtype=F64)
    expected = NF.instance_norm(x, weight=weight, bias=bias, eps=1e-5)
    torch.testing.assert_close(NF.group_norm(x, c, weight, bias, eps=1e-5), expected, **TOL)
