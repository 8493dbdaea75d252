"""normlab against the float64 reference (``normlab.reference``) and against torch.nn.

Every module and every functional, forward and backward (dx, dweight, dbias through autograd
with a random upstream gradient), over odd and tiny sizes, float32/float64/bfloat16/float16,
non-contiguous and channels_last layouts, normlab's ``dim`` generalization, running
statistics, eval mode, unbatched InstanceNorm and one ``torch.compile`` model.

The reference is always computed in float64 from the *same* (possibly rounded) values the
normlab call saw, so half-precision tests measure normlab's own error, not the input's.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import normlab
import normlab.functional as NF
from normlab import reference as ref
from tolerances import grad_tol, tol

FLOATS = [torch.float32, torch.float64]
HALVES = [torch.bfloat16, torch.float16]
DTYPES = FLOATS + HALVES
FEATURES = [1, 3, 7, 769]

# (elementwise_affine / affine, bias)
AFFINE = [(True, True), (True, False), (False, False)]
AFFINE_IDS = ["weight+bias", "weight-only", "no-affine"]
# (weight present, bias present) for the functionals
PARAMS = [(True, True), (True, False), (False, True), (False, False)]
PARAMS_IDS = ["weight+bias", "weight-only", "bias-only", "none"]


# --- helpers --------------------------------------------------------------------------------


def _np(t):
    """A float64 copy of the exact values of ``t`` (whatever its dtype); None stays None."""
    return None if t is None else t.detach().double().numpy().copy()


def _assert_matches_reference(actual, expected, tolerance):
    assert actual is not None, "expected a tensor, got None"
    expected = torch.from_numpy(np.ascontiguousarray(np.asarray(expected, dtype=np.float64)))
    torch.testing.assert_close(actual.detach().double(), expected, **tolerance)


def _assert_same(actual, expected, tolerance):
    """normlab vs torch (or vs itself on another layout): same dtype, shape and values."""
    if expected is None:
        assert actual is None
        return
    assert actual is not None
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.detach(), expected.detach(), **tolerance)


def _randomize(module):
    """Random affine parameters and running statistics (variance > 0); returns the module."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, dtype=torch.float64))
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape))
            module.running_var.copy_(torch.rand(module.running_var.shape) + 0.5)
    return module


def _torch_twin(nl_module, torch_module):
    """``torch_module`` with exactly ``nl_module``'s state (the state_dict keys are shared)."""
    torch_module.load_state_dict(nl_module.state_dict(), strict=True)
    torch_module.train(nl_module.training)
    return torch_module


def _module_fwd_bwd(module, x, dy):
    """y and (dx, dweight, dbias) of one forward/backward; a grad is None if the tensor is."""
    module.zero_grad(set_to_none=True)
    leaf = x.detach().requires_grad_(True)
    y = module(leaf)
    y.backward(dy)
    weight, bias = module.weight, getattr(module, "bias", None)
    return y.detach(), (
        leaf.grad,
        None if weight is None else weight.grad,
        None if bias is None else bias.grad,
    )


def _fn_fwd_bwd(fn, x, weight, bias, dy):
    """y and (dx, dweight, dbias) of ``fn(x, weight, bias)`` with fresh leaves."""
    # x is detached, not cloned: a clone of a sliced (non-dense) tensor would be contiguous
    leaves = [x.detach().requires_grad_(True)] + [
        None if t is None else t.detach().clone().requires_grad_(True) for t in (weight, bias)
    ]
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), tuple(None if t is None else t.grad for t in leaves)


def _torch_dtype(dtype):
    """The dtype torch computes in: float32 for the half types (see ``_torch_module_fwd_bwd``)."""
    return torch.float32 if dtype in HALVES else dtype


def _down(t, dtype):
    return None if t is None else t.to(dtype)


def _torch_module_fwd_bwd(module, x, dy):
    """torch's y and grads. For bfloat16/float16 torch runs in float32 on the *same* (already
    rounded) values and its results are rounded to the half dtype: torch's native CPU half
    kernels are themselves far outside tolerances.py's half tolerances (measured up to ~70x
    for dx of instance_norm/batch_norm/layer_norm/rms_norm, ~5-7x for the rms_norm output),
    while normlab is within ~0.1x, so the native half kernels are no oracle."""
    if x.dtype not in HALVES:
        return _module_fwd_bwd(module, x, dy)
    upcast = copy.deepcopy(module).float()
    y, grads = _module_fwd_bwd(upcast, x.float(), dy.float())
    module.load_state_dict(upcast.state_dict())  # running statistics, rounded to the dtype
    return _down(y, x.dtype), tuple(_down(g, x.dtype) for g in grads)


def _torch_fn_fwd_bwd(fn, x, weight, bias, dy):
    """As ``_torch_module_fwd_bwd`` for ``fn(x, weight, bias)``."""
    dtype = x.dtype
    if dtype not in HALVES:
        return _fn_fwd_bwd(fn, x, weight, bias, dy)
    y, grads = _fn_fwd_bwd(
        fn, x.float(), _down(weight, torch.float32), _down(bias, torch.float32), dy.float()
    )
    return _down(y, dtype), tuple(_down(g, dtype) for g in grads)


def _check_grads(grads, torch_grads, ref_grads, dtype):
    for name, g, gt, gr in zip(
        ("dx", "dweight", "dbias"), grads, torch_grads, ref_grads, strict=True
    ):
        if gr is None:
            assert g is None, f"{name}: expected no gradient"
            continue
        assert g is not None, f"{name}: missing gradient"
        _assert_matches_reference(g, gr, grad_tol(dtype))
        _assert_same(g, gt, grad_tol(dtype))


def _check_module(nl_module, torch_module, x, ref_forward, ref_backward):
    """Forward and backward of ``nl_module`` against torch and the reference.

    ``ref_forward(x, weight, bias)`` and ``ref_backward(dy, x, weight, bias)`` take float64
    arrays (weight/bias None when absent)."""
    dtype = x.dtype
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    weight, bias = _np(nl_module.weight), _np(getattr(nl_module, "bias", None))
    xn = _np(x)

    y, grads = _module_fwd_bwd(nl_module, x, dy)
    yt, torch_grads = _torch_module_fwd_bwd(torch_module, x, dy)

    assert y.dtype == dtype
    assert y.shape == x.shape
    _assert_matches_reference(y, ref_forward(xn, weight, bias), tol(dtype))
    _assert_same(y, yt, tol(dtype))
    _check_grads(grads, torch_grads, ref_backward(_np(dy), xn, weight, bias), dtype)
    return y, grads


