"""The float64 NumPy reference is the oracle of every backend, so it is checked here against
sources that share none of its code: ``torch.nn.functional`` (forward, autograd backward and
in-place running statistics) and central finite differences of the reference's own forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlab import reference as ref
from normlab.axes import feature_norm_axes
from tolerances import grad_tol, tol

F64 = torch.float64
TOL = tol(F64)
GRAD_TOL = grad_tol(F64)

# Central differences with step H: truncation error ~ H^2 * |f'''| ~ 1e-10 and rounding error
# ~ 2^-52 * |L| / H ~ 1e-10 for the O(1..10) losses below, so 1e-7 is a safe bound that still
# catches any wrong term of a gradient (those are O(0.1..1)). grad_tol(float64) (1e-9) is for
# two exact computations and is tighter than a finite difference can honestly achieve.
H = 1e-5
FD_TOL = {"atol": 1e-7, "rtol": 1e-6}

AFFINES = ["none", "weight", "weight_bias"]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def _t(a):
    return None if a is None else torch.as_tensor(np.asarray(a, dtype=np.float64))


def _params(rng, n, affine, shape=None):
    """weight/bias for ``affine`` (weight not all ones, bias not zero, so both matter)."""
    shape = (n,) if shape is None else shape
    weight = rng.uniform(0.5, 2.0, size=shape) if affine != "none" else None
    bias = rng.normal(size=shape) if affine == "weight_bias" else None
    return weight, bias


def _close(actual, expected, tolerance):
    if expected is None:
        assert actual is None
        return
    assert actual is not None
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), **tolerance)


def _torch_grads(fn, dy, x, *params):
    """dx and d(param) of sum(dy * fn(x, *params)) by torch autograd (None for absent params)."""
    leaves = [None if a is None else _t(a).requires_grad_() for a in (x, *params)]
    y = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, _t(dy)))
    return [None if t is None else next(grads).numpy() for t in leaves]


def _numerical_grads(f, dy, *arrays):
    """Full central-difference gradient of L = sum(dy * f(*arrays)) w.r.t. each array."""
    arrays = [None if a is None else np.array(a, dtype=np.float64) for a in arrays]

    def loss():
        return float(np.sum(dy * f(*arrays)))

    grads = []
    for a in arrays:
        if a is None:
            grads.append(None)
            continue
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            orig = a[idx]
            a[idx] = orig + H
            plus = loss()
            a[idx] = orig - H
            minus = loss()
            a[idx] = orig
            g[idx] = (plus - minus) / (2 * H)
        grads.append(g)
    return grads


def _check_backward(dx_dw_db, expected, tolerance):
    """Compare reference (dx, dweight, dbias) to expected gradients [dx, dw, db]."""
    for got, want in zip(dx_dw_db, expected, strict=True):
        _close(got, want, tolerance)


def _perm_last(ndim, axis):
    """Permutation that moves ``axis`` to the end, and its inverse."""
    perm = [a for a in range(ndim) if a != axis] + [axis]
    return perm, list(np.argsort(perm))


def _perm_first_channel(ndim, axis):
    """Permutation that moves ``axis`` to position 1 (torch's channel axis), and its inverse."""
    rest = [a for a in range(ndim) if a != axis]
    perm = [rest[0], axis, *rest[1:]]
    return perm, list(np.argsort(perm))


# --- forward vs torch.nn.functional ---------------------------------------------------------

LAYER_NORM_CASES = [((3, 7), (7,)), ((2, 3, 5), (5,)), ((2, 3, 5), (3, 5)), ((2, 6, 3, 4), (3, 4))]


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize(("shape", "normalized_shape"), LAYER_NORM_CASES)
def test_reference_layer_norm_matches_torch_layer_norm(shape, normalized_shape, affine):
    rng = _rng(1, len(shape), len(normalized_shape))
    x = rng.normal(2.0, 3.0, size=shape)
    w, b = _params(rng, None, affine, normalized_shape)
    expected = F.layer_norm(_t(x), normalized_shape, _t(w), _t(b), eps=1e-3)
    _close(ref.layer_norm(x, normalized_shape, w, b, eps=1e-3), expected.numpy(), TOL)


@pytest.mark.parametrize("affine", AFFINES)
def test_reference_layer_norm_dim_1_on_nchw_matches_torch_layer_norm_of_channels_last(affine):
    rng = _rng(2)
    x = rng.normal(size=(2, 6, 3, 4))
    w, b = _params(rng, 6, affine)
    expected = F.layer_norm(_t(x).permute(0, 2, 3, 1), (6,), _t(w), _t(b)).permute(0, 3, 1, 2)
    _close(ref.layer_norm(x, 6, w, b, dim=1), expected.numpy(), TOL)


def test_reference_layer_norm_two_non_trailing_dims_matches_torch_after_permute():
    rng = _rng(3)
    x = rng.normal(size=(2, 6, 3, 4))
    w, b = _params(rng, None, "weight_bias", (6, 4))
    expected = F.layer_norm(_t(x).permute(0, 2, 1, 3), (6, 4), _t(w), _t(b)).permute(0, 2, 1, 3)
    _close(ref.layer_norm(x, (6, 4), w, b, dim=(1, 3)), expected.numpy(), TOL)
    _close(ref.layer_norm(x, (6, 4), w, b, dim=(-3, -1)), expected.numpy(), TOL)


@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize(("shape", "normalized_shape"), LAYER_NORM_CASES)
def test_reference_rms_norm_matches_torch_rms_norm(shape, normalized_shape, with_weight, eps):
    rng = _rng(4, len(shape), len(normalized_shape))
    x = rng.normal(0.5, 2.0, size=shape)
    w = rng.uniform(0.5, 2.0, size=normalized_shape) if with_weight else None
    expected = F.rms_norm(_t(x), normalized_shape, _t(w), eps=eps)
    _close(ref.rms_norm(x, normalized_shape, w, eps=eps), expected.numpy(), TOL)


def test_reference_rms_norm_default_eps_is_machine_epsilon_of_input_dtype():
    # Mean square ~1e-8, comparable to float32's eps (1.2e-7) but far above float64's: the
    # default eps changes the output by ~50% in float32, so the dtype it is taken from matters.
    rng = _rng(5)
    x32 = (1e-4 * rng.normal(size=(4, 8))).astype(np.float32)
    expected32 = F.rms_norm(torch.from_numpy(x32), (8,)).numpy()
    _close(ref.rms_norm(x32, (8,)), expected32, tol(torch.float32))
    x64 = x32.astype(np.float64)
    expected64 = F.rms_norm(_t(x64), (8,)).numpy()
    _close(ref.rms_norm(x64, (8,)), expected64, TOL)
    assert not np.allclose(expected32, expected64, rtol=1e-2)  # eps really differs


BATCH_SHAPES = [(3, 7), (2, 3, 5), (2, 6, 3, 4)]


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_reference_batch_norm_train_matches_torch_batch_norm_training(shape, affine):
    rng = _rng(6, len(shape))
    x = rng.normal(-1.0, 2.0, size=shape)
    w, b = _params(rng, shape[1], affine)
    expected = F.batch_norm(_t(x), None, None, _t(w), _t(b), training=True, eps=1e-3)
    _close(ref.batch_norm_train(x, w, b, eps=1e-3), expected.numpy(), TOL)


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("shape", [(4, 3, 5), (2, 3, 4, 5)])
def test_reference_batch_norm_train_dim_minus_1_matches_torch_after_permute(shape, affine):
    rng = _rng(7, len(shape))
    x = rng.normal(size=shape)
    w, b = _params(rng, shape[-1], affine)
    perm, inv = _perm_first_channel(len(shape), len(shape) - 1)
    expected = F.batch_norm(_t(x).permute(perm), None, None, _t(w), _t(b), training=True)
    _close(ref.batch_norm_train(x, w, b, dim=-1), expected.permute(inv).numpy(), TOL)


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_reference_batch_norm_eval_matches_torch_batch_norm_with_running_stats(shape, affine):
    rng = _rng(8, len(shape))
    c = shape[1]
    x = rng.normal(size=shape)
    running_mean, running_var = rng.normal(size=c), rng.uniform(0.2, 3.0, size=c)
    w, b = _params(rng, c, affine)
    expected = F.batch_norm(
        _t(x), _t(running_mean), _t(running_var), _t(w), _t(b), training=False, eps=1e-3
    )
    got = ref.batch_norm_eval(x, running_mean, running_var, w, b, eps=1e-3)
    _close(got, expected.numpy(), TOL)


GROUP_CASES = [
    ((2, 6, 3, 4), 1),
    ((2, 6, 3, 4), 2),
    ((2, 6, 3, 4), 3),
    ((2, 6, 3, 4), 6),
    ((3, 4, 5), 2),
    ((2, 6), 3),
    ((2, 6, 2, 3, 2), 2),
]


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize(("shape", "groups"), GROUP_CASES)
def test_reference_group_norm_matches_torch_group_norm(shape, groups, affine):
    rng = _rng(9, len(shape), groups)
    x = rng.normal(1.0, 2.0, size=shape)
    w, b = _params(rng, shape[1], affine)
    expected = F.group_norm(_t(x), groups, _t(w), _t(b), eps=1e-3)
    _close(ref.group_norm(x, groups, w, b, eps=1e-3), expected.numpy(), TOL)


INSTANCE_SHAPES = [(2, 3, 5), (2, 6, 3, 4), (2, 3, 2, 3, 4), (1, 7, 3)]


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("shape", INSTANCE_SHAPES)
def test_reference_instance_norm_matches_torch_instance_norm(shape, affine):
    rng = _rng(10, len(shape))
    x = rng.normal(-0.5, 2.0, size=shape)
    w, b = _params(rng, shape[1], affine)
    expected = F.instance_norm(_t(x), weight=_t(w), bias=_t(b), eps=1e-3)
    _close(ref.instance_norm(x, w, b, eps=1e-3), expected.numpy(), TOL)


# --- the cases every backward is checked on (reference forward/backward, torch forward) --------
# Each case: name -> (x shape, param shape, make(rng) -> (ref_fwd, ref_bwd, torch_fwd)), where
# ref_fwd(x, w, b), ref_bwd(dy, x, w, b) and torch_fwd(x, w, b) close over the other arguments.


def _layer_norm_case(shape, normalized_shape, dim=None, torch_perm=None):
    def make(rng):
        def ref_fwd(x, w, b):
            return ref.layer_norm(x, normalized_shape, w, b, eps=1e-3, dim=dim)

        def ref_bwd(dy, x, w, b):
            return ref.layer_norm_backward(dy, x, normalized_shape, w, b, eps=1e-3, dim=dim)

        def torch_fwd(x, w, b):
            if torch_perm is None:
                return F.layer_norm(x, normalized_shape, w, b, eps=1e-3)
            perm, inv = torch_perm
            return F.layer_norm(x.permute(perm), normalized_shape, w, b, eps=1e-3).permute(inv)

        return ref_fwd, ref_bwd, torch_fwd

    return shape, normalized_shape, make, True


def _rms_norm_case(shape, normalized_shape, eps):
    def make(rng):
        def ref_fwd(x, w, b):
            return ref.rms_norm(x, normalized_shape, w, eps=eps)

        def ref_bwd(dy, x, w, b):
            return ref.rms_norm_backward(dy, x, normalized_shape, w, eps=eps)

        def torch_fwd(x, w, b):
            return F.rms_norm(x, normalized_shape, w, eps=eps)

        return ref_fwd, ref_bwd, torch_fwd

    return shape, normalized_shape, make, False


def _batch_norm_train_case(shape, dim=1):
    ndim = len(shape)
    channel = dim % ndim

    def make(rng):
        def ref_fwd(x, w, b):
            return ref.batch_norm_train(x, w, b, eps=1e-3, dim=dim)

        def ref_bwd(dy, x, w, b):
            return ref.batch_norm_train_backward(dy, x, w, b, eps=1e-3, dim=dim)

        def torch_fwd(x, w, b):
            perm, inv = _perm_first_channel(ndim, channel)
            y = F.batch_norm(x.permute(perm), None, None, w, b, training=True, eps=1e-3)
            return y.permute(inv)

        return ref_fwd, ref_bwd, torch_fwd

    return shape, (shape[channel],), make, True


def _batch_norm_eval_case(shape):
    c = shape[1]

    def make(rng):
        running_mean, running_var = rng.normal(size=c), rng.uniform(0.2, 3.0, size=c)

        def ref_fwd(x, w, b):
            return ref.batch_norm_eval(x, running_mean, running_var, w, b, eps=1e-3)

        def ref_bwd(dy, x, w, b):
            return ref.batch_norm_eval_backward(dy, x, running_mean, running_var, w, b, eps=1e-3)

        def torch_fwd(x, w, b):
            return F.batch_norm(
                x, _t(running_mean), _t(running_var), w, b, training=False, eps=1e-3
            )

        return ref_fwd, ref_bwd, torch_fwd

    return shape, (c,), make, True


def _instance_norm_case(shape):
    def make(rng):
        def ref_fwd(x, w, b):
            return ref.instance_norm(x, w, b, eps=1e-3)

        def ref_bwd(dy, x, w, b):
            return ref.instance_norm_backward(dy, x, w, b, eps=1e-3)

        def torch_fwd(x, w, b):
            return F.instance_norm(x, weight=w, bias=b, eps=1e-3)

        return ref_fwd, ref_bwd, torch_fwd

    return shape, (shape[1],), make, True


def _group_norm_case(shape, groups):
    def make(rng):
        def ref_fwd(x, w, b):
            return ref.group_norm(x, groups, w, b, eps=1e-3)

        def ref_bwd(dy, x, w, b):
            return ref.group_norm_backward(dy, x, groups, w, b, eps=1e-3)

        def torch_fwd(x, w, b):
            return F.group_norm(x, groups, w, b, eps=1e-3)

        return ref_fwd, ref_bwd, torch_fwd

    return shape, (shape[1],), make, True


# Shapes for the torch comparison (odd sizes); small ones for the finite differences.
BACKWARD_CASES = {
    "layer_norm": _layer_norm_case((3, 7), (7,)),
    "layer_norm_2d": _layer_norm_case((2, 3, 5), (3, 5)),
    "layer_norm_dim1": _layer_norm_case(
        (2, 6, 3, 4), (6,), dim=1, torch_perm=([0, 2, 3, 1], [0, 3, 1, 2])
    ),
    "rms_norm_eps_none": _rms_norm_case((2, 3, 5), (5,), None),
    "rms_norm_eps": _rms_norm_case((3, 7), (7,), 1e-2),
    "batch_norm_train": _batch_norm_train_case((2, 6, 3, 4)),
    "batch_norm_train_2d": _batch_norm_train_case((5, 3)),
    "batch_norm_train_dim_last": _batch_norm_train_case((4, 3, 5), dim=-1),
    "batch_norm_eval": _batch_norm_eval_case((2, 3, 5)),
    "instance_norm": _instance_norm_case((2, 3, 5)),
    "instance_norm_2d": _instance_norm_case((2, 3, 3, 4)),
    "group_norm": _group_norm_case((2, 6, 3, 4), 3),
    "group_norm_one_group": _group_norm_case((3, 4, 5), 1),
}

FD_CASES = {
    "layer_norm": _layer_norm_case((2, 5), (5,)),
    "layer_norm_2d": _layer_norm_case((2, 2, 3), (2, 3)),
    "layer_norm_dim1": _layer_norm_case((2, 3, 2), (3,), dim=1),
    "rms_norm_eps_none": _rms_norm_case((2, 5), (5,), None),
    "rms_norm_eps": _rms_norm_case((2, 2, 3), (2, 3), 1e-2),
    "batch_norm_train": _batch_norm_train_case((3, 2, 2)),
    "batch_norm_train_dim_last": _batch_norm_train_case((2, 2, 3), dim=-1),
    "batch_norm_eval": _batch_norm_eval_case((2, 3, 2)),
    "instance_norm": _instance_norm_case((2, 2, 4)),
    "group_norm": _group_norm_case((2, 4, 3), 2),
}


def _case_inputs(case, affine, *key):
    shape, param_shape, make, has_bias = case
    rng = _rng(*key)
    x = rng.normal(0.5, 1.5, size=shape)
    dy = rng.normal(size=shape)
    w, b = _params(rng, None, affine, param_shape)
    if not has_bias:
        b = None
    ref_fwd, ref_bwd, torch_fwd = make(rng)
    return x, dy, w, b, ref_fwd, ref_bwd, torch_fwd


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("name", list(BACKWARD_CASES))
def test_reference_backward_matches_torch_autograd(name, affine):
    x, dy, w, b, _, ref_bwd, torch_fwd = _case_inputs(BACKWARD_CASES[name], affine, 11)
    expected = _torch_grads(torch_fwd, dy, x, w, b)
    got = ref_bwd(dy, x, w, b)
    assert len(got) == 3
    _check_backward(got, expected, GRAD_TOL)
    if w is None:
        assert got[1] is None
    if b is None:
        assert got[2] is None


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("name", list(FD_CASES))
def test_reference_backward_matches_finite_differences_of_reference_forward(name, affine):
    x, dy, w, b, ref_fwd, ref_bwd, _ = _case_inputs(FD_CASES[name], affine, 12)
    expected = _numerical_grads(ref_fwd, dy, x, w, b)
    got = ref_bwd(dy, x, w, b)
    _check_backward(got, expected, FD_TOL)
    # the gradient is not trivially zero (dx of a normalization sums to zero per group, but
    # is itself nonzero for a generic dy), so the comparison above has teeth
    assert np.abs(got[0]).max() > 1e-2


def test_reference_rms_norm_backward_has_no_bias_gradient():
    rng = _rng(13)
    x, dy, w = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=4)
    dx, dweight, dbias = ref.rms_norm_backward(dy, x, (4,), w)
    assert dbias is None
    assert dx.shape == x.shape
    assert dweight.shape == w.shape


