"""Padding-aware statistics: ``mask=`` / ``lengths=`` of BatchNorm, InstanceNorm and GroupNorm.

A mask (bool, the input's shape without the channel axis, True = real element) restricts
every statistic to real elements: per channel for BatchNorm, per (sample, channel) for
InstanceNorm, per (sample, group) for GroupNorm. Padded positions are normalized with the
same statistics, running statistics are updated from real elements only (variance unbiased
over the real count) and the gradient is that of this function.

The properties checked here:

* padding invariance: appending padding, or changing what is in the padded slots (even
  1e3-sized garbage), changes nothing at real positions, in the gradient (when the loss reads
  real positions only) or in the running statistics;
* packing equivalence: masked BatchNorm on a padded batch is plain BatchNorm (normlab and
  torch.nn) on the real tokens packed together; masked InstanceNorm/GroupNorm is the plain
  norm of each sample truncated to its length;
* every layout (channels first/last, 1-D and 2-D positions, broadcast masks, unbatched input)
  against the float64 reference, forward and backward, and gradcheck in float64;
* eval mode, ``lengths`` == ``mask``, and the errors for bad masks, bad lengths and
  statistics with fewer than two real values.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import normlab
import normlab.functional as NF
from normlab import reference as ref
from tolerances import grad_tol, tol

F64 = torch.float64
FLOATS = [torch.float32, torch.float64]
PAD_SCALE = 1e3  # padded slots hold garbage of this size

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# --- helpers --------------------------------------------------------------------------------


def _np(t):
    return None if t is None else t.detach().double().numpy().copy()


def _assert_ref(actual, expected, tolerance, what=""):
    assert actual is not None, f"{what}: expected a tensor, got None"
    expected = torch.from_numpy(np.ascontiguousarray(np.asarray(expected, dtype=np.float64)))
    torch.testing.assert_close(
        actual.detach().double(), expected, **tolerance, msg=lambda m: f"{what}: {m}"
    )


def _assert_close(actual, expected, tolerance, what=""):
    assert actual is not None and expected is not None, what
    torch.testing.assert_close(
        actual.detach(), expected.detach(), **tolerance, msg=lambda m: f"{what}: {m}"
    )


def _randn(*shape, dtype=F64, generator=None):
    return torch.randn(*shape, dtype=F64, generator=generator).to(dtype)


def _lengths_mask(lengths, length):
    """(B,) lengths -> (B, length) bool, built here independently of normlab."""
    lengths = torch.as_tensor(lengths)
    return torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)


def _garbage_pads(x, mask, channel_axis, generator=None):
    """x with every padded slot (mask False, mask shaped like x without ``channel_axis``)
    replaced by PAD_SCALE * randn."""
    full = mask.unsqueeze(channel_axis).expand(x.shape)
    noise = PAD_SCALE * _randn(*x.shape, dtype=x.dtype, generator=generator)
    return torch.where(full, x, noise)


def _zero_pads(t, mask, channel_axis):
    return torch.where(mask.unsqueeze(channel_axis).expand(t.shape), t, torch.zeros_like(t))


def _randomize(module):
    """Random affine parameters and running statistics (variance > 0); returns the module."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, dtype=F64))
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, dtype=F64))
            module.running_var.copy_(torch.rand(module.running_var.shape, dtype=F64) + 0.5)
    return module


def _param_grad(module, name):
    p = getattr(module, name, None)
    return None if p is None else p.grad


def _fwd_bwd(module, x, dy, **kwargs):
    """(y, dx, dweight, dbias) of one forward/backward of ``module(x, **kwargs)``."""
    module.zero_grad(set_to_none=True)
    leaf = x.detach().clone().requires_grad_(True)
    y = module(leaf, **kwargs)
    y.backward(dy)
    return y.detach(), leaf.grad, _param_grad(module, "weight"), _param_grad(module, "bias")


def _running(module):
    if getattr(module, "running_mean", None) is None:
        return None
    return module.running_mean.detach().clone(), module.running_var.detach().clone()


# --- 1. padding invariance ------------------------------------------------------------------
#
# Each layer is built in float64 with random parameters (and running statistics), then cast.
# ``layout`` says where the channel axis is: "BCL" (B, C, L) or "BLC" (B, L, C); the mask is
# (B, L) either way. ``min_length`` is the fewest real positions one sample may have.

C_INV = 6
LAYERS = {
    "BN dim=1 (B,C,L)": (lambda: normlab.BatchNorm(C_INV, dim=1), "BCL", 0),
    "BN dim=-1 (B,L,C)": (lambda: normlab.BatchNorm(C_INV, dim=-1), "BLC", 0),
    "InstanceNorm1d": (
        lambda: normlab.InstanceNorm1d(C_INV, affine=True, track_running_stats=True),
        "BCL",
        2,
    ),
    "GroupNorm(3, 6)": (lambda: normlab.GroupNorm(3, C_INV), "BCL", 2),
}


def _to_layout(t, layout):
    return t if layout == "BCL" else t.transpose(1, 2).contiguous()


def _from_layout(t, layout):
    return t if layout == "BCL" else t.transpose(1, 2)