def _check_functional(nl_fn, torch_fn, x, weight, bias, ref_forward, ref_backward):
    """As ``_check_module`` for ``fn(x, weight, bias)``."""
    dtype = x.dtype
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    xn, wn, bn = _np(x), _np(weight), _np(bias)

    y, grads = _fn_fwd_bwd(nl_fn, x, weight, bias, dy)
    yt, torch_grads = _torch_fn_fwd_bwd(torch_fn, x, weight, bias, dy)

    assert y.dtype == dtype
    assert y.shape == x.shape
    _assert_matches_reference(y, ref_forward(xn, wn, bn), tol(dtype))
    _assert_same(y, yt, tol(dtype))
    _check_grads(grads, torch_grads, ref_backward(_np(dy), xn, wn, bn), dtype)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _maybe(flag, shape, dtype):
    return _randn(*shape, dtype=dtype) if flag else None


def _rms_eps(eps, dtype):
    """The eps normlab and torch use: eps=None is the machine epsilon of the input dtype."""
    return torch.finfo(dtype).eps if eps is None else eps


# --- LayerNorm / RMSNorm modules ------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", AFFINE, ids=AFFINE_IDS)
@pytest.mark.parametrize("leading", [(), (2, 3)], ids=["unbatched", "2x3"])
@pytest.mark.parametrize("features", FEATURES)
def test_layer_norm_module_matches_reference_and_torch(features, leading, affine, dtype):
    elementwise_affine, bias = affine
    nl = _randomize(
        normlab.LayerNorm(features, elementwise_affine=elementwise_affine, bias=bias, dtype=dtype)
    )
    tm = _torch_twin(
        nl, nn.LayerNorm(features, elementwise_affine=elementwise_affine, bias=bias, dtype=dtype)
    )
    x = _randn(*leading, features, dtype=dtype)
    _check_module(
        nl,
        tm,
        x,
        lambda x, w, b: ref.layer_norm(x, features, w, b, 1e-5),
        lambda dy, x, w, b: ref.layer_norm_backward(dy, x, features, w, b, 1e-5),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalized_shape", [(3, 7), (1, 5), (2, 3, 4)], ids=str)
def test_layer_norm_module_with_multi_axis_normalized_shape_matches_reference_and_torch(
    normalized_shape, dtype
):
    nl = _randomize(normlab.LayerNorm(normalized_shape, dtype=dtype))
    tm = _torch_twin(nl, nn.LayerNorm(normalized_shape, dtype=dtype))
    x = _randn(3, *normalized_shape, dtype=dtype)
    _check_module(
        nl,
        tm,
        x,
        lambda x, w, b: ref.layer_norm(x, normalized_shape, w, b),
        lambda dy, x, w, b: ref.layer_norm_backward(dy, x, normalized_shape, w, b),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [None, 1e-6], ids=["eps=None", "eps=1e-6"])
@pytest.mark.parametrize("elementwise_affine", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("leading", [(), (2, 3)], ids=["unbatched", "2x3"])
@pytest.mark.parametrize("features", FEATURES)
def test_rms_norm_module_matches_reference_and_torch(
    features, leading, elementwise_affine, eps, dtype
):
    nl = _randomize(
        normlab.RMSNorm(features, eps=eps, elementwise_affine=elementwise_affine, dtype=dtype)
    )
    e = _rms_eps(eps, dtype)  # explicit for torch, which may compute in float32 (see helpers)
    tm = _torch_twin(
        nl, nn.RMSNorm(features, eps=e, elementwise_affine=elementwise_affine, dtype=dtype)
    )
    x = _randn(*leading, features, dtype=dtype)
    assert nl.bias is None
    _check_module(
        nl,
        tm,
        x,
        lambda x, w, b: ref.rms_norm(x, features, w, e),
        lambda dy, x, w, b: ref.rms_norm_backward(dy, x, features, w, e),
    )


# --- BatchNorm modules ----------------------------------------------------------------------

BN_CASES = [
    (normlab.BatchNorm1d, nn.BatchNorm1d, (5, 1)),
    (normlab.BatchNorm1d, nn.BatchNorm1d, (4, 3)),
    (normlab.BatchNorm1d, nn.BatchNorm1d, (3, 769)),
    (normlab.BatchNorm1d, nn.BatchNorm1d, (3, 7, 1)),
    (normlab.BatchNorm1d, nn.BatchNorm1d, (2, 3, 7)),
    (normlab.BatchNorm1d, nn.BatchNorm1d, (1, 3, 5)),
    (normlab.BatchNorm2d, nn.BatchNorm2d, (2, 1, 3, 3)),
    (normlab.BatchNorm2d, nn.BatchNorm2d, (2, 3, 1, 7)),
    (normlab.BatchNorm2d, nn.BatchNorm2d, (3, 7, 3, 5)),
    (normlab.BatchNorm3d, nn.BatchNorm3d, (2, 1, 3, 3, 3)),
    (normlab.BatchNorm3d, nn.BatchNorm3d, (2, 3, 3, 1, 5)),
    (normlab.BatchNorm3d, nn.BatchNorm3d, (2, 7, 1, 2, 3)),
]
BN_IDS = [f"{c.__name__}-{'x'.join(map(str, s))}" for c, _, s in BN_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", AFFINE, ids=AFFINE_IDS)
@pytest.mark.parametrize(("nl_cls", "torch_cls", "shape"), BN_CASES, ids=BN_IDS)
def test_batch_norm_module_training_matches_reference_and_torch_with_running_stats(
    nl_cls, torch_cls, shape, affine, dtype
):
    affine_, bias = affine
    nl = _randomize(nl_cls(shape[1], affine=affine_, bias=bias, dtype=dtype))
    tm = _torch_twin(nl, torch_cls(shape[1], affine=affine_, bias=bias, dtype=dtype))
    old_mean, old_var = _np(nl.running_mean), _np(nl.running_var)
    x = _randn(*shape, dtype=dtype)
    _check_module(
        nl,
        tm,
        x,
        lambda x, w, b: ref.batch_norm_train(x, w, b),
        lambda dy, x, w, b: ref.batch_norm_train_backward(dy, x, w, b),
    )

    exp_mean, exp_var = ref.batch_norm_update_running_stats(_np(x), old_mean, old_var, 0.1)
    assert nl.running_mean.dtype == dtype and nl.running_var.dtype == dtype
    _assert_matches_reference(nl.running_mean, exp_mean, tol(dtype))
    _assert_matches_reference(nl.running_var, exp_var, tol(dtype))
    _assert_same(nl.running_mean, tm.running_mean, tol(dtype))
    _assert_same(nl.running_var, tm.running_var, tol(dtype))
    assert int(nl.num_batches_tracked) == int(tm.num_batches_tracked) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", AFFINE, ids=AFFINE_IDS)
@pytest.mark.parametrize(("nl_cls", "torch_cls", "shape"), BN_CASES, ids=BN_IDS)
def test_batch_norm_module_eval_uses_running_stats_as_reference_and_torch(
    nl_cls, torch_cls, shape, affine, dtype
):
    affine_, bias = affine
    nl = _randomize(nl_cls(shape[1], affine=affine_, bias=bias, dtype=dtype)).eval()
    tm = _torch_twin(nl, torch_cls(shape[1], affine=affine_, bias=bias, dtype=dtype))
    rm, rv = _np(nl.running_mean), _np(nl.running_var)
    x = _randn(*shape, dtype=dtype)
    _check_module(
        nl,
        tm,
        x,
        lambda x, w, b: ref.batch_norm_eval(x, rm, rv, w, b),
        lambda dy, x, w, b: ref.batch_norm_eval_backward(dy, x, rm, rv, w, b),
    )
    # eval never touches the running statistics
    np.testing.assert_array_equal(_np(nl.running_mean), rm)
    np.testing.assert_array_equal(_np(nl.running_var), rv)
    assert int(nl.num_batches_tracked) == 0


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_module_without_running_stats_uses_batch_stats_in_train_and_eval(
    training, dtype
):
    nl = _randomize(normlab.BatchNorm2d(3, track_running_stats=False, dtype=dtype))
    nl.train(training)
    tm = _torch_twin(nl, nn.BatchNorm2d(3, track_running_stats=False, dtype=dtype))
    assert nl.running_mean is None and nl.running_var is None
    x = _randn(2, 3, 3, 5, dtype=dtype)
    _check_module(
        nl,
        tm,
        x,
        lambda x, w, b: ref.batch_norm_train(x, w, b),
        lambda dy, x, w, b: ref.batch_norm_train_backward(dy, x, w, b),
    )


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_batch_norm_momentum_none_is_the_cumulative_average_like_torch(dtype):
    nl = normlab.BatchNorm1d(3, momentum=None, dtype=dtype)
    tm = _torch_twin(nl, nn.BatchNorm1d(3, momentum=None, dtype=dtype))
    batches = [_randn(4, 3, 5, dtype=dtype) * (i + 1) + i for i in range(3)]
    for x in batches:
        _assert_same(nl(x), tm(x), tol(dtype))
    # the cumulative average of the batch means and unbiased batch variances
    xs = [_np(x) for x in batches]
    exp_mean = np.mean([x.mean(axis=(0, 2)) for x in xs], axis=0)
    exp_var = np.mean([x.var(axis=(0, 2), ddof=1) for x in xs], axis=0)
    _assert_matches_reference(nl.running_mean, exp_mean, tol(dtype))
    _assert_matches_reference(nl.running_var, exp_var, tol(dtype))
    _assert_same(nl.running_mean, tm.running_mean, tol(dtype))
    _assert_same(nl.running_var, tm.running_var, tol(dtype))
    assert int(nl.num_batches_tracked) == 3


BN_DIM_CASES = [
    ((2, 5, 3), -1),
    ((4, 7), -1),
    ((2, 3, 5, 7), -1),
    ((2, 3, 5, 4), 2),
    ((3, 1), -1),
    ((2, 5, 1), 2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "dim"), BN_DIM_CASES, ids=[f"{s}-dim{d}" for s, d in BN_DIM_CASES]
)
def test_batch_norm_with_dim_matches_reference_in_train_and_eval(shape, dim, dtype):
    channels = shape[dim]
    nl = _randomize(normlab.BatchNorm(channels, dim=dim, dtype=dtype))
    old_mean, old_var = _np(nl.running_mean), _np(nl.running_var)
    x = _randn(*shape, dtype=dtype)
    dy = _randn(*shape, dtype=dtype)
    w, b = _np(nl.weight), _np(nl.bias)

    y, grads = _module_fwd_bwd(nl, x, dy)
    assert y.dtype == dtype
    _assert_matches_reference(y, ref.batch_norm_train(_np(x), w, b, dim=dim), tol(dtype))
    for g, gr in zip(
        grads, ref.batch_norm_train_backward(_np(dy), _np(x), w, b, dim=dim), strict=True
    ):
        _assert_matches_reference(g, gr, grad_tol(dtype))
    exp_mean, exp_var = ref.batch_norm_update_running_stats(_np(x), old_mean, old_var, dim=dim)
    _assert_matches_reference(nl.running_mean, exp_mean, tol(dtype))
    _assert_matches_reference(nl.running_var, exp_var, tol(dtype))

    nl.eval()
    rm, rv = _np(nl.running_mean), _np(nl.running_var)
    y, grads = _module_fwd_bwd(nl, x, dy)
    _assert_matches_reference(y, ref.batch_norm_eval(_np(x), rm, rv, w, b, dim=dim), tol(dtype))
    for g, gr in zip(
        grads, ref.batch_norm_eval_backward(_np(dy), _np(x), rm, rv, w, b, dim=dim), strict=True
    ):
        _assert_matches_reference(g, gr, grad_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 3), (3, 1, 7), (2, 4, 1)], ids=str)
def test_batch_norm_dim_last_on_nlc_equals_torch_batch_norm1d_on_transposed_ncl(shape, dtype):
    channels = shape[-1]
    nl = _randomize(normlab.BatchNorm(channels, dim=-1, dtype=dtype))
    tm = _torch_twin(nl, nn.BatchNorm1d(channels, dtype=dtype))
    x = _randn(*shape, dtype=dtype)
    dy = _randn(*shape, dtype=dtype)

    for step in range(2):  # two training steps: the running stats evolve identically
        y, grads = _module_fwd_bwd(nl, x + step, dy)
        yt, torch_grads = _torch_module_fwd_bwd(tm, (x + step).transpose(1, 2), dy.transpose(1, 2))
        _assert_same(y, yt.transpose(1, 2), tol(dtype))
        _assert_same(grads[0], torch_grads[0].transpose(1, 2), grad_tol(dtype))
        _assert_same(grads[1], torch_grads[1], grad_tol(dtype))
        _assert_same(grads[2], torch_grads[2], grad_tol(dtype))
        _assert_same(nl.running_mean, tm.running_mean, tol(dtype))
        _assert_same(nl.running_var, tm.running_var, tol(dtype))
        assert int(nl.num_batches_tracked) == int(tm.num_batches_tracked) == step + 1

    nl.eval()
    tm.eval()
    y, grads = _module_fwd_bwd(nl, x, dy)
    yt, torch_grads = _torch_module_fwd_bwd(tm, x.transpose(1, 2), dy.transpose(1, 2))
    _assert_same(y, yt.transpose(1, 2), tol(dtype))
    _assert_same(grads[0], torch_grads[0].transpose(1, 2), grad_tol(dtype))
    _assert_same(grads[1], torch_grads[1], grad_tol(dtype))


# --- GroupNorm module -----------------------------------------------------------------------

GN_CASES = [
    ((2, 6, 5), 1),
    ((2, 6, 5), 2),
    ((2, 6, 5), 3),
    ((2, 6, 5), 6),
    ((3, 6), 2),
    ((3, 6), 1),
    ((2, 3, 3, 3), 3),
    ((1, 3, 1, 7), 1),
    ((1, 4, 3, 5), 2),
    ((2, 7, 1, 1, 3), 7),
    ((2, 7, 2, 1, 3), 1),
    ((2, 1, 5), 1),
]
GN_IDS = [f"{'x'.join(map(str, s))}-g{g}" for s, g in GN_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", AFFINE, ids=AFFINE_IDS)
@pytest.mark.parametrize(("shape", "groups"), GN_CASES, ids=GN_IDS)
def test_group_norm_module_matches_reference_and_torch(shape, groups, affine, dtype):
    affine_, bias = affine
    nl = _randomize(normlab.GroupNorm(groups, shape[1], affine=affine_, bias=bias, dtype=dtype))
    tm = _torch_twin(nl, nn.GroupNorm(groups, shape[1], affine=affine_, bias=bias, dtype=dtype))
    x = _randn(*shape, dtype=dtype)
    _check_module(
        nl,
        tm,
        x,
        lambda x, w, b: ref.group_norm(x, groups, w, b),
        lambda dy, x, w, b: ref.group_norm_backward(dy, x, groups, w, b),
    )


# --- InstanceNorm modules -------------------------------------------------------------------

IN_CASES = [
    (normlab.InstanceNorm1d, nn.InstanceNorm1d, (2, 3, 5)),
    (normlab.InstanceNorm1d, nn.InstanceNorm1d, (2, 1, 7)),
    (normlab.InstanceNorm1d, nn.InstanceNorm1d, (1, 7, 2)),
    (normlab.InstanceNorm2d, nn.InstanceNorm2d, (2, 3, 3, 5)),
    (normlab.InstanceNorm2d, nn.InstanceNorm2d, (1, 7, 1, 3)),
    (normlab.InstanceNorm3d, nn.InstanceNorm3d, (2, 3, 2, 3, 3)),
    (normlab.InstanceNorm3d, nn.InstanceNorm3d, (2, 1, 1, 1, 5)),
]
IN_IDS = [f"{c.__name__}-{'x'.join(map(str, s))}" for c, _, s in IN_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", AFFINE, ids=AFFINE_IDS)
@pytest.mark.parametrize(("nl_cls", "torch_cls", "shape"), IN_CASES, ids=IN_IDS)
def test_instance_norm_module_matches_reference_and_torch(nl_cls, torch_cls, shape, affine, dtype):
    affine_, bias = affine
    nl = _randomize(nl_cls(shape[1], affine=affine_, bias=bias, dtype=dtype))
    tm = _torch_twin(nl, torch_cls(shape[1], affine=affine_, bias=bias, dtype=dtype))
    x = _randn(*shape, dtype=dtype)
    _check_module(
        nl,
        tm,
        x,
        lambda x, w, b: ref.instance_norm(x, w, b),
        lambda dy, x, w, b: ref.instance_norm_backward(dy, x, w, b),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize(("nl_cls", "torch_cls", "shape"), IN_CASES, ids=IN_IDS)
def test_instance_norm_tracking_running_stats_matches_reference_and_torch_in_train_and_eval(
    nl_cls, torch_cls, shape, affine, dtype
):
    channels = shape[1]
    nl = _randomize(nl_cls(channels, affine=affine, track_running_stats=True, dtype=dtype))
    tm = _torch_twin(nl, torch_cls(channels, affine=affine, track_running_stats=True, dtype=dtype))
    old_mean, old_var = _np(nl.running_mean), _np(nl.running_var)
    x = _randn(*shape, dtype=dtype)
    # training: per-instance statistics, running stats updated with their batch average
    _check_module(
        nl,
        tm,
        x,
        lambda x, w, b: ref.instance_norm(x, w, b),
        lambda dy, x, w, b: ref.instance_norm_backward(dy, x, w, b),
    )
    exp_mean, exp_var = ref.instance_norm_update_running_stats(_np(x), old_mean, old_var, 0.1)
    _assert_matches_reference(nl.running_mean, exp_mean, tol(dtype))
    _assert_matches_reference(nl.running_var, exp_var, tol(dtype))
    _assert_same(nl.running_mean, tm.running_mean, tol(dtype))
    _assert_same(nl.running_var, tm.running_var, tol(dtype))

    # eval: the running statistics normalize every instance
    nl.eval()
    tm.eval()
    rm, rv = _np(nl.running_mean), _np(nl.running_var)
    x = _randn(*shape, dtype=dtype)
    _check_module(
        nl,
        tm,
        x,
        lambda x, w, b: ref.batch_norm_eval(x, rm, rv, w, b),
        lambda dy, x, w, b: ref.batch_norm_eval_backward(dy, x, rm, rv, w, b),
    )
    np.testing.assert_array_equal(_np(nl.running_mean), rm)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("track", [False, True], ids=["untracked", "tracked"])
@pytest.mark.parametrize(
    ("nl_cls", "torch_cls", "shape"),
    [
        (normlab.InstanceNorm1d, nn.InstanceNorm1d, (3, 5)),
        (normlab.InstanceNorm1d, nn.InstanceNorm1d, (1, 7)),
        (normlab.InstanceNorm2d, nn.InstanceNorm2d, (3, 2, 5)),
        (normlab.InstanceNorm3d, nn.InstanceNorm3d, (2, 2, 1, 3)),
    ],
    ids=["1d-3x5", "1d-1x7", "2d-3x2x5", "3d-2x2x1x3"],
)
def test_unbatched_instance_norm_matches_reference_and_torch(
    nl_cls, torch_cls, shape, track, dtype
):
    channels = shape[0]
    nl = _randomize(nl_cls(channels, affine=True, track_running_stats=track, dtype=dtype))
    tm = _torch_twin(nl, torch_cls(channels, affine=True, track_running_stats=track, dtype=dtype))
    x = _randn(*shape, dtype=dtype)
    y, _ = _check_module(
        nl,
        tm,
        x,
        lambda x, w, b: ref.instance_norm(x[None], w, b)[0],
        lambda dy, x, w, b: tuple(
            g if i else g[0]
            for i, g in enumerate(ref.instance_norm_backward(dy[None], x[None], w, b))
        ),
    )
    assert y.shape == x.shape
    if track:
        _assert_same(nl.running_mean, tm.running_mean, tol(dtype))
        _assert_same(nl.running_var, tm.running_var, tol(dtype))


# --- functionals ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("params", PARAMS, ids=PARAMS_IDS)
@pytest.mark.parametrize("features", FEATURES)
def test_functional_layer_norm_matches_reference_and_torch(features, params, dtype):
    x = _randn(4, features, dtype=dtype)
    w, b = _maybe(params[0], (features,), dtype), _maybe(params[1], (features,), dtype)
    _check_functional(
        lambda x, w, b: NF.layer_norm(x, (features,), w, b, 1e-5),
        lambda x, w, b: TF.layer_norm(x, (features,), w, b, 1e-5),
        x,
        w,
        b,
        lambda x, w, b: ref.layer_norm(x, features, w, b, 1e-5),
        lambda dy, x, w, b: ref.layer_norm_backward(dy, x, features, w, b, 1e-5),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [None, 1e-5], ids=["eps=None", "eps=1e-5"])
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("features", FEATURES)
def test_functional_rms_norm_matches_reference_and_torch(features, with_weight, eps, dtype):
    x = _randn(2, 3, features, dtype=dtype)
    w = _maybe(with_weight, (features,), dtype)
    e = _rms_eps(eps, dtype)
    _check_functional(
        lambda x, w, b: NF.rms_norm(x, (features,), w, eps),
        lambda x, w, b: TF.rms_norm(x, (features,), w, e),
        x,
        w,
        None,
        lambda x, w, b: ref.rms_norm(x, features, w, e),
        lambda dy, x, w, b: ref.rms_norm_backward(dy, x, features, w, e),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("params", PARAMS, ids=PARAMS_IDS)
@pytest.mark.parametrize(
    "shape", [(5, 1), (3, 769), (2, 3, 7), (2, 7, 3, 1), (2, 3, 1, 3, 5)], ids=str
)
def test_functional_batch_norm_training_matches_reference_and_torch_and_updates_running_stats(
    shape, params, dtype
):
    c = shape[1]
    x = _randn(*shape, dtype=dtype)
    w, b = _maybe(params[0], (c,), dtype), _maybe(params[1], (c,), dtype)
    mean0, var0 = _randn(c, dtype=dtype), (torch.rand(c) + 0.5).to(dtype)
    tdt = _torch_dtype(dtype)
    stats = {
        "normlab": (mean0.clone(), var0.clone()),
        "torch": (mean0.to(tdt, copy=True), var0.to(tdt, copy=True)),
    }
    _check_functional(
        lambda x, w, b: NF.batch_norm(x, *stats["normlab"], w, b, True, 0.2, 1e-5),
        lambda x, w, b: TF.batch_norm(x, *stats["torch"], w, b, True, 0.2, 1e-5),
        x,
        w,
        b,
        lambda x, w, b: ref.batch_norm_train(x, w, b, 1e-5),
        lambda dy, x, w, b: ref.batch_norm_train_backward(dy, x, w, b, 1e-5),
    )
    exp_mean, exp_var = ref.batch_norm_update_running_stats(_np(x), _np(mean0), _np(var0), 0.2)
    for got, want, expected in zip(
        stats["normlab"], stats["torch"], (exp_mean, exp_var), strict=True
    ):
        _assert_matches_reference(got, expected, tol(dtype))
        _assert_same(got, want.to(dtype), tol(dtype))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_functional_batch_norm_training_without_running_stats_matches_torch(dtype):
    x = _randn(4, 3, 5, dtype=dtype)
    w, b = _randn(3, dtype=dtype), _randn(3, dtype=dtype)
    _check_functional(
        lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True),
        lambda x, w, b: TF.batch_norm(x, None, None, w, b, training=True),
        x,
        w,
        b,
        lambda x, w, b: ref.batch_norm_train(x, w, b),
        lambda dy, x, w, b: ref.batch_norm_train_backward(dy, x, w, b),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("params", PARAMS, ids=PARAMS_IDS)
@pytest.mark.parametrize(
    "shape", [(1, 1), (3, 769), (2, 3, 7), (1, 7, 3, 1), (2, 3, 1, 3, 5)], ids=str
)
def test_functional_batch_norm_eval_matches_reference_and_torch(shape, params, dtype):
    c = shape[1]
    x = _randn(*shape, dtype=dtype)
    w, b = _maybe(params[0], (c,), dtype), _maybe(params[1], (c,), dtype)
    rm, rv = _randn(c, dtype=dtype), (torch.rand(c) + 0.5).to(dtype)
    rm_before, rv_before = rm.clone(), rv.clone()
    _check_functional(
        lambda x, w, b: NF.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3),
        lambda x, w, b: TF.batch_norm(
            x, rm.to(x.dtype, copy=True), rv.to(x.dtype, copy=True), w, b, False, 0.1, 1e-3
        ),
        x,
        w,
        b,
        lambda x, w, b: ref.batch_norm_eval(x, _np(rm), _np(rv), w, b, 1e-3),
        lambda dy, x, w, b: ref.batch_norm_eval_backward(dy, x, _np(rm), _np(rv), w, b, 1e-3),
    )
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("params", PARAMS, ids=PARAMS_IDS)
@pytest.mark.parametrize(
    ("shape", "groups"),
    [((2, 6, 5), 3), ((3, 6), 2), ((1, 7, 1, 3), 1), ((2, 4, 3, 1, 3), 4)],
    ids=str,
)
def test_functional_group_norm_matches_reference_and_torch(shape, groups, params, dtype):
    c = shape[1]
    x = _randn(*shape, dtype=dtype)
    w, b = _maybe(params[0], (c,), dtype), _maybe(params[1], (c,), dtype)
    _check_functional(
        lambda x, w, b: NF.group_norm(x, groups, w, b, 1e-4),
        # torch's CPU group_norm backward fails with bias but no weight ("tensor does not
        # have a device"): give torch an all-ones weight, which is the same function.
        lambda x, w, b: TF.group_norm(
            x, groups, torch.ones(c, dtype=x.dtype) if w is None and b is not None else w, b, 1e-4
        ),
        x,
        w,
        b,
        lambda x, w, b: ref.group_norm(x, groups, w, b, 1e-4),
        lambda dy, x, w, b: ref.group_norm_backward(dy, x, groups, w, b, 1e-4),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("params", PARAMS, ids=PARAMS_IDS)
@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 1, 7), (2, 7, 3, 1), (2, 3, 1, 2, 3)], ids=str)
def test_functional_instance_norm_matches_reference_and_torch(shape, params, dtype):
    c = shape[1]
    x = _randn(*shape, dtype=dtype)
    w, b = _maybe(params[0], (c,), dtype), _maybe(params[1], (c,), dtype)
    _check_functional(
        lambda x, w, b: NF.instance_norm(x, None, None, w, b),
        lambda x, w, b: TF.instance_norm(x, None, None, w, b),
        x,
        w,
        b,
        lambda x, w, b: ref.instance_norm(x, w, b),
        lambda dy, x, w, b: ref.instance_norm_backward(dy, x, w, b),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 1, 2, 3)], ids=str)