# --- running statistics vs torch's in-place update ----------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, 0.5])
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 6), (2, 3, 4, 5)])
def test_reference_batch_norm_running_stats_match_torch_in_place_update(shape, momentum):
    rng = _rng(14, len(shape))
    c = shape[1]
    mean_ref, var_ref = rng.normal(size=c), rng.uniform(0.5, 2.0, size=c)
    mean_t, var_t = _t(mean_ref).clone(), _t(var_ref).clone()
    for step in range(3):  # chained steps: each starts from the previous running stats
        x = rng.normal(step, 1.0 + step, size=shape)
        F.batch_norm(_t(x), mean_t, var_t, training=True, momentum=momentum)
        mean_ref, var_ref = ref.batch_norm_update_running_stats(
            x, mean_ref, var_ref, momentum=momentum
        )
        _close(mean_ref, mean_t.numpy(), TOL)
        _close(var_ref, var_t.numpy(), TOL)


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_reference_batch_norm_running_stats_dim_minus_1_match_torch_after_permute(momentum):
    rng = _rng(15)
    x = rng.normal(1.0, 2.0, size=(4, 5, 3))
    mean0, var0 = rng.normal(size=3), rng.uniform(0.5, 2.0, size=3)
    mean_t, var_t = _t(mean0).clone(), _t(var0).clone()
    F.batch_norm(_t(x).permute(0, 2, 1), mean_t, var_t, training=True, momentum=momentum)
    mean, var = ref.batch_norm_update_running_stats(x, mean0, var0, momentum=momentum, dim=-1)
    _close(mean, mean_t.numpy(), TOL)
    _close(var, var_t.numpy(), TOL)


