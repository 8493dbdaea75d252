"""Finite-difference checks of normlab's gradients in float64.

``gradcheck`` exercises the hand-derived backward (``kernels.composite.normalize_backward``,
run with grad mode off); ``gradgradcheck`` exercises the double-backward path that
differentiates the composite forward again (``create_graph=True``).
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import normlab.functional as NF
from tolerances import grad_tol

WEIGHT_BIAS = [(True, True), (True, False), (False, True), (False, False)]
WEIGHT_BIAS_IDS = ["weight+bias", "weight-only", "bias-only", "none"]


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _params(channels, with_weight, with_bias):
    weight = _leaf(channels) if with_weight else None
    bias = _leaf(channels) if with_bias else None
    return weight, bias


def _inputs(x, weight, bias):
    """The differentiable arguments gradcheck perturbs (absent parameters are left out)."""
    return tuple(t for t in (x, weight, bias) if t is not None)


def _call_with(fn, x, weight, bias):
    """A function of the present tensors only, so gradcheck sees exactly those inputs."""
    present = (weight is not None, bias is not None)

    def wrapped(*tensors):
        it = iter(tensors)
        xx = next(it)
        ww = next(it) if present[0] else None
        bb = next(it) if present[1] else None
        return fn(xx, ww, bb)

    return wrapped, _inputs(x, weight, bias)


# --- gradcheck: first derivatives -----------------------------------------------------------


@pytest.mark.parametrize(("with_weight", "with_bias"), WEIGHT_BIAS, ids=WEIGHT_BIAS_IDS)
def test_layer_norm_gradient_matches_finite_differences(with_weight, with_bias):
    x = _leaf(3, 5)
    weight, bias = _params(5, with_weight, with_bias)
    fn, inputs = _call_with(lambda x, w, b: NF.layer_norm(x, 5, w, b), x, weight, bias)
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize(("with_weight", "with_bias"), WEIGHT_BIAS, ids=WEIGHT_BIAS_IDS)
def test_layer_norm_over_two_trailing_axes_gradient_matches_finite_differences(
    with_weight, with_bias
):
    x = _leaf(2, 3, 4)
    weight = _leaf(3, 4) if with_weight else None
    bias = _leaf(3, 4) if with_bias else None
    fn, inputs = _call_with(lambda x, w, b: NF.layer_norm(x, (3, 4), w, b), x, weight, bias)
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize(("with_weight", "with_bias"), WEIGHT_BIAS, ids=WEIGHT_BIAS_IDS)
def test_layer_norm_dim1_gradient_matches_finite_differences(with_weight, with_bias):
    x = _leaf(2, 3, 2, 3)
    weight, bias = _params(3, with_weight, with_bias)
    fn, inputs = _call_with(lambda x, w, b: NF.layer_norm(x, 3, w, b, dim=1), x, weight, bias)
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize("eps", [None, 1e-5], ids=["eps=None", "eps=1e-5"])
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
def test_rms_norm_gradient_matches_finite_differences(with_weight, eps):
    x = _leaf(3, 5)
    weight = _leaf(5) if with_weight else None
    fn, inputs = _call_with(lambda x, w, b: NF.rms_norm(x, 5, w, eps), x, weight, None)
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
def test_rms_norm_dim1_gradient_matches_finite_differences(with_weight):
    x = _leaf(2, 3, 2, 2)
    weight = _leaf(3) if with_weight else None
    fn, inputs = _call_with(lambda x, w, b: NF.rms_norm(x, 3, w, 1e-6, dim=1), x, weight, None)
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize("track", [True, False], ids=["running-stats", "no-running-stats"])
@pytest.mark.parametrize(("with_weight", "with_bias"), WEIGHT_BIAS, ids=WEIGHT_BIAS_IDS)
def test_batch_norm_training_gradient_matches_finite_differences(with_weight, with_bias, track):
    x = _leaf(4, 3, 2)
    weight, bias = _params(3, with_weight, with_bias)
    # the in-place running-stat update on every call must not disturb the gradient
    running = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    stats = running if track else (None, None)
    fn, inputs = _call_with(
        lambda x, w, b: NF.batch_norm(x, *stats, w, b, training=True), x, weight, bias
    )
    assert gradcheck(fn, inputs)
    if track:
        assert not torch.equal(running[0], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize(("with_weight", "with_bias"), WEIGHT_BIAS, ids=WEIGHT_BIAS_IDS)
def test_batch_norm_dim_last_training_gradient_matches_finite_differences(with_weight, with_bias):
    x = _leaf(2, 3, 4)
    weight, bias = _params(4, with_weight, with_bias)
    fn, inputs = _call_with(
        lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True, dim=-1), x, weight, bias
    )
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize(("with_weight", "with_bias"), WEIGHT_BIAS, ids=WEIGHT_BIAS_IDS)
def test_batch_norm_eval_gradient_wrt_input_weight_bias_matches_finite_differences(
    with_weight, with_bias
):
    x = _leaf(3, 4, 2)
    weight, bias = _params(4, with_weight, with_bias)
    running_mean = torch.randn(4, dtype=torch.float64)
    running_var = torch.rand(4, dtype=torch.float64) + 0.5
    fn, inputs = _call_with(
        lambda x, w, b: NF.batch_norm(x, running_mean, running_var, w, b, training=False),
        x,
        weight,
        bias,
    )
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize(
    ("shape", "groups"), [((2, 6, 3), 3), ((2, 4, 2, 2), 1), ((3, 4), 2)], ids=str
)
@pytest.mark.parametrize(("with_weight", "with_bias"), WEIGHT_BIAS, ids=WEIGHT_BIAS_IDS)
def test_group_norm_gradient_matches_finite_differences(with_weight, with_bias, shape, groups):
    x = _leaf(*shape)
    weight, bias = _params(shape[1], with_weight, with_bias)
    fn, inputs = _call_with(lambda x, w, b: NF.group_norm(x, groups, w, b), x, weight, bias)
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize(("with_weight", "with_bias"), WEIGHT_BIAS, ids=WEIGHT_BIAS_IDS)
def test_instance_norm_gradient_matches_finite_differences(with_weight, with_bias):
    x = _leaf(2, 3, 4)
    weight, bias = _params(3, with_weight, with_bias)
    fn, inputs = _call_with(lambda x, w, b: NF.instance_norm(x, None, None, w, b), x, weight, bias)
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize(("with_weight", "with_bias"), WEIGHT_BIAS, ids=WEIGHT_BIAS_IDS)
def test_instance_norm_with_running_stats_gradient_matches_finite_differences(
    with_weight, with_bias
):
    x = _leaf(2, 3, 2, 2)
    weight, bias = _params(3, with_weight, with_bias)
    running_mean = torch.randn(3, dtype=torch.float64)
    running_var = torch.rand(3, dtype=torch.float64) + 0.5
    for use_input_stats in (True, False):
        fn, inputs = _call_with(
            lambda x, w, b, u=use_input_stats: NF.instance_norm(
                x, running_mean, running_var, w, b, use_input_stats=u
            ),
            x,
            weight,
            bias,
        )
        assert gradcheck(fn, inputs)


# --- gradgradcheck: second derivatives (the create_graph path) ------------------------------

WEIGHTED = [(True, True), (True, False)]
WEIGHTED_IDS = ["weight+bias", "weight-only"]


@pytest.mark.parametrize(("with_weight", "with_bias"), WEIGHTED, ids=WEIGHTED_IDS)
def test_layer_norm_second_derivative_matches_finite_differences(with_weight, with_bias):
    x = _leaf(3, 4)
    weight, bias = _params(4, with_weight, with_bias)
    fn, inputs = _call_with(lambda x, w, b: NF.layer_norm(x, 4, w, b), x, weight, bias)
    assert gradgradcheck(fn, inputs)


def test_layer_norm_dim1_second_derivative_matches_finite_differences():
    x = _leaf(2, 3, 2)
    weight, bias = _params(3, True, True)
    fn, inputs = _call_with(lambda x, w, b: NF.layer_norm(x, 3, w, b, dim=1), x, weight, bias)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize(("with_weight", "with_bias"), WEIGHTED, ids=WEIGHTED_IDS)
def test_batch_norm_training_second_derivative_matches_finite_differences(with_weight, with_bias):
    x = _leaf(4, 3, 2)
    weight, bias = _params(3, with_weight, with_bias)
    running = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    fn, inputs = _call_with(
        lambda x, w, b: NF.batch_norm(x, *running, w, b, training=True), x, weight, bias
    )
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize(("with_weight", "with_bias"), WEIGHTED, ids=WEIGHTED_IDS)
def test_group_norm_second_derivative_matches_finite_differences(with_weight, with_bias):
    x = _leaf(2, 4, 3)
    weight, bias = _params(4, with_weight, with_bias)
    fn, inputs = _call_with(lambda x, w, b: NF.group_norm(x, 2, w, b), x, weight, bias)
    assert gradgradcheck(fn, inputs)


def test_double_backward_gradient_penalty_equals_the_one_through_plain_torch_ops():
    """create_graph=True through normlab gives the same gradient penalty gradient as the same
    layer_norm written in plain differentiable torch operations."""
    x = _leaf(3, 5)
    weight, bias = _params(5, True, True)

    def plain(x, w, b):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).square().mean(-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + 1e-5) * w + b

    grads = []
    for fn in (lambda x, w, b: NF.layer_norm(x, 5, w, b), plain):
        y = fn(x, weight, bias)
        (gx,) = torch.autograd.grad((y * y.detach().cos()).sum(), x, create_graph=True)
        penalty = gx.square().sum()
        grads.append(torch.autograd.grad(penalty, (x, weight)))  # gx does not depend on b
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, **grad_tol(torch.float64))