def test_functional_instance_norm_running_stats_update_and_use_match_reference_and_torch(
    shape, dtype
):
    c = shape[1]
    x = _randn(*shape, dtype=dtype)
    w, b = _randn(c, dtype=dtype), _randn(c, dtype=dtype)
    mean0, var0 = _randn(c, dtype=dtype), (torch.rand(c) + 0.5).to(dtype)
    tdt = _torch_dtype(dtype)
    nl_stats = (mean0.clone(), var0.clone())
    torch_stats = (mean0.to(tdt, copy=True), var0.to(tdt, copy=True))
    # use_input_stats=True: normalize per instance and update the running stats
    _check_functional(
        lambda x, w, b: NF.instance_norm(x, *nl_stats, w, b, True, 0.3),
        lambda x, w, b: TF.instance_norm(x, *torch_stats, w, b, True, 0.3),
        x,
        w,
        b,
        lambda x, w, b: ref.instance_norm(x, w, b),
        lambda dy, x, w, b: ref.instance_norm_backward(dy, x, w, b),
    )
    expected = ref.instance_norm_update_running_stats(_np(x), _np(mean0), _np(var0), 0.3)
    for got, want, exp in zip(nl_stats, torch_stats, expected, strict=True):
        _assert_matches_reference(got, exp, tol(dtype))
        _assert_same(got, want.to(dtype), tol(dtype))
    # use_input_stats=False: normalize with the running stats
    rm, rv = _np(nl_stats[0]), _np(nl_stats[1])
    _check_functional(
        lambda x, w, b: NF.instance_norm(x, *nl_stats, w, b, False),
        lambda x, w, b: TF.instance_norm(x, *torch_stats, w, b, False),
        x,
        w,
        b,
        lambda x, w, b: ref.batch_norm_eval(x, rm, rv, w, b),
        lambda dy, x, w, b: ref.batch_norm_eval_backward(dy, x, rm, rv, w, b),
    )