def _padding_invariance_pairs(layer, dtype, lengths, length, extra, seed):
    """Run one training step of ``layer`` on a padded (B, C, length) batch and on the same
    batch with ``extra`` more padded positions and *fresh* garbage in every padded slot
    (extra=0: only the garbage changes). The loss reads real positions only (dy = 0 on
    padding). Returns {quantity: (short, long)} for the outputs and dx at real positions,
    dweight, dbias and the running statistics."""
    make, layout, _ = LAYERS[layer]
    gen = torch.Generator().manual_seed(seed)
    base = make().double()
    with torch.no_grad():
        for param in base.parameters():
            param.copy_(torch.randn(param.shape, dtype=F64, generator=gen))
        if getattr(base, "running_mean", None) is not None:
            base.running_mean.copy_(torch.randn(C_INV, dtype=F64, generator=gen))
            base.running_var.copy_(torch.rand(C_INV, dtype=F64, generator=gen) + 0.5)
    short_layer, long_layer = base.to(dtype), copy.deepcopy(base).to(dtype)

    batch = len(lengths)
    real = _randn(batch, C_INV, length, dtype=dtype, generator=gen)
    dy_real = _randn(batch, C_INV, length, dtype=dtype, generator=gen)
    mask_short = _lengths_mask(lengths, length)
    mask_long = _lengths_mask(lengths, length + extra)
    x_short = _garbage_pads(real, mask_short, 1, gen)
    x_long = _garbage_pads(
        torch.cat([real, torch.zeros(batch, C_INV, extra, dtype=dtype)], dim=2), mask_long, 1, gen
    )
    dy_short = _zero_pads(dy_real, mask_short, 1)
    dy_long = _zero_pads(
        torch.cat([dy_real, torch.zeros(batch, C_INV, extra, dtype=dtype)], dim=2), mask_long, 1
    )

    short = _fwd_bwd(
        short_layer, _to_layout(x_short, layout), _to_layout(dy_short, layout), mask=mask_short
    )
    long = _fwd_bwd(
        long_layer, _to_layout(x_long, layout), _to_layout(dy_long, layout), mask=mask_long
    )
    real_positions = mask_short.unsqueeze(1).expand(batch, C_INV, length)

    def at_real(t, n):
        return _from_layout(t, layout)[..., :n][real_positions]

    pairs = {
        "y": (at_real(short[0], length), at_real(long[0], length)),
        "dx": (at_real(short[1], length), at_real(long[1], length)),
        "dweight": (short[2], long[2]),
        "dbias": (short[3], long[3]),
    }
    if _running(short_layer) is not None:
        (m1, v1), (m2, v2) = _running(short_layer), _running(long_layer)
        pairs["running_mean"] = (m1, m2)
        pairs["running_var"] = (v1, v2)
    return pairs


def _assert_pairs_close(pairs, dtype):
    for name, (a, b) in pairs.items():
        tolerance = tol(dtype) if name in ("y", "running_mean", "running_var") else grad_tol(dtype)
        _assert_close(b, a, tolerance, name)


def _max_abs_diff(pairs):
    return max(float((a.double() - b.double()).abs().max()) for a, b in pairs.values())


def padding_invariance_report(extra=37, length=11, lengths=(11, 2, 7, 5), seed=1234):
    """{(layer, dtype): max |difference|} over y and dx at real positions, dweight, dbias
    and the running statistics between a padded batch and the same batch with ``extra``
    more padded positions and new 1e3-sized garbage in every padded slot; also asserts each
    pair is within tolerances.py's tolerance."""
    table = {}
    for layer in LAYERS:
        for dtype in FLOATS:
            pairs = _padding_invariance_pairs(layer, dtype, list(lengths), length, extra, seed)
            _assert_pairs_close(pairs, dtype)
            table[layer, dtype] = _max_abs_diff(pairs)
    return table