@pytest.mark.parametrize("momentum", [0.1, 0.5])
@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 4, 2, 3), (1, 3, 7)])
def test_reference_instance_norm_running_stats_match_torch_in_place_update(shape, momentum):
    rng = _rng(16, len(shape))
    c = shape[1]
    mean_ref, var_ref = rng.normal(size=c), rng.uniform(0.5, 2.0, size=c)
    mean_t, var_t = _t(mean_ref).clone(), _t(var_ref).clone()
    per_instance = shape[:2] + (1,) * (len(shape) - 2)
    for step in range(3):
        # per-instance offsets and scales, so averaging the instance statistics over the batch
        # (what torch does) differs from taking any single instance's or the pooled ones
        offset = rng.normal(step, 2.0, size=per_instance)
        x = offset + rng.uniform(0.5, 3.0, size=per_instance) * rng.normal(size=shape)
        F.instance_norm(_t(x), mean_t, var_t, use_input_stats=True, momentum=momentum)
        mean_ref, var_ref = ref.instance_norm_update_running_stats(
            x, mean_ref, var_ref, momentum=momentum
        )
        _close(mean_ref, mean_t.numpy(), TOL)
        _close(var_ref, var_t.numpy(), TOL)


# --- numerical stability: two-pass variance ------------------------------------------------------