# --- non-contiguous and channels_last layouts -----------------------------------------------

# name -> (module factory, input shape of the *contiguous* tensor)
LAYOUT_MODULES = {
    "LayerNorm": (lambda: normlab.LayerNorm(5), (4, 6, 5)),
    "LayerNorm-dim1": (lambda: normlab.LayerNorm(6, dim=1), (4, 6, 5)),
    "RMSNorm": (lambda: normlab.RMSNorm(5), (4, 6, 5)),
    "RMSNorm-dim1": (lambda: normlab.RMSNorm(6, dim=1), (4, 6, 5)),
    "BatchNorm1d": (lambda: normlab.BatchNorm1d(6), (4, 6, 5)),
    "BatchNorm-dim-1": (lambda: normlab.BatchNorm(5, dim=-1), (4, 6, 5)),
    "GroupNorm": (lambda: normlab.GroupNorm(3, 6), (4, 6, 5)),
    "InstanceNorm1d": (lambda: normlab.InstanceNorm1d(6, affine=True), (4, 6, 5)),
}


def _layout_twins(kind, shape):
    """A random non-contiguous float32 tensor of ``shape``, made as ``kind`` says."""
    if kind == "step-slice":
        big = _randn(*shape[:-1], 2 * shape[-1] + 1)
        x = big[..., 1::2]
    elif kind == "step-slice-batch":
        big = _randn(2 * shape[0], *shape[1:])
        x = big[::2]
    elif kind == "transposed":
        x = _randn(shape[0], shape[2], shape[1]).transpose(1, 2)
    else:
        raise AssertionError(kind)
    assert x.shape == shape and not x.is_contiguous()
    return x


