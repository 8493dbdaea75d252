"""A bounded fuzz of the public API (rules and campaign script in tests/fuzz_api.py), and
regression tests for what fuzzing found."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given

import normlab.reference as ref
import strategies as S
from fuzz_api import fuzz_calls, run_call
from normlab import functional as F
from tolerances import grad_tol, tol

# "auto" runs the Numba kernels (conftest: on inputs of any size), "composite" the rest.
FUZZ_BACKENDS = ["auto", "composite"]


@pytest.mark.parametrize("backend", FUZZ_BACKENDS, indirect=True)
@S.budget(300)
@given(case=fuzz_calls(), seed=S.seeds)
def test_functional_api_refuses_with_documented_errors_or_matches_the_reference(
    backend, case, seed
):
    fn, args = case
    run_call(fn, args, seed)


# ----------------------------------------------------------------------------------------------
# Found by fuzzing


@pytest.mark.parametrize("backend", FUZZ_BACKENDS, indirect=True)
def test_layer_norm_over_all_axes_but_one_of_size_one_runs(backend):
    # LayerNorm over axes (0, 1) of size 1 keeps one axis (2) of size 2: a BatchNorm-like
    # layout whose "per-channel" weight has one entry. The Numba channels kernel took it and
    # failed reshaping the weight (RuntimeError); such parameters now go to the composite.
    x = torch.tensor([[[0.75, 0.25]]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[1.5]], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([[0.25]], dtype=torch.float64, requires_grad=True)
    y = F.layer_norm(x, (1, 1), weight, bias, dim=(0, 1))
    torch.testing.assert_close(y, torch.full_like(y, 0.25), **tol(torch.float64))
    y.backward(torch.ones_like(y))
    dx, dw, db = ref.layer_norm_backward(
        np.ones((1, 1, 2)),
        x.detach().numpy(),
        (1, 1),
        weight.detach().numpy(),
        bias.detach().numpy(),
        dim=(0, 1),
    )
    torch.testing.assert_close(x.grad, torch.from_numpy(dx), **grad_tol(torch.float64))
    torch.testing.assert_close(weight.grad, torch.from_numpy(dw), **grad_tol(torch.float64))
    torch.testing.assert_close(bias.grad, torch.from_numpy(db), **grad_tol(torch.float64))


def test_reference_batch_norm_with_channels_first_and_a_mask_uses_the_whole_mask():
    # dim=0: the mask is (L,) and its axis 0 is not the batch axis. The reference sliced it
    # as if it were ([True] instead of [True, False, True]) and normalized with the
    # statistics of the wrong elements.
    x = np.array([[0.75, 0.25, 1.75]])
    mask = np.array([True, False, True])
    y = ref.batch_norm_train(x, dim=0, mask=mask, eps=0.0)
    real = x[0, mask]
    expected = (x - real.mean()) / real.std()
    np.testing.assert_allclose(y, expected, rtol=1e-12)


def test_reference_batch_norm_of_an_empty_batch_is_empty():
    # The virtual-batch split used the batch size 0 as its step (range() raised).
    assert ref.batch_norm_train(np.zeros((0, 3))).shape == (0, 3)


SCALAR_CALLS = {
    "layer_norm-eps": lambda v: F.layer_norm(torch.randn(2, 4), 4, eps=v),
    "rms_norm-eps": lambda v: F.rms_norm(torch.randn(2, 4), 4, eps=v),
    "group_norm-eps": lambda v: F.group_norm(torch.randn(2, 4, 3), 2, eps=v),
    "instance_norm-momentum": lambda v: F.instance_norm(torch.randn(2, 4, 3), momentum=v),
    "batch_norm-momentum": lambda v: F.batch_norm(torch.randn(4, 3), None, None, momentum=v),
    "batch_renorm-r_max": lambda v: F.batch_renorm(
        torch.randn(4, 3), torch.zeros(3), torch.ones(3), r_max=v
    ),
    "power_norm-alpha_bkw": lambda v: F.power_norm(
        torch.randn(4, 3), torch.ones(3), torch.zeros(3), alpha_bkw=v
    ),
}


@pytest.mark.parametrize("bad", ["0.1", 1 + 1j, torch.tensor([0.1, 0.2])], ids=repr)
@pytest.mark.parametrize("call", list(SCALAR_CALLS))
def test_float_argument_that_is_not_a_real_number_is_a_type_error_naming_it(call, bad):
    # Found by fuzzing: eps="0.1" was accepted (float("0.1")), a complex eps or a tensor
    # momentum failed inside the ops with Python's or torch's message.
    fn, argument = call.split("-")
    with pytest.raises(TypeError, match=rf"^{fn}: {argument} must be a real number, got"):
        SCALAR_CALLS[call](bad)


def test_float_argument_may_be_a_one_element_tensor_as_in_torch():
    x = torch.randn(2, 4)
    torch.testing.assert_close(
        F.layer_norm(x, 4, eps=torch.tensor(0.5)), F.layer_norm(x, 4, eps=0.5)
    )


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_running_statistics_and_parameters_are_a_type_error(dtype):
    # Found by fuzzing: an int64 running_phi reached torch's lerp_ (NotImplementedError).
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"power_norm: running_phi must be a floating-point"):
        F.power_norm(x, torch.ones(3, dtype=dtype), torch.zeros(3), training=True, warmup=True)
    with pytest.raises(TypeError, match=r"layer_norm: weight must be a floating-point"):
        F.layer_norm(x, 3, torch.ones(3, dtype=dtype))


@pytest.mark.parametrize("backend", FUZZ_BACKENDS, indirect=True)
def test_ghost_batch_norm_of_an_empty_batch_is_empty(backend):
    # Found by fuzzing: 0 samples make 0 virtual batches; reshaping their statistics to
    # (0, -1) raised a RuntimeError from torch, and then their average (of none) made the
    # running statistics NaN. An empty batch leaves them as they are, as without ghosts.
    x = torch.zeros(0, 3, 4, requires_grad=True)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    y = F.batch_norm(x, running_mean, running_var, training=True, virtual_batch_size=2)
    assert y.shape == (0, 3, 4)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))


def test_reference_keeps_nan_in_padding_out_of_real_elements():
    # Found by fuzzing: the reference multiplied padding by 0 (NaN * 0 = NaN) where the
    # backends select it away, so a NaN in the padding made the reference's real outputs and
    # gradients NaN. The backends' policy (NaN in padding stays out) is the specification.
    x = np.array([[np.nan, 0.5, 1.5, -1.0]])  # (C=1, L=4), channels first
    mask = np.array([False, True, True, True])
    dy = np.array([[0.0, 1.0, -2.0, 0.5]])
    real = x[0, 1:]
    y = ref.batch_norm_train(x, dim=0, mask=mask, eps=0.0)
    np.testing.assert_allclose(y[0, 1:], (real - real.mean()) / real.std(), rtol=1e-12)
    dx, dweight, _ = ref.batch_norm_train_backward(dy, x, np.ones(1), None, dim=0, mask=mask)
    assert np.isfinite(dx[0, 1:]).all() and np.isfinite(dweight).all()
    dx, _, _, nu = ref.power_norm_backward(dy, x, np.ones(1), np.zeros(1), dim=0, mask=mask)
    assert np.isfinite(dx[0, 1:]).all() and np.isfinite(nu).all()