def test_padding_invariance_report():
    table = padding_invariance_report()
    line = " | ".join(
        f"{layer}: f32 {table[layer, torch.float32]:.2e}, f64 {table[layer, F64]:.2e}"
        for layer in LAYERS
    )
    print(f"\npadding invariance, max|diff| (y, dx, dweight, dbias, running stats): {line}")
    for (_, dtype), diff in table.items():
        assert diff <= (1e-4 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("extra", [0, 1, 50], ids=lambda e: f"extra={e}")
@pytest.mark.parametrize("layer", list(LAYERS))
def test_extra_padding_and_new_pad_values_change_nothing_at_real_positions(layer, extra, dtype):
    pairs = _padding_invariance_pairs(
        layer, dtype, [9, 3, 0 if "BN" in layer else 2, 6], 9, extra, 7
    )
    _assert_pairs_close(pairs, dtype)


@SETTINGS
@given(
    layer=st.sampled_from(list(LAYERS)),
    dtype=st.sampled_from(FLOATS),
    length=st.integers(2, 12),
    fractions=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
    extra=st.integers(0, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_padding_invariance_holds_for_random_lengths_and_pad_amounts(
    layer, dtype, length, fractions, extra, seed
):
    min_length = LAYERS[layer][2]
    lengths = [min_length + round(f * (length - min_length)) for f in fractions]
    if sum(lengths) < 2:  # BatchNorm needs two real values per channel in the whole batch
        lengths[0] = 2
    pairs = _padding_invariance_pairs(layer, dtype, lengths, length, extra, seed)
    _assert_pairs_close(pairs, dtype)


# --- 2. packing equivalence -----------------------------------------------------------------


LENGTH_SCHEDULE = [[9, 3, 0, 6], [1, 1, 2, 9], [4, 4, 4, 4]]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("momentum", [0.1, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("dim", [1, -1], ids=["(B,C,L)", "(B,L,C)"])
def test_masked_batch_norm_equals_plain_and_torch_batch_norm_on_the_packed_real_tokens(
    dim, momentum, dtype
):
    channels, length = 5, 9
    layout = "BCL" if dim == 1 else "BLC"
    masked = _randomize(normlab.BatchNorm(channels, momentum=momentum, dim=dim, dtype=dtype))
    plain = normlab.BatchNorm1d(channels, momentum=momentum, dtype=dtype)
    plain.load_state_dict(masked.state_dict())
    twin = nn.BatchNorm1d(channels, momentum=momentum, dtype=dtype)
    twin.load_state_dict(masked.state_dict())

    for lengths in LENGTH_SCHEDULE:
        mask = _lengths_mask(lengths, length)
        x = _garbage_pads(_randn(len(lengths), channels, length, dtype=dtype), mask, 1)
        dy = _zero_pads(_randn(len(lengths), channels, length, dtype=dtype), mask, 1)
        y, dx, dw, db = _fwd_bwd(masked, _to_layout(x, layout), _to_layout(dy, layout), mask=mask)
        y, dx = _from_layout(y, layout), _from_layout(dx, layout)

        def packed(t, mask=mask):  # (B, C, L) -> (total, C): the real tokens, in order
            return t.permute(0, 2, 1)[mask]

        yp, dxp, dwp, dbp = _fwd_bwd(
            plain, packed(x).T.unsqueeze(0), packed(dy).T.unsqueeze(0)
        )  # (1, C, total), no mask
        yt, dxt, dwt, dbt = _fwd_bwd(twin, packed(x), packed(dy))  # (total, C)

        for name, ours, theirs, tolerance in (
            ("y", packed(y), yp[0].T, tol(dtype)),
            ("dx", packed(dx), dxp[0].T, grad_tol(dtype)),
            ("dweight", dw, dwp, grad_tol(dtype)),
            ("dbias", db, dbp, grad_tol(dtype)),
            ("running_mean", masked.running_mean, plain.running_mean, tol(dtype)),
            ("running_var", masked.running_var, plain.running_var, tol(dtype)),
        ):
            _assert_close(ours, theirs, tolerance, f"{name} vs normlab on packed tokens")
        for name, ours, theirs, tolerance in (
            ("y", packed(y), yt, tol(dtype)),
            ("dx", packed(dx), dxt, grad_tol(dtype)),
            ("dweight", dw, dwt, grad_tol(dtype)),
            ("dbias", db, dbt, grad_tol(dtype)),
            ("running_mean", masked.running_mean, twin.running_mean, tol(dtype)),
            ("running_var", masked.running_var, twin.running_var, tol(dtype)),
        ):
            _assert_close(ours, theirs, tolerance, f"{name} vs torch.nn.BatchNorm1d on packed")
        assert int(masked.num_batches_tracked) == int(twin.num_batches_tracked)
        assert int(masked.num_batches_tracked) == int(plain.num_batches_tracked)
    assert int(masked.num_batches_tracked) == len(LENGTH_SCHEDULE)


def _per_sample_case(kind, dtype):
    """(masked module, factory of the plain normlab module, factory of torch's, channels)."""
    if kind == "InstanceNorm1d":
        channels = 4
        masked = _randomize(
            normlab.InstanceNorm1d(channels, affine=True, track_running_stats=True, dtype=dtype)
        )
        nl = lambda: normlab.InstanceNorm1d(channels, affine=True, dtype=dtype)  # noqa: E731
        tm = lambda: nn.InstanceNorm1d(channels, affine=True, dtype=dtype)  # noqa: E731
    else:
        channels = 6
        masked = _randomize(normlab.GroupNorm(3, channels, dtype=dtype))
        nl = lambda: normlab.GroupNorm(3, channels, dtype=dtype)  # noqa: E731
        tm = lambda: nn.GroupNorm(3, channels, dtype=dtype)  # noqa: E731
    return masked, nl, tm, channels


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("kind", ["InstanceNorm1d", "GroupNorm"])
def test_masked_instance_and_group_norm_equal_the_plain_norm_of_each_truncated_sample(kind, dtype):
    length = 10
    masked, make_nl, make_torch, channels = _per_sample_case(kind, dtype)
    momentum = 0.1
    for lengths in ([10, 2, 7, 5], [3, 10, 2, 2]):
        old = _running(masked)
        mask = _lengths_mask(lengths, length)
        x = _garbage_pads(_randn(len(lengths), channels, length, dtype=dtype), mask, 1)
        dy = _zero_pads(_randn(len(lengths), channels, length, dtype=dtype), mask, 1)
        y, dx, dw, db = _fwd_bwd(masked, x, dy, lengths=torch.tensor(lengths))

        dw_sum, db_sum = torch.zeros_like(dw), torch.zeros_like(db)
        means, variances = [], []
        for b, n in enumerate(lengths):
            xb, dyb = x[b : b + 1, :, :n], dy[b : b + 1, :, :n]
            for label, plain in (("normlab", make_nl()), ("torch", make_torch())):
                plain.load_state_dict(
                    {k: v for k, v in masked.state_dict().items() if k in ("weight", "bias")}
                )
                yb, dxb, dwb, dbb = _fwd_bwd(plain, xb, dyb)
                what = f"sample {b} (length {n}) vs {label}"
                _assert_close(y[b, :, :n], yb[0], tol(dtype), f"y, {what}")
                _assert_close(dx[b, :, :n], dxb[0], grad_tol(dtype), f"dx, {what}")
                if label == "torch":
                    dw_sum += dwb
                    db_sum += dbb
            means.append(xb[0].double().mean(-1))
            variances.append(xb[0].double().var(-1, unbiased=True))
        _assert_close(dw, dw_sum, grad_tol(dtype), "dweight = sum over samples")
        _assert_close(db, db_sum, grad_tol(dtype), "dbias = sum over samples")

        if old is not None:  # InstanceNorm: the batch average of per-instance statistics
            exp_mean = (1 - momentum) * old[0].double() + momentum * torch.stack(means).mean(0)
            exp_var = (1 - momentum) * old[1].double() + momentum * torch.stack(variances).mean(0)
            _assert_close(masked.running_mean.double(), exp_mean, tol(dtype), "running_mean")
            _assert_close(masked.running_var.double(), exp_var, tol(dtype), "running_var")


# --- 3./4. layouts, against the float64 reference --------------------------------------------
#
# Each case: the module, the input shape, the channel axis, and the reference forward,
# backward and running-statistics update (float64 arrays; mask shaped like x without the
# channel axis).

EPS = 1e-5


def _bn_case(cls_or_dim, shape):
    dim = 1 if not isinstance(cls_or_dim, int) else cls_or_dim
    make = (
        (lambda dt: cls_or_dim(shape[1], dtype=dt))
        if not isinstance(cls_or_dim, int)
        else (lambda dt: normlab.BatchNorm(shape[dim], dim=dim, dtype=dt))
    )
    return {
        "make": make,
        "shape": shape,
        "channel": dim % len(shape),
        "fwd": lambda x, m, w, b: ref.batch_norm_train(x, w, b, EPS, dim, mask=m),
        "bwd": lambda dy, x, m, w, b: ref.batch_norm_train_backward(dy, x, w, b, EPS, dim, mask=m),
        "run": lambda x, rm, rv, m: ref.batch_norm_update_running_stats(
            x, rm, rv, 0.1, dim, mask=m
        ),
    }


def _in_case(cls, shape):
    return {
        "make": lambda dt: cls(shape[1], affine=True, track_running_stats=True, dtype=dt),
        "shape": shape,
        "channel": 1,
        "fwd": lambda x, m, w, b: ref.instance_norm(x, w, b, EPS, mask=m),
        "bwd": lambda dy, x, m, w, b: ref.instance_norm_backward(dy, x, w, b, EPS, mask=m),
        "run": lambda x, rm, rv, m: ref.instance_norm_update_running_stats(x, rm, rv, 0.1, mask=m),
    }


def _gn_case(groups, shape):
    return {
        "make": lambda dt: normlab.GroupNorm(groups, shape[1], dtype=dt),
        "shape": shape,
        "channel": 1,
        "fwd": lambda x, m, w, b: ref.group_norm(x, groups, w, b, EPS, mask=m),
        "bwd": lambda dy, x, m, w, b: ref.group_norm_backward(dy, x, groups, w, b, EPS, mask=m),
        "run": None,
    }


REF_CASES = {
    "BatchNorm1d (B,C,L)": _bn_case(normlab.BatchNorm1d, (4, 5, 9)),
    "BatchNorm dim=-1 (B,L,C)": _bn_case(-1, (4, 9, 5)),
    "BatchNorm2d (B,C,H,W)": _bn_case(normlab.BatchNorm2d, (3, 4, 5, 6)),
    "BatchNorm dim=-1 (B,H,W,C)": _bn_case(-1, (3, 5, 6, 4)),
    "BatchNorm3d (B,C,D,H,W)": _bn_case(normlab.BatchNorm3d, (2, 3, 2, 3, 4)),
    "InstanceNorm1d (B,C,L)": _in_case(normlab.InstanceNorm1d, (4, 5, 9)),
    "InstanceNorm2d (B,C,H,W)": _in_case(normlab.InstanceNorm2d, (3, 4, 5, 6)),
    "GroupNorm (B,C,L)": _gn_case(3, (4, 6, 9)),
    "GroupNorm (B,C,H,W)": _gn_case(2, (3, 6, 4, 5)),
}


def _random_mask(shape, channel, generator=None):
    """A random bool mask for an input of ``shape`` (without the channel axis) with at least
    two real elements in every sample, and one fully padded position row in sample 0."""
    mask_shape = [n for d, n in enumerate(shape) if d != channel]
    mask = torch.rand(mask_shape, generator=generator) < 0.6
    flat = mask.reshape(mask_shape[0], -1)
    flat[:, :2] = True
    flat[0, -1] = False  # at least one padded element
    return flat.reshape(mask_shape)


def _check_against_reference(case, module, x, mask, mask_np, dtype):
    old = _running(module)
    weight, bias = _np(module.weight), _np(module.bias)
    xn = _np(x)
    dy = _randn(*x.shape, dtype=dtype)
    y, dx, dw, db = _fwd_bwd(module, x, dy, mask=mask)
    assert y.dtype == dtype and y.shape == x.shape
    _assert_ref(y, case["fwd"](xn, mask_np, weight, bias), tol(dtype), "y")
    rdx, rdw, rdb = case["bwd"](_np(dy), xn, mask_np, weight, bias)
    _assert_ref(dx, rdx, grad_tol(dtype), "dx")
    _assert_ref(dw, rdw, grad_tol(dtype), "dweight")
    _assert_ref(db, rdb, grad_tol(dtype), "dbias")
    if case["run"] is not None:
        exp_mean, exp_var = case["run"](xn, _np(old[0]), _np(old[1]), mask_np)
        _assert_ref(module.running_mean, exp_mean, tol(dtype), "running_mean")
        _assert_ref(module.running_var, exp_var, tol(dtype), "running_var")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case_id", list(REF_CASES))
def test_masked_norm_matches_reference_forward_backward_and_running_stats(case_id, dtype):
    case = REF_CASES[case_id]
    module = _randomize(case["make"](dtype))
    mask = _random_mask(case["shape"], case["channel"])
    x = _garbage_pads(_randn(*case["shape"], dtype=dtype), mask, case["channel"])
    _check_against_reference(case, module, x, mask, mask.numpy(), dtype)


@pytest.mark.parametrize("case_id", list(REF_CASES))
def test_masked_norm_bfloat16_forward_matches_reference_on_the_rounded_input(case_id):
    dtype = torch.bfloat16
    case = REF_CASES[case_id]
    module = _randomize(case["make"](dtype))
    mask = _random_mask(case["shape"], case["channel"])
    x = _randn(*case["shape"], dtype=dtype)  # moderate pads: bf16 rounds the reference's x too
    with torch.no_grad():
        y = module(x, mask=mask)
    assert y.dtype == dtype
    expected = case["fwd"](_np(x), mask.numpy(), _np(module.weight), _np(module.bias))
    _assert_ref(y, expected, tol(dtype), "y")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(
    "case_id", ["BatchNorm2d (B,C,H,W)", "InstanceNorm2d (B,C,H,W)", "GroupNorm (B,C,H,W)"]
)
def test_broadcastable_mask_over_rows_equals_the_expanded_mask_and_the_reference(case_id, dtype):
    """A (B, 1, W) mask (padding along W only) on (B, C, H, W) input."""
    case = REF_CASES[case_id]
    batch, _, height, width = case["shape"]
    mask = _lengths_mask([width, 2, width - 1][:batch], width).unsqueeze(1)  # (B, 1, W)
    full = mask.expand(batch, height, width)
    module = _randomize(case["make"](dtype))
    expanded = copy.deepcopy(module)
    x = _garbage_pads(_randn(*case["shape"], dtype=dtype), full, 1)
    dy = _randn(*x.shape, dtype=dtype)
    got = _fwd_bwd(module, x, dy, mask=mask)
    want = _fwd_bwd(expanded, x, dy, mask=full.contiguous())
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, want, strict=True):
        _assert_close(a, b, tol(dtype), name)
    if _running(module) is not None:
        _assert_close(module.running_mean, expanded.running_mean, tol(dtype), "running_mean")
        _assert_close(module.running_var, expanded.running_var, tol(dtype), "running_var")
    _check_against_reference(case, _randomize(case["make"](dtype)), x, mask, mask.numpy(), dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(
    "kind", ["BatchNorm1d", "InstanceNorm1d", "InstanceNorm1d tracking", "GroupNorm"]
)
def test_batch_broadcast_mask_equals_the_mask_expanded_over_the_batch(kind, dtype):
    """A (1, L) mask (the same padding for every sample) is broadcastable to (B, L)."""
    batch, channels, length = 3, 6, 8
    module = _randomize(
        {
            "BatchNorm1d": lambda: normlab.BatchNorm1d(channels, dtype=dtype),
            "InstanceNorm1d": lambda: normlab.InstanceNorm1d(channels, affine=True, dtype=dtype),
            "InstanceNorm1d tracking": lambda: normlab.InstanceNorm1d(
                channels, affine=True, track_running_stats=True, dtype=dtype
            ),
            "GroupNorm": lambda: normlab.GroupNorm(3, channels, dtype=dtype),
        }[kind]()
    )
    expanded = copy.deepcopy(module)
    mask = _lengths_mask([5], length)  # (1, L)
    x = _garbage_pads(_randn(batch, channels, length, dtype=dtype), mask.expand(batch, -1), 1)
    dy = _randn(*x.shape, dtype=dtype)
    want = _fwd_bwd(expanded, x, dy, mask=mask.expand(batch, length).contiguous())
    got = _fwd_bwd(module, x, dy, mask=mask)
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, want, strict=True):
        _assert_close(a, b, tol(dtype), name)
    if _running(module) is not None:
        _assert_close(module.running_mean, expanded.running_mean, tol(dtype), "running_mean")
        _assert_close(module.running_var, expanded.running_var, tol(dtype), "running_var")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_channels_last_batch_norm_with_mask_equals_channels_first(dtype):
    """(B, H, W, C) with dim=-1 is (B, C, H, W) with dim=1, the same (B, H, W) mask."""
    last = _randomize(normlab.BatchNorm(4, dim=-1, dtype=dtype))
    first = normlab.BatchNorm2d(4, dtype=dtype)
    first.load_state_dict(last.state_dict())
    mask = _random_mask((3, 4, 5, 6), 1)
    x = _garbage_pads(_randn(3, 4, 5, 6, dtype=dtype), mask, 1)
    dy = _randn(*x.shape, dtype=dtype)
    to_last = (0, 2, 3, 1)
    y1, dx1, dw1, db1 = _fwd_bwd(first, x, dy, mask=mask)
    y2, dx2, dw2, db2 = _fwd_bwd(
        last, x.permute(to_last).contiguous(), dy.permute(to_last).contiguous(), mask=mask
    )
    _assert_close(y2, y1.permute(to_last), tol(dtype), "y")
    _assert_close(dx2, dx1.permute(to_last), grad_tol(dtype), "dx")
    _assert_close(dw2, dw1, grad_tol(dtype), "dweight")
    _assert_close(db2, db1, grad_tol(dtype), "dbias")
    _assert_close(last.running_mean, first.running_mean, tol(dtype), "running_mean")
    _assert_close(last.running_var, first.running_var, tol(dtype), "running_var")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_unbatched_instance_norm_with_sequence_mask_equals_instance_norm_of_the_truncated_input(
    dtype,
):
    channels, length, n = 5, 9, 6
    module = _randomize(normlab.InstanceNorm1d(channels, affine=True, dtype=dtype))
    plain = copy.deepcopy(module)
    mask = torch.arange(length) < n  # (L,)
    x = _garbage_pads(_randn(1, channels, length, dtype=dtype), mask.unsqueeze(0), 1)[0]
    dy = _zero_pads(_randn(1, channels, length, dtype=dtype), mask.unsqueeze(0), 1)[0]
    y, dx, dw, db = _fwd_bwd(module, x, dy, mask=mask)
    assert y.shape == (channels, length)
    yp, dxp, dwp, dbp = _fwd_bwd(plain, x[:, :n], dy[:, :n])
    _assert_close(y[:, :n], yp, tol(dtype), "y")
    _assert_close(dx[:, :n], dxp, grad_tol(dtype), "dx")
    _assert_close(dw, dwp, grad_tol(dtype), "dweight")
    _assert_close(db, dbp, grad_tol(dtype), "dbias")
    # == the batched call with a (1, L) mask, and == lengths
    batched = _fwd_bwd(module, x.unsqueeze(0), dy.unsqueeze(0), mask=mask.unsqueeze(0))
    _assert_close(batched[0][0], y, tol(dtype), "batched y")
    by_length = _fwd_bwd(module, x, dy, lengths=torch.tensor(n))
    assert torch.equal(by_length[0], y)
    # and the padded outputs are normalized with the real positions' statistics
    expected = ref.instance_norm(
        _np(x)[None], _np(module.weight), _np(module.bias), EPS, mask=mask.numpy()[None]
    )[0]
    _assert_ref(y, expected, tol(dtype), "y vs reference")


# --- 5. gradcheck, lengths == mask ----------------------------------------------------------


def _bn_fn(dim):
    return lambda x, w, b, **kw: NF.batch_norm(x, None, None, w, b, True, 0.1, EPS, dim, **kw)


GRADCHECK_CASES = {
    # BatchNorm: sample 1 is all padding (length 0); the statistics come from the others
    "batch_norm (B,C,L) lengths [4,0,2]": ((3, 4, 5), 1, [4, 0, 2], _bn_fn(1)),
    "batch_norm (B,L,C) dim=-1 lengths [0,3,5]": ((3, 5, 4), 2, [0, 3, 5], _bn_fn(-1)),
    "instance_norm lengths [5,2,3]": (
        (3, 4, 5),
        1,
        [5, 2, 3],
        lambda x, w, b, **kw: NF.instance_norm(x, None, None, w, b, True, **kw),
    ),
    "group_norm(2) lengths [2,5,4]": (
        (3, 4, 5),
        1,
        [2, 5, 4],
        lambda x, w, b, **kw: NF.group_norm(x, 2, w, b, **kw),
    ),
}


def _gradcheck_inputs(shape, channel_axis, lengths):
    """mask and float64 leaves (x, weight, bias); pads hold other O(1) values (finite
    differences stay accurate) so a gradient leaking through them would show."""
    sequence_axis = 3 - channel_axis  # (B, C, L) or (B, L, C)
    mask = _lengths_mask(lengths, shape[sequence_axis])
    full = mask.unsqueeze(channel_axis).expand(shape)
    x = torch.where(full, _randn(*shape), 5 * _randn(*shape))
    channels = shape[channel_axis]
    w, b = _randn(channels), _randn(channels)
    return mask, [t.detach().requires_grad_(True) for t in (x, w, b)]


@pytest.mark.parametrize("case_id", list(GRADCHECK_CASES))
def test_masked_norm_gradient_is_exact_in_float64(case_id):
    shape, channel_axis, lengths, fn = GRADCHECK_CASES[case_id]
    mask, inputs = _gradcheck_inputs(shape, channel_axis, lengths)

    def f(x, w, b):
        return fn(x, w, b, mask=mask)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_masked_batch_norm_gradient_is_exact_for_a_2d_spatial_mask_with_an_empty_sample():
    mask = _random_mask((3, 2, 3, 4), 1)
    mask[1] = False  # sample 1 entirely padding
    x = _randn(3, 2, 3, 4).requires_grad_(True)
    w, b = _randn(2).requires_grad_(True), _randn(2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, b: _bn_fn(1)(x, w, b, mask=mask), (x, w, b))


@pytest.mark.parametrize("case_id", list(GRADCHECK_CASES))
def test_lengths_and_the_equivalent_mask_give_identical_results(case_id):
    shape, channel_axis, lengths, fn = GRADCHECK_CASES[case_id]
    mask, (x, w, b) = _gradcheck_inputs(shape, channel_axis, lengths)
    dy = _randn(*shape)
    results = []
    for kwargs in ({"mask": mask}, {"lengths": torch.tensor(lengths)}):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
        y = fn(*leaves, **kwargs)
        y.backward(dy)
        results.append([y.detach()] + [t.grad for t in leaves])
    for name, a, b_ in zip(("y", "dx", "dweight", "dbias"), *results, strict=True):
        assert torch.equal(a, b_), name


@pytest.mark.parametrize(
    "make",
    [
        lambda: normlab.BatchNorm1d(4, dtype=F64),
        lambda: normlab.BatchNorm(4, dim=-1, dtype=F64),
        lambda: normlab.InstanceNorm1d(4, affine=True, track_running_stats=True, dtype=F64),
    ],
    ids=["BatchNorm1d", "BatchNorm dim=-1", "InstanceNorm1d"],
)
def test_lengths_and_mask_update_the_running_stats_identically(make):
    by_mask = _randomize(make())
    by_lengths = copy.deepcopy(by_mask)
    lengths = [6, 2, 4]
    mask = _lengths_mask(lengths, 6)
    x = _garbage_pads(_randn(3, 4, 6), mask, 1)
    if by_mask.__class__ is normlab.BatchNorm and by_mask.dim == -1:
        x = x.transpose(1, 2).contiguous()
    by_mask(x, mask=mask)
    by_lengths(x, lengths=torch.tensor(lengths))
    assert torch.equal(by_mask.running_mean, by_lengths.running_mean)
    assert torch.equal(by_mask.running_var, by_lengths.running_var)
    assert not torch.equal(by_mask.running_mean, make().running_mean)  # they did move


# --- 6. eval mode ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_batch_norm_eval_with_mask_uses_the_running_stats_and_ignores_the_mask(dtype):
    bn = _randomize(normlab.BatchNorm1d(4, dtype=dtype))
    for lengths in ([7, 3, 0], [2, 2, 7]):  # train with masks first
        mask = _lengths_mask(lengths, 7)
        bn(_garbage_pads(_randn(3, 4, 7, dtype=dtype), mask, 1), mask=mask)
    bn.eval()
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    rm, rv, w, b = (_np(t) for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias))
    x = _randn(3, 4, 7, dtype=dtype) * 3 + 1
    dy = _randn(*x.shape, dtype=dtype)
    plain = _fwd_bwd(bn, x, dy)
    expected_y = ref.batch_norm_eval(_np(x), rm, rv, w, b)
    expected_grads = ref.batch_norm_eval_backward(_np(dy), _np(x), rm, rv, w, b)
    _assert_ref(plain[0], expected_y, tol(dtype), "y")
    for name, g, e in zip(("dx", "dweight", "dbias"), plain[1:], expected_grads, strict=True):
        _assert_ref(g, e, grad_tol(dtype), name)
    all_padding = torch.zeros(3, 7, dtype=torch.bool)  # no real element: fine in eval
    for kwargs in (
        {"mask": _lengths_mask([7, 3, 0], 7)},
        {"lengths": torch.tensor([1, 5, 0])},
        {"mask": all_padding},
    ):
        masked = _fwd_bwd(bn, x, dy, **kwargs)
        for name, a, e in zip(("y", "dx", "dweight", "dbias"), masked, plain, strict=True):
            assert torch.equal(a, e), f"{name} with {list(kwargs)}"
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed in eval"


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_batch_norm_without_running_stats_uses_masked_batch_stats_in_eval(dtype):
    bn = _randomize(normlab.BatchNorm1d(4, track_running_stats=False, dtype=dtype)).eval()
    mask = _lengths_mask([7, 3, 0], 7)
    x = _garbage_pads(_randn(3, 4, 7, dtype=dtype), mask, 1)
    y = bn(x, mask=mask)
    expected = ref.batch_norm_train(_np(x), _np(bn.weight), _np(bn.bias), mask=mask.numpy())
    _assert_ref(y, expected, tol(dtype), "y")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_instance_norm_tracking_running_stats_uses_them_in_eval_whatever_the_mask(dtype):
    inorm = _randomize(
        normlab.InstanceNorm1d(4, affine=True, track_running_stats=True, dtype=dtype)
    )
    old_mean, old_var = _np(inorm.running_mean), _np(inorm.running_var)
    mask = _lengths_mask([7, 2, 5], 7)
    x_train = _garbage_pads(_randn(3, 4, 7, dtype=dtype), mask, 1)
    inorm(x_train, mask=mask)
    exp_mean, exp_var = ref.instance_norm_update_running_stats(
        _np(x_train), old_mean, old_var, 0.1, mask=mask.numpy()
    )
    _assert_ref(inorm.running_mean, exp_mean, tol(dtype), "running_mean")
    _assert_ref(inorm.running_var, exp_var, tol(dtype), "running_var")

    inorm.eval()
    rm, rv = inorm.running_mean.clone(), inorm.running_var.clone()
    x = _randn(3, 4, 7, dtype=dtype) * 2 - 1
    y = inorm(x)
    expected = ref.batch_norm_eval(_np(x), _np(rm), _np(rv), _np(inorm.weight), _np(inorm.bias))
    _assert_ref(y, expected, tol(dtype), "y uses the running stats")
    for kwargs in (
        {"mask": mask},
        {"lengths": torch.tensor([0, 1, 7])},  # < 2 real values is fine in eval
        {"mask": torch.zeros(3, 7, dtype=torch.bool)},
    ):
        assert torch.equal(inorm(x, **kwargs), y), list(kwargs)
    assert torch.equal(inorm.running_mean, rm) and torch.equal(inorm.running_var, rv)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_instance_norm_without_running_stats_uses_masked_instance_stats_in_eval(dtype):
    inorm = _randomize(normlab.InstanceNorm1d(4, affine=True, dtype=dtype)).eval()
    mask = _lengths_mask([7, 2, 5], 7)
    x = _garbage_pads(_randn(3, 4, 7, dtype=dtype), mask, 1)
    expected = ref.instance_norm(_np(x), _np(inorm.weight), _np(inorm.bias), mask=mask.numpy())
    _assert_ref(inorm(x, mask=mask), expected, tol(dtype), "y")


# --- 7. errors ------------------------------------------------------------------------------

B_ERR, C_ERR, L_ERR = 3, 4, 6

ERROR_CALLS = {
    "BatchNorm1d": lambda x, **kw: normlab.BatchNorm1d(C_ERR)(x, **kw),
    "BatchNorm dim=-1": lambda x, **kw: normlab.BatchNorm(C_ERR, dim=-1)(x.transpose(1, 2), **kw),
    "InstanceNorm1d": lambda x, **kw: normlab.InstanceNorm1d(C_ERR)(x, **kw),
    "GroupNorm": lambda x, **kw: normlab.GroupNorm(2, C_ERR)(x, **kw),
    "functional.batch_norm": lambda x, **kw: NF.batch_norm(x, None, None, training=True, **kw),
    "functional.instance_norm": lambda x, **kw: NF.instance_norm(x, **kw),
    "functional.group_norm": lambda x, **kw: NF.group_norm(x, 2, **kw),
}


def _err_input():
    return _randn(B_ERR, C_ERR, L_ERR, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8], ids=str)
@pytest.mark.parametrize("call", list(ERROR_CALLS))
def test_mask_of_a_non_bool_dtype_is_a_type_error_naming_mask(call, dtype):
    mask = torch.ones(B_ERR, L_ERR, dtype=dtype)
    with pytest.raises(TypeError, match=r"mask.*bool"):
        ERROR_CALLS[call](_err_input(), mask=mask)


@pytest.mark.parametrize("call", list(ERROR_CALLS))
def test_mask_that_is_not_a_tensor_is_a_type_error(call):
    with pytest.raises(TypeError, match="mask"):
        ERROR_CALLS[call](_err_input(), mask=np.ones((B_ERR, L_ERR), dtype=bool))


@pytest.mark.parametrize(
    "mask_shape",
    [(B_ERR, C_ERR, L_ERR), (B_ERR, L_ERR + 1), (B_ERR, L_ERR - 1), (B_ERR + 1, L_ERR), (L_ERR,)],
    ids=["channel-axis-kept", "too-long", "too-short", "wrong-batch", "missing-batch"],
)
@pytest.mark.parametrize("call", list(ERROR_CALLS))
def test_mask_of_the_wrong_shape_is_a_value_error_stating_the_expected_shape(call, mask_shape):
    mask = torch.ones(mask_shape, dtype=torch.bool)
    expected = rf"\[{B_ERR}, {L_ERR}\]"
    with pytest.raises(ValueError, match=rf"mask.*{expected}"):
        ERROR_CALLS[call](_err_input(), mask=mask)


@pytest.mark.parametrize("call", list(ERROR_CALLS))
def test_mask_and_lengths_together_are_a_value_error(call):
    mask = torch.ones(B_ERR, L_ERR, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask.*lengths|lengths.*mask"):
        ERROR_CALLS[call](_err_input(), mask=mask, lengths=torch.full((B_ERR,), L_ERR))


@pytest.mark.parametrize(
    "lengths",
    [[L_ERR] * (B_ERR - 1), [L_ERR] * (B_ERR + 1), [L_ERR, -1, L_ERR], [L_ERR, L_ERR + 1, 2]],
    ids=["too-few", "too-many", "negative", "longer-than-L"],
)
@pytest.mark.parametrize("call", list(ERROR_CALLS))
def test_invalid_lengths_are_a_value_error(call, lengths):
    with pytest.raises(ValueError, match="lengths"):
        ERROR_CALLS[call](_err_input(), lengths=torch.tensor(lengths))


@pytest.mark.parametrize("call", list(ERROR_CALLS))
def test_float_lengths_are_a_type_error(call):
    with pytest.raises(TypeError, match="lengths"):
        ERROR_CALLS[call](_err_input(), lengths=torch.full((B_ERR,), 4.0))


@pytest.mark.parametrize(
    "call",
    [
        lambda x, **kw: normlab.BatchNorm2d(C_ERR)(x, **kw),
        lambda x, **kw: normlab.InstanceNorm2d(C_ERR)(x, **kw),
        lambda x, **kw: normlab.GroupNorm(2, C_ERR)(x, **kw),
        lambda x, **kw: NF.batch_norm(x, None, None, training=True, **kw),
    ],
    ids=["BatchNorm2d", "InstanceNorm2d", "GroupNorm", "functional.batch_norm"],
)
def test_lengths_on_an_input_with_two_position_axes_asks_for_a_mask(call):
    x = _randn(B_ERR, C_ERR, 5, L_ERR, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"lengths.*pass mask"):
        call(x, lengths=torch.full((B_ERR,), 3))


UNBATCHED_ERRORS = {
    "numpy-mask": ({"mask": np.ones(L_ERR, dtype=bool)}, TypeError, "mask"),
    "float-mask": ({"mask": torch.ones(L_ERR)}, TypeError, "mask"),
    "mask-too-long": ({"mask": torch.ones(L_ERR + 1, dtype=torch.bool)}, ValueError, "mask"),
    "two-lengths": ({"lengths": torch.tensor([3, 4])}, ValueError, "lengths"),
    "length-above-L": ({"lengths": torch.tensor(L_ERR + 1)}, ValueError, "lengths"),
    "negative-length": ({"lengths": torch.tensor(-1)}, ValueError, "lengths"),
}


@pytest.mark.parametrize("case", list(UNBATCHED_ERRORS))
def test_unbatched_instance_norm_rejects_a_bad_mask_or_lengths_as_the_batched_call_does(case):
    kwargs, error, word = UNBATCHED_ERRORS[case]
    with pytest.raises(error, match=word):
        normlab.InstanceNorm1d(C_ERR)(_randn(C_ERR, L_ERR, dtype=torch.float32), **kwargs)


BN_CALLS = {k: v for k, v in ERROR_CALLS.items() if "batch" in k.lower()}


@pytest.mark.parametrize("lengths", [[0, 0, 0], [0, 1, 0]], ids=["all-padding", "one-real-value"])
@pytest.mark.parametrize("call", list(BN_CALLS))
def test_batch_norm_training_with_fewer_than_two_real_values_per_channel_is_a_value_error(
    call, lengths
):
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BN_CALLS[call](_err_input(), lengths=torch.tensor(lengths))
    mask = _lengths_mask(lengths, L_ERR)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BN_CALLS[call](_err_input(), mask=mask)


def test_batch_norm_training_with_two_real_values_in_the_whole_batch_is_fine():
    mask = _lengths_mask([0, 1, 1], L_ERR)
    y = normlab.BatchNorm1d(C_ERR)(_err_input(), mask=mask)
    assert torch.isfinite(y).all()


PER_SAMPLE_CALLS = {
    "InstanceNorm1d": (ERROR_CALLS["InstanceNorm1d"], "instance"),
    "InstanceNorm1d tracking": (
        lambda x, **kw: normlab.InstanceNorm1d(C_ERR, track_running_stats=True)(x, **kw),
        "instance",
    ),
    "functional.instance_norm": (ERROR_CALLS["functional.instance_norm"], "instance"),
    # one channel per group, so one real position is one real value of the group
    "GroupNorm": (lambda x, **kw: normlab.GroupNorm(C_ERR, C_ERR)(x, **kw), "group"),
    "functional.group_norm": (lambda x, **kw: NF.group_norm(x, C_ERR, **kw), "group"),
}


@pytest.mark.parametrize(
    "lengths", [[L_ERR, 1, L_ERR], [L_ERR, L_ERR, 0]], ids=["one-real-value", "no-real-value"]
)
@pytest.mark.parametrize("call", list(PER_SAMPLE_CALLS))
def test_instance_or_group_with_fewer_than_two_real_values_is_a_value_error(call, lengths):
    fn, per = PER_SAMPLE_CALLS[call]
    with pytest.raises(ValueError, match=f"more than 1 value per {per}"):
        fn(_err_input(), lengths=torch.tensor(lengths))
    with pytest.raises(ValueError, match=f"more than 1 value per {per}"):
        fn(_err_input(), mask=_lengths_mask(lengths, L_ERR))


def test_group_norm_counts_real_values_over_the_group_channels():
    """One real position in a group of two channels is two real values: allowed."""
    x = _err_input()
    lengths = torch.tensor([L_ERR, 1, L_ERR])
    y = normlab.GroupNorm(2, C_ERR)(x, lengths=lengths)
    expected = ref.group_norm(_np(x), 2, mask=_lengths_mask(lengths, L_ERR).numpy())
    _assert_ref(y, expected, tol(torch.float32), "y")
    with pytest.raises(ValueError, match="more than 1 value per group"):
        normlab.GroupNorm(2, C_ERR)(x, lengths=torch.tensor([L_ERR, 0, L_ERR]))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "make, layout",
    [
        (lambda: normlab.BatchNorm1d(4), "BCL"),
        (lambda: normlab.BatchNorm(4, dim=-1), "BLC"),
        (lambda: normlab.InstanceNorm1d(4, affine=True), "BCL"),
        (lambda: normlab.GroupNorm(2, 4), "BCL"),
        (lambda: normlab.PowerNorm(4, warmup_iters=1), "BLC"),
        (lambda: normlab.PowerNorm(4, warmup_iters=0), "BLC"),
    ],
    ids=["BN", "BN-last", "IN", "GN", "PowerNorm-warmup", "PowerNorm"],
)
def test_non_finite_padding_does_not_reach_real_positions(make, layout, value):
    """Padding from torch.empty or a -inf fill must not poison the statistics: the masked
    statistics select real elements rather than multiply by the mask."""
    torch.manual_seed(0)
    lengths = torch.tensor([6, 3, 5])
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    mask = normlab.lengths_to_mask(lengths, 6)
    x = x.masked_fill(~mask.unsqueeze(1), value)
    if layout == "BLC":
        x = x.transpose(1, 2).contiguous()
    x.requires_grad_(True)
    module = make().double()
    y = module(x, lengths=lengths)
    real = mask.unsqueeze(1) if layout == "BCL" else mask.unsqueeze(2)
    y_real = torch.where(real, y, 0)
    assert torch.isfinite(y_real).all()
    (y_real.sum()).backward()
    assert torch.isfinite(torch.where(real, x.grad, 0)).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())