@pytest.mark.parametrize("kind", ["step-slice", "step-slice-batch", "transposed"])
@pytest.mark.parametrize("name", list(LAYOUT_MODULES))
def test_non_contiguous_input_gives_the_contiguous_result_forward_and_backward(name, kind):
    factory, shape = LAYOUT_MODULES[name]
    module = _randomize(factory())
    x = _layout_twins(kind, shape)
    dy = _randn(*shape).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous dy too
    twin = copy.deepcopy(module)

    y, grads = _module_fwd_bwd(module, x, dy)
    yc, grads_c = _module_fwd_bwd(twin, x.contiguous(), dy.contiguous())
    _assert_same(y, yc, tol(torch.float32))
    for g, gc in zip(grads, grads_c, strict=True):
        _assert_same(g, gc, grad_tol(torch.float32))
    if getattr(module, "running_mean", None) is not None:
        _assert_same(module.running_mean, twin.running_mean, tol(torch.float32))
        _assert_same(module.running_var, twin.running_var, tol(torch.float32))


CHANNELS_LAST = {
    "BatchNorm2d": (lambda: normlab.BatchNorm2d(3), (2, 3, 4, 5), torch.channels_last),
    "GroupNorm-4d": (lambda: normlab.GroupNorm(3, 6), (2, 6, 3, 5), torch.channels_last),
    "InstanceNorm2d": (
        lambda: normlab.InstanceNorm2d(3, affine=True, track_running_stats=True),
        (2, 3, 4, 5),
        torch.channels_last,
    ),
    "LayerNorm-dim1": (lambda: normlab.LayerNorm(3, dim=1), (2, 3, 4, 5), torch.channels_last),
    "RMSNorm-dim1": (lambda: normlab.RMSNorm(3, dim=1), (2, 3, 4, 5), torch.channels_last),
    "LayerNorm-last": (lambda: normlab.LayerNorm(5), (2, 3, 4, 5), torch.channels_last),
    "LayerNorm-HW": (
        lambda: normlab.LayerNorm((4, 5), dim=(2, 3)),
        (2, 3, 4, 5),
        torch.channels_last,
    ),
    "BatchNorm-dim-1": (lambda: normlab.BatchNorm(5, dim=-1), (2, 3, 4, 5), torch.channels_last),
    "BatchNorm3d": (lambda: normlab.BatchNorm3d(3), (2, 3, 2, 3, 5), torch.channels_last_3d),
    "GroupNorm-5d": (lambda: normlab.GroupNorm(2, 4), (2, 4, 2, 3, 3), torch.channels_last_3d),
    "InstanceNorm3d": (
        lambda: normlab.InstanceNorm3d(3, affine=True),
        (2, 3, 2, 3, 3),
        torch.channels_last_3d,
    ),
    "LayerNorm3d-dim1": (
        lambda: normlab.LayerNorm(3, dim=1),
        (2, 3, 2, 3, 3),
        torch.channels_last_3d,
    ),
}


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("name", list(CHANNELS_LAST))
def test_channels_last_input_gives_the_contiguous_result_forward_and_backward(name, dtype):
    factory, shape, memory_format = CHANNELS_LAST[name]
    module = _randomize(factory().to(dtype))
    twin = copy.deepcopy(module)
    x = _randn(*shape, dtype=dtype)
    dy = _randn(*shape, dtype=dtype)
    x_cl = x.contiguous(memory_format=memory_format)
    assert not x_cl.is_contiguous() and torch.equal(x_cl, x)

    y, grads = _module_fwd_bwd(module, x_cl, dy.contiguous(memory_format=memory_format))
    yc, grads_c = _module_fwd_bwd(twin, x, dy)
    assert y.dtype == dtype
    _assert_same(y, yc, tol(dtype))
    for g, gc in zip(grads, grads_c, strict=True):
        _assert_same(g, gc, grad_tol(dtype))
    if getattr(module, "running_mean", None) is not None:
        _assert_same(module.running_mean, twin.running_mean, tol(dtype))
        _assert_same(module.running_var, twin.running_var, tol(dtype))