# x = 1e4 + 1e-3 * noise: E[x^2] - E[x]^2 cancels ~1e8 against ~1e8 and loses ~all the digits
# of the true variance (~1e-6). The reference on x must match the reference on x - 1e4 (which is
# exact in float64 up to the rounding of x itself, ~1e-12 absolute, i.e. ~1e-9 relative to the
# noise). eps is tiny so the output is sensitive to the variance. 1e-6 is that rounding with
# margin, far below the percent-level error a one-pass variance would make.
STABLE_TOL = {"atol": 1e-6, "rtol": 1e-6}
OFFSET = 1e4
TINY_EPS = 1e-14


def _offset_input(shape, key):
    noise = 1e-3 * _rng(17, key).normal(size=shape)
    return OFFSET + noise, (OFFSET + noise) - OFFSET


def test_reference_statistics_variance_is_two_pass_for_large_offset():
    x, centred = _offset_input((4, 64), 0)
    axes = feature_norm_axes(2, (64,), None)
    mean, var = ref.statistics(x, axes)
    _, var_centred = ref.statistics(centred, axes)
    np.testing.assert_allclose(var, var_centred, rtol=1e-6)
    np.testing.assert_allclose(var.ravel(), np.var(centred, axis=1), rtol=1e-6)
    np.testing.assert_allclose(mean.ravel(), OFFSET + centred.mean(axis=1), rtol=1e-12)