@pytest.mark.parametrize(
    ("shape", "memory_format"),
    [((2, 3, 4, 5), torch.channels_last), ((2, 3, 2, 3, 5), torch.channels_last_3d)],
    ids=str,
)
def test_channels_last_batch_norm_matches_torch_on_the_same_channels_last_input(
    shape, memory_format
):
    nl_cls, torch_cls = (
        (normlab.BatchNorm2d, nn.BatchNorm2d)
        if len(shape) == 4
        else (normlab.BatchNorm3d, nn.BatchNorm3d)
    )
    nl = _randomize(nl_cls(shape[1]))
    tm = _torch_twin(nl, torch_cls(shape[1]))
    x = _randn(*shape).contiguous(memory_format=memory_format)
    _check_module(
        nl,
        tm,
        x,
        lambda x, w, b: ref.batch_norm_train(x, w, b),
        lambda dy, x, w, b: ref.batch_norm_train_backward(dy, x, w, b),
    )


# --- the dim generalization -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 7, 3, 1), (2, 1, 3, 3)], ids=str)
@pytest.mark.parametrize("dim", [1, -3])
def test_layer_norm_dim1_on_nchw_equals_torch_layer_norm_on_permuted_nhwc(dim, shape, dtype):
    c = shape[1]
    nl = _randomize(normlab.LayerNorm(c, dim=dim, dtype=dtype))
    tm = _torch_twin(nl, nn.LayerNorm(c, dtype=dtype))
    x, dy = _randn(*shape, dtype=dtype), _randn(*shape, dtype=dtype)
    w, b = _np(nl.weight), _np(nl.bias)

    y, grads = _module_fwd_bwd(nl, x, dy)
    yt, torch_grads = _torch_module_fwd_bwd(tm, x.permute(0, 2, 3, 1), dy.permute(0, 2, 3, 1))
    assert y.dtype == dtype and y.shape == x.shape
    _assert_same(y, yt.permute(0, 3, 1, 2), tol(dtype))
    _assert_same(grads[0], torch_grads[0].permute(0, 3, 1, 2), grad_tol(dtype))
    _assert_same(grads[1], torch_grads[1], grad_tol(dtype))
    _assert_same(grads[2], torch_grads[2], grad_tol(dtype))

    _assert_matches_reference(y, ref.layer_norm(_np(x), c, w, b, dim=dim), tol(dtype))
    for g, gr in zip(
        grads, ref.layer_norm_backward(_np(dy), _np(x), c, w, b, dim=dim), strict=True
    ):
        _assert_matches_reference(g, gr, grad_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 7, 3, 1), (2, 1, 3, 3)], ids=str)
@pytest.mark.parametrize("eps", [None, 1e-5], ids=["eps=None", "eps=1e-5"])
def test_rms_norm_dim1_on_nchw_equals_torch_rms_norm_on_permuted_nhwc(eps, shape, dtype):
    c = shape[1]
    nl = _randomize(normlab.RMSNorm(c, eps=eps, dim=1, dtype=dtype))
    w, e = _np(nl.weight), _rms_eps(eps, dtype)
    tm = _torch_twin(nl, nn.RMSNorm(c, eps=e, dtype=dtype))
    x, dy = _randn(*shape, dtype=dtype), _randn(*shape, dtype=dtype)

    y, grads = _module_fwd_bwd(nl, x, dy)
    yt, torch_grads = _torch_module_fwd_bwd(tm, x.permute(0, 2, 3, 1), dy.permute(0, 2, 3, 1))
    assert y.dtype == dtype and y.shape == x.shape
    _assert_same(y, yt.permute(0, 3, 1, 2), tol(dtype))
    _assert_same(grads[0], torch_grads[0].permute(0, 3, 1, 2), grad_tol(dtype))
    _assert_same(grads[1], torch_grads[1], grad_tol(dtype))
    assert grads[2] is None

    _assert_matches_reference(y, ref.rms_norm(_np(x), c, w, e, dim=1), tol(dtype))
    ref_dx, ref_dw, _ = ref.rms_norm_backward(_np(dy), _np(x), c, w, e, dim=1)
    _assert_matches_reference(grads[0], ref_dx, grad_tol(dtype))
    _assert_matches_reference(grads[1], ref_dw, grad_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [(2, 3), (-2, -1)], ids=str)
def test_layer_norm_over_hw_with_dim_equals_torch_layer_norm_of_trailing_hw(dim, dtype):
    shape = (2, 3, 4, 5)
    nl = _randomize(normlab.LayerNorm((4, 5), dim=dim, dtype=dtype))
    tm = _torch_twin(nl, nn.LayerNorm((4, 5), dtype=dtype))
    x = _randn(*shape, dtype=dtype)
    _check_module(
        nl,
        tm,
        x,
        lambda x, w, b: ref.layer_norm(x, (4, 5), w, b, dim=dim),
        lambda dy, x, w, b: ref.layer_norm_backward(dy, x, (4, 5), w, b, dim=dim),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [(2, 3), (-3, -2)], ids=str)