@pytest.mark.parametrize(
    "norm",
    [
        lambda x: ref.layer_norm(x, x.shape[-1:], eps=TINY_EPS),
        lambda x: ref.layer_norm(x, x.shape[1:2], eps=TINY_EPS, dim=1),
        lambda x: ref.batch_norm_train(x, eps=TINY_EPS),
        lambda x: ref.batch_norm_train(x, eps=TINY_EPS, dim=-1),
        lambda x: ref.instance_norm(x, eps=TINY_EPS),
        lambda x: ref.group_norm(x, 2, eps=TINY_EPS),
    ],
    ids=[
        "layer_norm",
        "layer_norm_dim1",
        "batch_norm",
        "batch_norm_dim_last",
        "instance_norm",
        "group_norm",
    ],
)
def test_reference_norms_are_shift_invariant_for_large_offset(norm):
    x, centred = _offset_input((3, 4, 50), 1)
    got = norm(x)
    expected = norm(centred)
    _close(got, expected, STABLE_TOL)
    # the output really is normalized noise of unit scale, not a variance lost to cancellation
    assert 0.5 < np.std(got) < 2.0


def test_reference_large_offset_backward_is_shift_invariant():
    x, centred = _offset_input((3, 40), 2)
    dy = _rng(18).normal(size=x.shape)
    dx, _, _ = ref.layer_norm_backward(dy, x, (40,), eps=TINY_EPS)
    dx_centred, _, _ = ref.layer_norm_backward(dy, centred, (40,), eps=TINY_EPS)
    # dx scales with 1/std ~ 1e3, so compare relative to that scale
    np.testing.assert_allclose(dx, dx_centred, rtol=1e-6, atol=1e-6 * np.abs(dx_centred).max())