def test_layer_norm_over_non_trailing_hw_equals_torch_layer_norm_on_permuted_input(dim, dtype):
    # (N, C, H, W, D): normalize (H, W) per (n, c, d)
    shape = (2, 3, 4, 5, 3)
    nl = _randomize(normlab.LayerNorm((4, 5), dim=dim, dtype=dtype))
    tm = _torch_twin(nl, nn.LayerNorm((4, 5), dtype=dtype))
    x, dy = _randn(*shape, dtype=dtype), _randn(*shape, dtype=dtype)
    w, b = _np(nl.weight), _np(nl.bias)
    to_last, back = (0, 1, 4, 2, 3), (0, 1, 3, 4, 2)

    y, grads = _module_fwd_bwd(nl, x, dy)
    yt, torch_grads = _torch_module_fwd_bwd(tm, x.permute(to_last), dy.permute(to_last))
    _assert_same(y, yt.permute(back), tol(dtype))
    _assert_same(grads[0], torch_grads[0].permute(back), grad_tol(dtype))
    _assert_same(grads[1], torch_grads[1], grad_tol(dtype))
    _assert_same(grads[2], torch_grads[2], grad_tol(dtype))
    _assert_matches_reference(y, ref.layer_norm(_np(x), (4, 5), w, b, dim=dim), tol(dtype))
    for g, gr in zip(
        grads, ref.layer_norm_backward(_np(dy), _np(x), (4, 5), w, b, dim=dim), strict=True
    ):
        _assert_matches_reference(g, gr, grad_tol(dtype))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("params", PARAMS, ids=PARAMS_IDS)
def test_functional_layer_norm_and_rms_norm_with_dim1_match_torch_on_permuted_input(params, dtype):
    x, dy = _randn(2, 3, 4, 5, dtype=dtype), _randn(2, 3, 4, 5, dtype=dtype)
    w, b = _maybe(params[0], (3,), dtype), _maybe(params[1], (3,), dtype)
    perm, back = (0, 2, 3, 1), (0, 3, 1, 2)
    y, grads = _fn_fwd_bwd(lambda x, w, b: NF.layer_norm(x, 3, w, b, dim=1), x, w, b, dy)
    yt, torch_grads = _torch_fn_fwd_bwd(
        lambda x, w, b: TF.layer_norm(x.permute(perm), (3,), w, b).permute(back), x, w, b, dy
    )
    _assert_same(y, yt, tol(dtype))
    for g, gt in zip(grads, torch_grads, strict=True):
        _assert_same(g, gt, grad_tol(dtype))

    y, grads = _fn_fwd_bwd(lambda x, w, b: NF.rms_norm(x, 3, w, dim=1), x, w, None, dy)
    yt, torch_grads = _torch_fn_fwd_bwd(
        lambda x, w, b: TF.rms_norm(x.permute(perm), (3,), w).permute(back), x, w, None, dy
    )
    _assert_same(y, yt, tol(dtype))
    for g, gt in zip(grads, torch_grads, strict=True):
        _assert_same(g, gt, grad_tol(dtype))


# --- output dtype ---------------------------------------------------------------------------

DTYPE_MODULES = {
    "LayerNorm": (lambda dt: normlab.LayerNorm(4, dtype=dt), (3, 4)),
    "RMSNorm": (lambda dt: normlab.RMSNorm(4, dtype=dt), (3, 4)),
    "BatchNorm1d": (lambda dt: normlab.BatchNorm1d(4, dtype=dt), (3, 4)),
    "BatchNorm2d": (lambda dt: normlab.BatchNorm2d(4, dtype=dt), (2, 4, 2, 3)),
    "BatchNorm3d": (lambda dt: normlab.BatchNorm3d(4, dtype=dt), (2, 4, 1, 2, 3)),
    "BatchNorm-dim": (lambda dt: normlab.BatchNorm(4, dim=-1, dtype=dt), (2, 3, 4)),
    "GroupNorm": (lambda dt: normlab.GroupNorm(2, 4, dtype=dt), (2, 4, 3)),
    "InstanceNorm1d": (lambda dt: normlab.InstanceNorm1d(4, affine=True, dtype=dt), (2, 4, 3)),
    "InstanceNorm2d": (lambda dt: normlab.InstanceNorm2d(4, dtype=dt), (2, 4, 3, 2)),
    "InstanceNorm3d": (lambda dt: normlab.InstanceNorm3d(4, dtype=dt), (2, 4, 1, 3, 2)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(DTYPE_MODULES))
def test_module_output_and_input_grad_have_the_input_dtype(name, training, dtype):
    factory, shape = DTYPE_MODULES[name]
    module = factory(dtype).train(training)
    x = _randn(*shape, dtype=dtype).requires_grad_(True)
    y = module(x)
    assert y.dtype == dtype
    assert y.shape == x.shape
    y.backward(torch.ones_like(y))
    assert x.grad.dtype == dtype
    for param in module.parameters():
        assert param.grad is not None and param.grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_output_has_the_input_dtype(dtype):
    x = _randn(2, 4, 3, dtype=dtype)
    w, b = _randn(4, dtype=dtype), _randn(4, dtype=dtype)
    rm, rv = torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)
    outputs = {
        "layer_norm": NF.layer_norm(x, 3),
        "layer_norm_dim1": NF.layer_norm(x, 4, w, b, dim=1),
        "rms_norm": NF.rms_norm(x, 3),
        "batch_norm_train": NF.batch_norm(x, rm, rv, w, b, training=True),
        "batch_norm_eval": NF.batch_norm(x, rm, rv, w, b, training=False),
        "group_norm": NF.group_norm(x, 2, w, b),
        "instance_norm": NF.instance_norm(x, None, None, w, b),
    }
    for name, y in outputs.items():
        assert y.dtype == dtype, name
        assert y.shape == x.shape, name


# --- torch.compile ----------------------------------------------------------------------------


def test_layer_norm_and_batch_norm_model_under_torch_compile_equals_eager():
    torch._dynamo.reset()
    eager = nn.Sequential(
        normlab.LayerNorm(8),
        nn.Linear(8, 6),
        normlab.BatchNorm1d(6),
    )
    _randomize(eager[0])
    _randomize(eager[2])
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_model, backend=counter)
    x, dy = _randn(5, 8), _randn(5, 6)

    y, xg = _seq_fwd_bwd(eager, x, dy)
    yc, xgc = _seq_fwd_bwd(compiled, x, dy)
    assert counter.frame_count >= 1  # it really went through dynamo and inductor
    _assert_same(yc, y, tol(torch.float32))
    _assert_same(xgc, xg, grad_tol(torch.float32))
    for p, pc in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        _assert_same(pc.grad, p.grad, grad_tol(torch.float32))
    _assert_same(compiled_model[2].running_mean, eager[2].running_mean, tol(torch.float32))
    _assert_same(compiled_model[2].running_var, eager[2].running_var, tol(torch.float32))
    assert int(compiled_model[2].num_batches_tracked) == int(eager[2].num_batches_tracked) == 1

    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        _assert_same(compiled(x), eager(x), tol(torch.float32))


def _seq_fwd_bwd(model, x, dy):
    leaf = x.detach().clone().requires_grad_(True)
    y = model(leaf)
    y.backward(dy)
    return y.detach(), leaf.grad
