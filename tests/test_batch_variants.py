"""PowerNorm, Batch Renormalization and ghost BatchNorm against the float64 reference
(``normlab.reference``), torch.nn and the properties that define them.

- PowerNorm (Shen et al., ICML 2020, Algorithm 1): warmup steps (batch quadratic mean, exact
  gradient, cumulative-average ``running_phi``), steps after warmup (previous ``running_phi``
  in the forward, the approximate backward updating ``running_grad_stat``), eval, padding.
- BatchRenorm (Ioffe 2017): r and d clipped and constant for the gradient; ``r_max=1,
  d_max=0`` is BatchNorm; the warmup/ramp schedule; BatchNorm checkpoints.
- Ghost BatchNorm (``virtual_batch_size``): statistics per group of consecutive samples in
  training, the running statistics (their average) in eval, whatever the batch.

The reference is always fed the exact values the normlab call saw (``_np``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import normlab
import normlab.functional as NF
from normlab import reference as ref
from normlab.modules import renorm_limits
from tolerances import grad_tol, tol

FLOATS = [torch.float32, torch.float64]
# (layout, channel axis): (batch, length, channels) with dim=-1, (batch, channels, length)
# with dim=1. The mask is (batch, length) in both.
LAYOUTS = [("BLC", -1), ("BCL", 1)]
LAYOUT_IDS = ["BLC-dim-1", "BCL-dim1"]
MASKED = [False, True]
MASKED_IDS = ["dense", "masked"]

B, L, C = 4, 6, 3
LENGTHS = torch.tensor([6, 2, 4, 3])  # every sample has >= 2 real positions
EPS = 1e-5


# --- helpers --------------------------------------------------------------------------------


def _np(t):
    """A float64 NumPy copy of the exact values of ``t``; None stays None."""
    return None if t is None else t.detach().double().numpy().copy()


def _assert_ref(actual, expected, tolerance):
    assert actual is not None, "expected a tensor, got None"
    expected = torch.from_numpy(np.ascontiguousarray(np.asarray(expected, dtype=np.float64)))
    torch.testing.assert_close(actual.detach().double(), expected, **tolerance)


def _shape(layout, batch=B, length=L, channels=C):
    return (batch, length, channels) if layout == "BLC" else (batch, channels, length)


def _randn(shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype)


def _mask(masked, lengths=LENGTHS, length=L):
    return normlab.lengths_to_mask(lengths, length) if masked else None


def _real(t, mask, dim):
    """The real elements of ``t`` as (count, channels): channels last, padding dropped."""
    t = t.detach().movedim(dim, -1)
    return t.reshape(-1, t.shape[-1]) if mask is None else t[mask]


def _randomize_affine(module):
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, dtype=torch.float64) * 0.5 + 1.0)
    return module


def _grad(t):
    return None if t is None else t.grad


def _step(module, x, dy, mask=None):
    """One forward/backward of ``module``: y, dx, dweight, dbias."""
    module.zero_grad(set_to_none=True)
    leaf = x.detach().clone().requires_grad_(True)
    y = module(leaf) if mask is None else module(leaf, mask=mask)
    y.backward(dy)
    return y.detach(), leaf.grad, _grad(module.weight), _grad(getattr(module, "bias", None))


def _fn_step(fn, x, weight, bias, dy):
    """y, dx, dweight, dbias of ``fn(x, weight, bias)`` with fresh leaves."""
    leaves = [
        None if t is None else t.detach().clone().requires_grad_(True) for t in (x, weight, bias)
    ]
    y = fn(*leaves)
    y.backward(dy)
    return (y.detach(), *(None if t is None else t.grad for t in leaves))


def _assert_steps_equal(got, expected, tolerance, grad_tolerance):
    names = ("y", "dx", "dweight", "dbias")
    for name, a, b, t in zip(
        names, got, expected, (tolerance,) + (grad_tolerance,) * 3, strict=True
    ):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, **t, msg=lambda m, name=name: f"{name}: {m}")


# --- PowerNorm against the reference --------------------------------------------------------


def _power_norm(dim, dtype, warmup_iters, alpha_fwd=0.8, alpha_bkw=0.7):
    """A PowerNorm with non-default alphas (so swapping them is caught) and random affine."""
    module = normlab.PowerNorm(
        C,
        eps=EPS,
        alpha_fwd=alpha_fwd,
        alpha_bkw=alpha_bkw,
        warmup_iters=warmup_iters,
        dim=dim,
        dtype=dtype,
    )
    return _randomize_affine(module)


def _set_power_norm_buffers(module, phi, nu):
    with torch.no_grad():
        module.running_phi.copy_(phi)
        module.running_grad_stat.copy_(nu)


def _power_norm_input(layout, dtype, scale=2.0):
    """Uncentred input, so that the quadratic mean is not the variance."""
    return _randn(_shape(layout), dtype, scale=scale, shift=0.7)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_power_norm_warmup_normalizes_by_batch_quadratic_mean_with_exact_gradient_and_averages_phi(
    layout, dim, masked, dtype
):
    """Warmup: y = w x / sqrt(psi_B^2 + eps) + b with the exact (uncentred BatchNorm)
    gradient; running_phi is the cumulative average of the psi_B^2 seen; nu stays 0."""
    module = _power_norm(dim, dtype, warmup_iters=3)
    mask = _mask(masked)
    m = _np(mask)
    w, b = _np(module.weight), _np(module.bias)
    quadratic_means = []
    for step in range(1, 4):
        x = _power_norm_input(layout, dtype, scale=float(step))  # a different psi_B^2 each step
        dy = _randn(x.shape, dtype)
        phi_before = _np(module.running_phi)
        got = _step(module, x, dy, mask)
        y_ref = ref.power_norm_warmup(_np(x), w, b, EPS, dim, m)
        grads_ref = ref.power_norm_warmup_backward(_np(dy), _np(x), w, b, EPS, dim, m)
        _assert_ref(got[0], y_ref, tol(dtype))
        for g, g_ref in zip(got[1:], grads_ref, strict=True):
            _assert_ref(g, g_ref, grad_tol(dtype))
        quadratic_means.append(ref.batch_quadratic_mean(_np(x), dim, m))
        _assert_ref(module.running_phi, np.mean(quadratic_means, axis=0), tol(dtype))
        _assert_ref(
            module.running_phi,
            ref.power_norm_update_running_phi(_np(x), phi_before, 1.0 / step, dim, m),
            tol(dtype),
        )
        assert int(module.num_batches_tracked) == step
        assert torch.equal(module.running_grad_stat, torch.zeros(C, dtype=dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_power_norm_after_warmup_divides_by_previous_running_phi_with_approximate_backward(
    layout, dim, masked, dtype
):
    """After warmup: the forward uses running_phi of the previous step, the backward is the
    paper's approximation and updates running_grad_stat; running_phi moves towards psi_B^2
    by 1 - alpha_fwd."""
    module = _power_norm(dim, dtype, warmup_iters=0)
    _set_power_norm_buffers(module, torch.rand(C) + 0.5, torch.randn(C) * 0.5)
    mask = _mask(masked)
    m = _np(mask)
    w, b = _np(module.weight), _np(module.bias)
    phi0, nu0 = _np(module.running_phi), _np(module.running_grad_stat)
    x = _power_norm_input(layout, dtype)
    dy = _randn(x.shape, dtype)

    y, dx, dweight, dbias = _step(module, x, dy, mask)

    _assert_ref(y, ref.power_norm_forward(_np(x), phi0, w, b, EPS, dim), tol(dtype))
    dx_ref, dw_ref, db_ref, nu_ref = ref.power_norm_backward(
        _np(dy), _np(x), phi0, nu0, w, b, EPS, 0.7, dim, m
    )
    _assert_ref(dx, dx_ref, grad_tol(dtype))
    _assert_ref(dweight, dw_ref, grad_tol(dtype))
    _assert_ref(dbias, db_ref, grad_tol(dtype))
    _assert_ref(module.running_grad_stat, nu_ref, grad_tol(dtype))
    _assert_ref(
        module.running_phi,
        ref.power_norm_update_running_phi(_np(x), phi0, 1 - 0.8, dim, m),
        tol(dtype),
    )
    assert int(module.num_batches_tracked) == 1


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_power_norm_consecutive_steps_across_the_warmup_boundary_follow_algorithm_1(
    layout, dim, masked, dtype
):
    """Five training steps with warmup_iters=2 (two warmup steps, three after), then eval,
    against the reference run as a state machine (phi, nu)."""
    alpha_fwd, alpha_bkw = 0.8, 0.7
    module = _power_norm(dim, dtype, warmup_iters=2, alpha_fwd=alpha_fwd, alpha_bkw=alpha_bkw)
    mask = _mask(masked)
    m = _np(mask)
    w, b = _np(module.weight), _np(module.bias)
    phi, nu = np.ones(C), np.zeros(C)
    for step in range(1, 6):
        x = _power_norm_input(layout, dtype, scale=1.0 + 0.5 * step)
        dy = _randn(x.shape, dtype)
        y, dx, dweight, dbias = _step(module, x, dy, mask)
        if step <= 2:
            y_ref = ref.power_norm_warmup(_np(x), w, b, EPS, dim, m)
            dx_ref, dw_ref, db_ref = ref.power_norm_warmup_backward(
                _np(dy), _np(x), w, b, EPS, dim, m
            )
            phi = ref.power_norm_update_running_phi(_np(x), phi, 1.0 / step, dim, m)
        else:
            y_ref = ref.power_norm_forward(_np(x), phi, w, b, EPS, dim)
            dx_ref, dw_ref, db_ref, nu = ref.power_norm_backward(
                _np(dy), _np(x), phi, nu, w, b, EPS, alpha_bkw, dim, m
            )
            phi = ref.power_norm_update_running_phi(_np(x), phi, 1 - alpha_fwd, dim, m)
        _assert_ref(y, y_ref, tol(dtype))
        _assert_ref(dx, dx_ref, grad_tol(dtype))
        _assert_ref(dweight, dw_ref, grad_tol(dtype))
        _assert_ref(dbias, db_ref, grad_tol(dtype))
        _assert_ref(module.running_phi, phi, tol(dtype))
        _assert_ref(module.running_grad_stat, nu, grad_tol(dtype))
    assert np.abs(nu).min() > 0  # the approximate backward really ran
    module.eval()
    x = _power_norm_input(layout, dtype)
    _assert_ref(
        module(x, mask=mask), ref.power_norm_forward(_np(x), phi, w, b, EPS, dim), tol(dtype)
    )


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_power_norm_eval_divides_by_running_phi_and_leaves_the_buffers_alone(
    layout, dim, masked, dtype
):
    module = _power_norm(dim, dtype, warmup_iters=10).eval()
    _set_power_norm_buffers(module, torch.rand(C) + 0.5, torch.randn(C))
    mask = _mask(masked)
    w, b = _np(module.weight), _np(module.bias)
    phi, nu = _np(module.running_phi), _np(module.running_grad_stat)
    x = _power_norm_input(layout, dtype)
    dy = _randn(x.shape, dtype)
    y, dx, dweight, dbias = _step(module, x, dy, mask)
    _assert_ref(y, ref.power_norm_forward(_np(x), phi, w, b, EPS, dim), tol(dtype))
    # Eval is y = w x / sqrt(phi + eps) + b with phi a constant: dx = w dy / sqrt(phi + eps).
    shape = [1] * x.dim()
    shape[dim] = C
    dx_exact = _np(dy) * w.reshape(shape) / np.sqrt(phi.reshape(shape) + EPS)
    _assert_ref(dx, dx_exact, grad_tol(dtype))
    x_hat = _np(x) / np.sqrt(phi.reshape(shape) + EPS)
    axes = tuple(a for a in range(x.dim()) if a != dim % x.dim())
    _assert_ref(dweight, (_np(dy) * x_hat).sum(axis=axes), grad_tol(dtype))
    _assert_ref(dbias, _np(dy).sum(axis=axes), grad_tol(dtype))
    assert np.array_equal(_np(module.running_phi), phi)
    assert np.array_equal(_np(module.running_grad_stat), nu)
    assert int(module.num_batches_tracked) == 0


@pytest.mark.parametrize("warmup", [True, False], ids=["warmup", "after-warmup"])
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_functional_power_norm_matches_reference_and_lengths_equals_mask(layout, dim, warmup):
    dtype = torch.float64
    mask = _mask(True)
    m = _np(mask)
    x = _power_norm_input(layout, dtype)
    dy = _randn(x.shape, dtype)
    weight, bias = _randn((C,), dtype, 0.5, 1.0), _randn((C,), dtype)
    phi0, nu0 = torch.rand(C, dtype=dtype) + 0.5, torch.randn(C, dtype=dtype)
    results = {}
    for key, kwargs in (("mask", {"mask": mask}), ("lengths", {"lengths": LENGTHS})):
        phi, nu = phi0.clone(), nu0.clone()

        def fn(x, w, b, phi=phi, nu=nu, kwargs=kwargs):
            return NF.power_norm(
                x, phi, nu, w, b, True, 0.3, 0.6, EPS, dim, warmup=warmup, **kwargs
            )

        results[key] = (_fn_step(fn, x, weight, bias, dy), phi, nu)
    (got, phi, nu), (got_lengths, phi_l, nu_l) = results["mask"], results["lengths"]
    for a, b in zip((*got, phi, nu), (*got_lengths, phi_l, nu_l), strict=True):
        assert torch.equal(a, b)
    w, b = _np(weight), _np(bias)
    if warmup:
        y_ref = ref.power_norm_warmup(_np(x), w, b, EPS, dim, m)
        grads_ref = ref.power_norm_warmup_backward(_np(dy), _np(x), w, b, EPS, dim, m)
        nu_ref = _np(nu0)
    else:
        y_ref = ref.power_norm_forward(_np(x), _np(phi0), w, b, EPS, dim)
        *grads_ref, nu_ref = ref.power_norm_backward(
            _np(dy), _np(x), _np(phi0), _np(nu0), w, b, EPS, 0.6, dim, m
        )
    _assert_ref(got[0], y_ref, tol(dtype))
    for g, g_ref in zip(got[1:], grads_ref, strict=True):
        _assert_ref(g, g_ref, grad_tol(dtype))
    _assert_ref(phi, ref.power_norm_update_running_phi(_np(x), _np(phi0), 0.3, dim, m), tol(dtype))
    _assert_ref(nu, nu_ref, grad_tol(dtype))


# --- PowerNorm and padding ------------------------------------------------------------------


def _pad_huge(x, mask, dim, extra, value=1e6):
    """``x`` with ``extra`` more positions, and every padded slot (old and new) set to
    +-``value``; returns the padded input and its mask."""
    seq = 1 if dim == -1 else 2
    shape = list(x.shape)
    shape[seq] += extra
    huge = value * torch.randn(shape, dtype=x.dtype).sign()
    new_mask = torch.zeros(shape[0], shape[seq], dtype=torch.bool)
    new_mask[:, : mask.shape[1]] = mask
    padded = torch.where(new_mask.unsqueeze(-1 if dim == -1 else 1), 0.0, huge)
    real = torch.where(mask.unsqueeze(-1 if dim == -1 else 1), x, 0.0)
    padded.narrow(seq, 0, x.shape[seq]).add_(real)
    return padded, new_mask


def _zero_on_padding(dy, mask, dim):
    return torch.where(mask.unsqueeze(-1 if dim == -1 else 1), dy, 0.0)


def _pad_like(dy, mask, padded_mask, dim):
    """dy of the padded input: the same values at real positions, zero elsewhere."""
    seq = 1 if dim == -1 else 2
    shape = list(dy.shape)
    shape[seq] = padded_mask.shape[1]
    out = torch.zeros(shape, dtype=dy.dtype)
    out.narrow(seq, 0, dy.shape[seq]).copy_(_zero_on_padding(dy, mask, dim))
    return out


def test_power_norm_padding_with_huge_values_changes_nothing_at_real_positions_or_in_buffers():
    """Three training steps (one warmup, two after), both layouts: the same real values with
    ordinary padding, and with 3 more padded positions and +-1e6 in every padded slot, give
    the same outputs and gradients at real positions, dweight, dbias, running_phi and
    running_grad_stat (dy is zero on padding)."""
    dtype = torch.float64
    worst = {"y": 0.0, "dx": 0.0, "dweight": 0.0, "dbias": 0.0, "phi": 0.0, "nu": 0.0}
    for layout, dim in LAYOUTS:
        plain = _power_norm(dim, dtype, warmup_iters=1)
        padded = _power_norm(dim, dtype, warmup_iters=1)
        padded.load_state_dict(plain.state_dict())
        mask = _mask(True)
        for _ in range(3):
            x = _power_norm_input(layout, dtype)
            x_pad, mask_pad = _pad_huge(x, mask, dim, extra=3)
            dy = _zero_on_padding(_randn(x.shape, dtype), mask, dim)
            dy_pad = _pad_like(dy, mask, mask_pad, dim)
            y, dx, dw, db = _step(plain, x, dy, mask)
            y_p, dx_p, dw_p, db_p = _step(padded, x_pad, dy_pad, mask_pad)
            assert _real(x_pad, mask_pad, dim).abs().max() < 1e3  # huge values only on padding
            pairs = {
                "y": (_real(y_p, mask_pad, dim), _real(y, mask, dim)),
                "dx": (_real(dx_p, mask_pad, dim), _real(dx, mask, dim)),
                "dweight": (dw_p, dw),
                "dbias": (db_p, db),
                "phi": (padded.running_phi, plain.running_phi),
                "nu": (padded.running_grad_stat, plain.running_grad_stat),
            }
            for name, (a, b) in pairs.items():
                tolerance = tol(dtype) if name in ("y", "phi") else grad_tol(dtype)
                torch.testing.assert_close(a, b, **tolerance, msg=lambda m, n=name: f"{n}: {m}")
                worst[name] = max(worst[name], float((a - b).abs().max()))
        assert plain.running_grad_stat.abs().min() > 0  # the approximate backward ran
    report = ", ".join(f"{name}={value:.3g}" for name, value in worst.items())
    print(f"\nPowerNorm padding invariance (+-1e6 in padded slots), max |diff|: {report}")


@pytest.mark.parametrize("warmup_iters", [5, 0], ids=["warmup", "after-warmup"])
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_masked_power_norm_equals_power_norm_of_the_real_tokens_alone(layout, dim, warmup_iters):
    """Padding enters neither psi_B^2 nor the gradient statistics: PowerNorm with a mask is
    PowerNorm of the (count, channels) matrix of real tokens (the authors' masked code
    selected the real tokens), in outputs, gradients and both running buffers."""
    dtype = torch.float64
    masked = _power_norm(dim, dtype, warmup_iters=warmup_iters)
    _set_power_norm_buffers(masked, torch.rand(C) + 0.5, torch.randn(C))
    tokens_only = _power_norm(-1, dtype, warmup_iters=warmup_iters)
    tokens_only.load_state_dict(masked.state_dict())
    mask = _mask(True)
    x = _power_norm_input(layout, dtype)
    dy = _zero_on_padding(_randn(x.shape, dtype), mask, dim)
    y, dx, dw, db = _step(masked, x, dy, mask)
    y_t, dx_t, dw_t, db_t = _step(tokens_only, _real(x, mask, dim), _real(dy, mask, dim))
    torch.testing.assert_close(_real(y, mask, dim), y_t, **tol(dtype))
    torch.testing.assert_close(_real(dx, mask, dim), dx_t, **grad_tol(dtype))
    torch.testing.assert_close(dw, dw_t, **grad_tol(dtype))
    torch.testing.assert_close(db, db_t, **grad_tol(dtype))
    torch.testing.assert_close(masked.running_phi, tokens_only.running_phi, **tol(dtype))
    torch.testing.assert_close(
        masked.running_grad_stat, tokens_only.running_grad_stat, **grad_tol(dtype)
    )


@pytest.mark.parametrize("warmup_iters", [5, 0], ids=["warmup", "after-warmup"])
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_power_norm_sends_no_gradient_to_padding_where_dy_is_zero(layout, dim, warmup_iters):
    """A padded element enters no statistic and (dy = 0 there) no loss, so its gradient is
    0, in warmup and after it (the approximate term -nu * xhat stands for the gradient
    through psi_B^2, which padding does not enter)."""
    dtype = torch.float64
    module = _power_norm(dim, dtype, warmup_iters=warmup_iters)
    _set_power_norm_buffers(module, torch.rand(C) + 0.5, torch.randn(C) + 2.0)  # nu != 0
    mask = _mask(True)
    x = _power_norm_input(layout, dtype)
    dy = _zero_on_padding(_randn(x.shape, dtype), mask, dim)
    _, dx, _, _ = _step(module, x, dy, mask)
    padding = ~mask.unsqueeze(-1 if dim == -1 else 1).expand_as(x)
    assert padding.any()
    assert dx[padding].abs().max() == 0, (
        f"gradient at padded positions, max |dx| = {dx[padding].abs().max():.3g}"
    )


@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_power_norm_eval_with_a_mask_equals_eval_without_a_mask(layout, dim):
    """Eval uses running_phi only: no batch statistic, so the mask (and the padded values)
    change nothing."""
    module = _power_norm(dim, torch.float32, warmup_iters=1)
    for _ in range(3):  # train past warmup so that running_phi is not the initial 1
        module(_power_norm_input(layout, torch.float32), mask=_mask(True)).sum().backward()
    module.eval()
    x = _power_norm_input(layout, torch.float32)
    y = module(x)
    assert torch.equal(module(x, mask=_mask(True)), y)
    assert torch.equal(module(x, lengths=LENGTHS), y)
    x_pad, mask_pad = _pad_huge(x, _mask(True), dim, extra=0)
    y_pad = module(x_pad, mask=mask_pad)
    assert torch.equal(_real(y_pad, mask_pad, dim), _real(y, _mask(True), dim))


# --- PowerNorm gradients --------------------------------------------------------------------


def _double_leaf(shape, scale=1.0, shift=0.0):
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).requires_grad_(True)


@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_power_norm_warmup_gradient_matches_finite_differences(layout, dim, masked):
    x = _double_leaf(_shape(layout, batch=3, length=4), shift=0.5)
    weight, bias = _double_leaf((C,), 0.5, 1.0), _double_leaf((C,))
    mask = _mask(masked, torch.tensor([4, 2, 3]), 4)

    def fn(x, w, b):
        phi, nu = torch.ones(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
        return NF.power_norm(x, phi, nu, w, b, True, 0.1, 0.9, EPS, dim, warmup=True, mask=mask)

    assert gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_power_norm_warmup_module_gradient_matches_finite_differences(layout, dim, masked):
    module = _power_norm(dim, torch.float64, warmup_iters=10**9)
    x = _double_leaf(_shape(layout, batch=3, length=4), shift=0.5)
    mask = _mask(masked, torch.tensor([4, 2, 3]), 4)
    assert gradcheck(lambda x: module(x, mask=mask), (x,))
    assert module.weight.grad is None  # gradcheck differentiated x only


@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_power_norm_eval_gradient_matches_finite_differences(layout, dim, masked):
    x = _double_leaf(_shape(layout, batch=3, length=4), shift=0.5)
    weight, bias = _double_leaf((C,), 0.5, 1.0), _double_leaf((C,))
    phi = torch.rand(C, dtype=torch.float64) + 0.5
    nu = torch.randn(C, dtype=torch.float64)
    mask = _mask(masked, torch.tensor([4, 2, 3]), 4)

    def fn(x, w, b):
        return NF.power_norm(x, phi, nu, w, b, False, 0.1, 0.9, EPS, dim, mask=mask)

    assert gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
def test_power_norm_after_warmup_backward_is_exact_iff_running_grad_stat_is_zero(masked):
    """After warmup the forward is y = w x / sqrt(phi + eps) + b with phi a constant, whose
    exact dx is w dy / sqrt(phi + eps). The approximate backward subtracts nu * xhat /
    sqrt(phi + eps): equal to the exact gradient when nu = 0, different (by design) when not."""
    dim, dtype = -1, torch.float64
    mask = _mask(masked)
    x = _power_norm_input("BLC", dtype)
    dy = _randn(x.shape, dtype)
    for nu in (torch.zeros(C, dtype=dtype), torch.tensor([0.5, -1.0, 2.0], dtype=dtype)):
        module = _power_norm(dim, dtype, warmup_iters=0)
        _set_power_norm_buffers(module, torch.rand(C) + 0.5, nu)
        phi = module.running_phi.clone()
        y, dx, dweight, dbias = _step(module, x, dy, mask)

        leaves = [t.detach().clone().requires_grad_(True) for t in (x, module.weight, module.bias)]
        y_exact = leaves[0] * leaves[1] / torch.sqrt(phi + EPS) + leaves[2]
        y_exact.backward(dy)
        torch.testing.assert_close(y, y_exact.detach(), **tol(dtype))
        dx_exact, dw_exact, db_exact = (t.grad for t in leaves)
        torch.testing.assert_close(dweight, dw_exact, **grad_tol(dtype))
        torch.testing.assert_close(dbias, db_exact, **grad_tol(dtype))
        if not nu.any():
            torch.testing.assert_close(dx, dx_exact, **grad_tol(dtype))
        else:
            assert (dx - dx_exact).abs().max() > 0.1
            xhat = x / torch.sqrt(phi + EPS)
            # The correction is the gradient through the batch statistic: real elements only.
            real = 1.0 if mask is None else mask.unsqueeze(-1).to(dtype)
            torch.testing.assert_close(
                dx - dx_exact, -real * nu * xhat / torch.sqrt(phi + EPS), **grad_tol(dtype)
            )


# --- BatchRenorm ----------------------------------------------------------------------------


def _renorm_buffers(module, mean, var):
    with torch.no_grad():
        module.running_mean.copy_(torch.as_tensor(mean))
        module.running_var.copy_(torch.as_tensor(var))


# Batch statistics ~ (mean 0, var 1) per channel against these running statistics:
# channel 0: r = sigma_B / 0.1 clips at r_max, d = -10 / 0.1 clips at -d_max;
# channel 1: r ~ 1 / 10 clips at 1 / r_max, d = 10 / 10 = 1 is inside;
# channel 2: r ~ 0.8 and d ~ -0.4 are inside.
FAR_MEAN = [10.0, -10.0, 0.5]
FAR_VAR = [0.01, 100.0, 1.5]


def test_batch_renorm_limits_follow_the_warmup_then_linear_ramp_schedule():
    limits = [renorm_limits(step, 3.0, 5.0, 2, 4) for step in (1, 2, 3, 4, 5, 6, 7, 1000)]
    assert limits == [
        (1.0, 0.0),
        (1.0, 0.0),
        (1.5, 1.25),
        (2.0, 2.5),
        (2.5, 3.75),
        (3.0, 5.0),
        (3.0, 5.0),
        (3.0, 5.0),
    ]
    assert renorm_limits(1, 3.0, 5.0, 0, 0) == (3.0, 5.0)  # no warmup, no ramp: at once
    assert renorm_limits(3, 3.0, 5.0, 2, 0) == (3.0, 5.0)  # no ramp: right after warmup
    assert renorm_limits(2, 3.0, 5.0, 2, 0) == (1.0, 0.0)


def test_renorm_limits_is_exported_at_the_top_level():
    assert normlab.renorm_limits is renorm_limits


def test_batch_renorm_current_limits_count_the_next_training_step():
    module = normlab.BatchRenorm1d(C, warmup_steps=1, ramp_steps=2)
    assert module.current_limits() == (1.0, 0.0)  # step 1 is warmup
    module(torch.randn(5, C))
    assert module.current_limits() == (2.0, 2.5)  # step 2: halfway up the ramp
    module.eval()
    assert module.current_limits() == renorm_limits(1, 3.0, 5.0, 1, 2)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_batch_renorm_with_r_max_1_and_d_max_0_equals_batch_norm_over_several_steps(
    momentum, dtype
):
    renorm = _randomize_affine(
        normlab.BatchRenorm2d(C, momentum=momentum, r_max=1.0, d_max=0.0, dtype=dtype)
    )
    ours = normlab.BatchNorm2d(C, momentum=momentum, dtype=dtype)
    theirs = nn.BatchNorm2d(C, momentum=momentum, dtype=dtype)
    ours.load_state_dict(renorm.state_dict())
    theirs.load_state_dict(renorm.state_dict())
    for step in range(3):
        x = _randn((5, C, 2, 3), dtype, scale=3.0, shift=2.0 - step)  # far from (0, 1)
        dy = _randn(x.shape, dtype)
        got = _step(renorm, x, dy)
        _assert_steps_equal(got, _step(ours, x, dy), tol(dtype), grad_tol(dtype))
        _assert_steps_equal(got, _step(theirs, x, dy), tol(dtype), grad_tol(dtype))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(renorm, name), getattr(theirs, name), **tol(dtype))
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), **tol(dtype))
    for module in (renorm, theirs):
        module.eval()
    x = _randn((2, C, 2, 3), dtype)
    torch.testing.assert_close(renorm(x), theirs(x), **tol(dtype))


@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_masked_batch_renorm_with_r_max_1_and_d_max_0_equals_masked_batch_norm(layout, dim):
    dtype = torch.float64
    renorm = _randomize_affine(normlab.BatchRenorm(C, dim=dim, r_max=1.0, d_max=0.0, dtype=dtype))
    bn = normlab.BatchNorm(C, dim=dim, dtype=dtype)
    bn.load_state_dict(renorm.state_dict())
    mask = _mask(True)
    for _ in range(2):
        x = _randn(_shape(layout), dtype, scale=3.0, shift=2.0)
        dy = _randn(x.shape, dtype)
        _assert_steps_equal(
            _step(renorm, x, dy, mask), _step(bn, x, dy, mask), tol(dtype), grad_tol(dtype)
        )
        torch.testing.assert_close(renorm.running_mean, bn.running_mean, **tol(dtype))
        torch.testing.assert_close(renorm.running_var, bn.running_var, **tol(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_batch_renorm_with_active_clipping_matches_reference(layout, dim, masked, dtype):
    """Running statistics far from the batch's, so r and d clip (both ways) in some
    channels and not in others; module forward, backward and running statistics."""
    module = _randomize_affine(normlab.BatchRenorm(C, dim=dim, momentum=0.2, dtype=dtype))
    _renorm_buffers(module, FAR_MEAN, FAR_VAR)
    mask = _mask(masked)
    m = _np(mask)
    w, b = _np(module.weight), _np(module.bias)
    mean0, var0 = _np(module.running_mean), _np(module.running_var)
    x = _randn(_shape(layout), dtype)
    dy = _randn(x.shape, dtype)

    r, d = ref.renorm_correction(_np(x), mean0, var0, EPS, 3.0, 5.0, dim, m)
    r, d = r.ravel(), d.ravel()
    assert r[0] == 3.0 and d[0] == -5.0 and r[1] == 1 / 3  # clipped
    assert 1 / 3 < r[2] < 3 and abs(d[1]) < 5 and abs(d[2]) < 5  # not clipped

    y, dx, dweight, dbias = _step(module, x, dy, mask)
    args = (mean0, var0, w, b, EPS, 3.0, 5.0, dim, m)
    _assert_ref(y, ref.batch_renorm_train(_np(x), *args), tol(dtype))
    for g, g_ref in zip(
        (dx, dweight, dbias), ref.batch_renorm_train_backward(_np(dy), _np(x), *args), strict=True
    ):
        _assert_ref(g, g_ref, grad_tol(dtype))
    mean_ref, var_ref = ref.batch_norm_update_running_stats(_np(x), mean0, var0, 0.2, dim, m)
    _assert_ref(module.running_mean, mean_ref, tol(dtype))
    _assert_ref(module.running_var, var_ref, tol(dtype))


@pytest.mark.parametrize("params", [(True, True), (False, True), (False, False)], ids=str)
@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_functional_batch_renorm_with_active_clipping_matches_reference(
    layout, dim, masked, params
):
    dtype = torch.float64
    mask = _mask(masked)
    m = _np(mask)
    x = _randn(_shape(layout), dtype)
    dy = _randn(x.shape, dtype)
    weight = _randn((C,), dtype, 0.5, 1.0) if params[0] else None
    bias = _randn((C,), dtype) if params[1] else None
    mean, var = torch.tensor(FAR_MEAN, dtype=dtype), torch.tensor(FAR_VAR, dtype=dtype)
    mean0, var0 = _np(mean), _np(var)

    def fn(x, w, b):
        return NF.batch_renorm(x, mean, var, w, b, True, 0.3, EPS, 2.0, 4.0, dim, mask=mask)

    y, dx, dweight, dbias = _fn_step(fn, x, weight, bias, dy)
    args = (mean0, var0, _np(weight), _np(bias), EPS, 2.0, 4.0, dim, m)
    _assert_ref(y, ref.batch_renorm_train(_np(x), *args), tol(dtype))
    dx_ref, dw_ref, db_ref = ref.batch_renorm_train_backward(_np(dy), _np(x), *args)
    _assert_ref(dx, dx_ref, grad_tol(dtype))
    assert (dweight is None) == (dw_ref is None) and (dbias is None) == (db_ref is None)
    if dweight is not None:
        _assert_ref(dweight, dw_ref, grad_tol(dtype))
    if dbias is not None:
        _assert_ref(dbias, db_ref, grad_tol(dtype))
    mean_ref, var_ref = ref.batch_norm_update_running_stats(_np(x), mean0, var0, 0.3, dim, m)
    _assert_ref(mean, mean_ref, tol(dtype))
    _assert_ref(var, var_ref, tol(dtype))


@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
def test_batch_renorm_treats_r_and_d_as_constants_in_the_backward(masked):
    """Unclipped, y = w ((x - mu_B) / sigma_B * r + d) + b equals the eval output
    w (x - mu) / sigma + b, whose full derivative is w dy / sigma. With r and d constant,
    dx is instead BatchNorm's dx with weight * r, which differs."""
    dim, dtype = -1, torch.float64
    module = _randomize_affine(normlab.BatchRenorm(C, dim=dim, r_max=1e6, d_max=1e6, dtype=dtype))
    _renorm_buffers(module, [0.3, -0.2, 0.5], [0.7, 1.3, 2.0])
    mask = _mask(masked)
    m = _np(mask)
    w, b = _np(module.weight), _np(module.bias)
    mean0, var0 = _np(module.running_mean), _np(module.running_var)
    x = _randn(_shape("BLC"), dtype)
    dy = _randn(x.shape, dtype)
    r, _ = ref.renorm_correction(_np(x), mean0, var0, EPS, 1e6, 1e6, dim, m)
    assert np.abs(r - 1).min() > 0.05  # r is not 1: weight * r is not weight

    y, dx, _, _ = _step(module, x, dy, mask)
    sigma = np.sqrt(var0 + EPS)
    y_eval = w * (_np(x) - mean0) / sigma + b
    _assert_ref(y, y_eval, tol(dtype))  # the training output is the inference one
    dx_bn_with_weight_r, _, _ = ref.batch_norm_train_backward(
        _np(dy), _np(x), w * r.ravel(), b, EPS, dim, m
    )
    _assert_ref(dx, dx_bn_with_weight_r, grad_tol(dtype))
    full_derivative = torch.from_numpy(_np(dy) * w / sigma)
    assert (dx - full_derivative).abs().max() > 0.1  # not differentiated through r and d


def test_batch_renorm_with_warmup_steps_behaves_as_batch_norm_for_its_first_steps():
    """warmup_steps=2: the first two training steps are BatchNorm even though the running
    statistics are far from the batch's; the third applies r_max, d_max."""
    dtype = torch.float64
    renorm = _randomize_affine(normlab.BatchRenorm1d(C, warmup_steps=2, dtype=dtype))
    bn = normlab.BatchNorm1d(C, dtype=dtype)
    bn.load_state_dict(renorm.state_dict())
    for _step_index in range(2):
        x = _randn((8, C), dtype, scale=4.0, shift=3.0)  # r and d would clip
        dy = _randn(x.shape, dtype)
        _assert_steps_equal(_step(renorm, x, dy), _step(bn, x, dy), tol(dtype), grad_tol(dtype))
        torch.testing.assert_close(renorm.running_mean, bn.running_mean, **tol(dtype))
        torch.testing.assert_close(renorm.running_var, bn.running_var, **tol(dtype))
    x = _randn((8, C), dtype, scale=4.0, shift=3.0)
    mean0, var0 = _np(renorm.running_mean), _np(renorm.running_var)
    y = renorm(x)
    args = (mean0, var0, _np(renorm.weight), _np(renorm.bias), EPS, 3.0, 5.0, 1, None)
    _assert_ref(y, ref.batch_renorm_train(_np(x), *args), tol(dtype))
    assert (y - bn(x)).abs().max() > 1e-3


def test_batch_renorm_ramp_uses_the_scheduled_limits():
    dtype = torch.float64
    renorm = normlab.BatchRenorm1d(C, warmup_steps=1, ramp_steps=4, dtype=dtype)
    _renorm_buffers(renorm, FAR_MEAN, FAR_VAR)
    renorm(_randn((8, C), dtype))  # step 1: warmup
    for step in (2, 3):
        r_max, d_max = renorm_limits(step, 3.0, 5.0, 1, 4)
        assert r_max < 3.0 and d_max < 5.0
        x = _randn((8, C), dtype)
        mean0, var0 = _np(renorm.running_mean), _np(renorm.running_var)
        y = renorm(x)
        args = (mean0, var0, None, None, EPS, r_max, d_max, 1, None)
        _assert_ref(y, ref.batch_renorm_train(_np(x), *args), tol(dtype))
        full = ref.batch_renorm_train(_np(x), mean0, var0, None, None, EPS, 3.0, 5.0, 1, None)
        assert np.abs(_np(y) - full).max() > 1e-3  # the ramp's limits, not the final ones


@pytest.mark.parametrize("dtype", FLOATS)
def test_batch_renorm_eval_equals_batch_norm_eval_with_the_same_buffers(dtype):
    renorm = _randomize_affine(normlab.BatchRenorm2d(C, dtype=dtype))
    for _ in range(2):
        renorm(_randn((4, C, 2, 2), dtype, 2.0, 1.0))
    renorm.eval()
    ours, theirs = normlab.BatchNorm2d(C, dtype=dtype), nn.BatchNorm2d(C, dtype=dtype)
    for module in (ours, theirs):
        module.load_state_dict(renorm.state_dict())
        module.eval()
    x = _randn((3, C, 2, 2), dtype, 2.0)
    dy = _randn(x.shape, dtype)
    got = _step(renorm, x, dy)
    _assert_steps_equal(got, _step(ours, x, dy), tol(dtype), grad_tol(dtype))
    _assert_steps_equal(got, _step(theirs, x, dy), tol(dtype), grad_tol(dtype))
    _assert_ref(
        got[0],
        ref.batch_norm_eval(
            _np(x),
            _np(renorm.running_mean),
            _np(renorm.running_var),
            _np(renorm.weight),
            _np(renorm.bias),
            EPS,
            1,
        ),
        tol(dtype),
    )


def test_torch_batch_norm2d_checkpoint_loads_into_batch_renorm2d_strictly():
    source = nn.BatchNorm2d(C)
    with torch.no_grad():
        source.weight.copy_(torch.randn(C))
        source.bias.copy_(torch.randn(C))
    source(torch.randn(4, C, 3, 3) * 2 + 1)  # non-trivial running statistics
    target = normlab.BatchRenorm2d(C)
    result = target.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    source.eval()
    target.eval()
    x = torch.randn(2, C, 3, 3)
    torch.testing.assert_close(target(x), source(x), **tol(torch.float32))
    # and back: a BatchRenorm2d checkpoint is a BatchNorm2d one
    nn.BatchNorm2d(C).load_state_dict(target.state_dict(), strict=True)


@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_batch_renorm_gradient_matches_finite_differences_when_r_and_d_clip(layout, dim, masked):
    """With r and d clipped they are locally constant in x, so the constant-(r, d) backward
    is the true derivative and finite differences can check it."""
    x = _double_leaf(_shape(layout, batch=3, length=4))
    weight, bias = _double_leaf((C,), 0.5, 1.0), _double_leaf((C,))
    mask = _mask(masked, torch.tensor([4, 2, 3]), 4)
    mean = torch.tensor([10.0, -10.0, 1000.0], dtype=torch.float64)
    var = torch.tensor([0.01, 0.02, 1e4], dtype=torch.float64)  # r clips high, high, low

    def fn(x, w, b):
        return NF.batch_renorm(
            x, mean.clone(), var.clone(), w, b, True, 0.1, EPS, 3.0, 5.0, dim, mask=mask
        )

    r, d = ref.renorm_correction(_np(x), _np(mean), _np(var), EPS, 3.0, 5.0, dim, _np(mask))
    assert np.allclose(r.ravel(), [3.0, 3.0, 1 / 3]) and np.array_equal(
        np.abs(d), np.full(d.shape, 5.0)
    )
    assert gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize(("r_max", "d_max"), [(0.5, 5.0), (0.999, 0.0), (3.0, -0.1)])
def test_batch_renorm_rejects_r_max_below_1_and_negative_d_max(r_max, d_max):
    with pytest.raises(ValueError, match="r_max"):
        normlab.BatchRenorm(C, r_max=r_max, d_max=d_max)
    with pytest.raises(ValueError, match="r_max"):
        normlab.BatchRenorm2d(C, r_max=r_max, d_max=d_max)
    with pytest.raises(ValueError, match="r_max"):
        NF.batch_renorm(
            torch.randn(4, C),
            torch.zeros(C),
            torch.ones(C),
            None,
            None,
            True,
            r_max=r_max,
            d_max=d_max,
        )


# --- ghost BatchNorm ------------------------------------------------------------------------


def _ghost_input(layout, dtype, batch, v):
    """Every virtual batch gets its own offset, so per-group statistics differ clearly from
    the whole batch's."""
    x = _randn(_shape(layout, batch=batch), torch.float64)
    offsets = torch.arange(batch // v, dtype=torch.float64).repeat_interleave(v) * 1.5
    return (x * (1 + offsets.reshape(-1, 1, 1) / 3) + offsets.reshape(-1, 1, 1)).to(dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_ghost_batch_norm_with_virtual_batch_equal_to_batch_is_batch_norm(dtype):
    ghost = _randomize_affine(normlab.BatchNorm2d(C, virtual_batch_size=6, dtype=dtype))
    ours, theirs = normlab.BatchNorm2d(C, dtype=dtype), nn.BatchNorm2d(C, dtype=dtype)
    for module in (ours, theirs):
        module.load_state_dict(ghost.state_dict())
    for step in range(3):
        x = _randn((6, C, 2, 3), dtype, 2.0, float(step))
        dy = _randn(x.shape, dtype)
        got = _step(ghost, x, dy)
        _assert_steps_equal(got, _step(ours, x, dy), tol(dtype), grad_tol(dtype))
        _assert_steps_equal(got, _step(theirs, x, dy), tol(dtype), grad_tol(dtype))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ghost, name), getattr(theirs, name), **tol(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("v", [2, 3])
def test_ghost_batch_norm_module_matches_reference_per_virtual_batch(v, layout, dim, masked, dtype):
    batch = 6
    module = _randomize_affine(
        normlab.BatchNorm(C, dim=dim, momentum=0.3, virtual_batch_size=v, dtype=dtype)
    )
    mask = _mask(masked, torch.tensor([6, 2, 4, 3, 5, 2]))
    m = _np(mask)
    w, b = _np(module.weight), _np(module.bias)
    mean0, var0 = _np(module.running_mean), _np(module.running_var)
    x = _ghost_input(layout, dtype, batch, v)
    dy = _randn(x.shape, dtype)
    y, dx, dweight, dbias = _step(module, x, dy, mask)
    _assert_ref(
        y, ref.batch_norm_train(_np(x), w, b, EPS, dim, m, virtual_batch_size=v), tol(dtype)
    )
    grads_ref = ref.batch_norm_train_backward(
        _np(dy), _np(x), w, b, EPS, dim, m, virtual_batch_size=v
    )
    for g, g_ref in zip((dx, dweight, dbias), grads_ref, strict=True):
        _assert_ref(g, g_ref, grad_tol(dtype))
    mean_ref, var_ref = ref.batch_norm_update_running_stats(
        _np(x), mean0, var0, 0.3, dim, m, virtual_batch_size=v
    )
    _assert_ref(module.running_mean, mean_ref, tol(dtype))
    _assert_ref(module.running_var, var_ref, tol(dtype))
    # not the whole batch's statistics
    _, whole_var = ref.batch_norm_update_running_stats(_np(x), mean0, var0, 0.3, dim, m)
    assert np.abs(_np(module.running_var) - whole_var).max() > 1e-2
    assert np.abs(_np(y) - ref.batch_norm_train(_np(x), w, b, EPS, dim, m)).max() > 1e-2


@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_ghost_batch_norm_accepts_a_mask_broadcast_over_the_batch(layout, dim):
    """A (1, L) mask (the same real positions in every sample) broadcasts over the batch, as
    for BatchNorm without virtual batches; it equals the expanded (B, L) mask."""
    dtype, v = torch.float64, 2
    mask = _mask(True, torch.tensor([4]))  # (1, L)
    x = _ghost_input(layout, dtype, 6, v)
    dy = _randn(x.shape, dtype)
    results = []
    for m in (mask, mask.expand(6, L)):
        module = normlab.BatchNorm(C, dim=dim, momentum=0.3, virtual_batch_size=v, dtype=dtype)
        results.append((_step(module, x, dy, m), module.running_mean, module.running_var))
    (got, mean, var), (expected, mean_e, var_e) = results
    _assert_steps_equal(got, expected, tol(dtype), grad_tol(dtype))
    torch.testing.assert_close(mean, mean_e, **tol(dtype))
    torch.testing.assert_close(var, var_e, **tol(dtype))
    y_ref = ref.batch_norm_train(_np(x), None, None, EPS, dim, _np(mask), virtual_batch_size=v)
    _assert_ref(got[0], y_ref, tol(dtype))


@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_functional_ghost_batch_norm_matches_reference(layout, dim, masked):
    dtype, v = torch.float64, 2
    mask = _mask(masked, torch.tensor([6, 2, 4, 3, 5, 2]))
    m = _np(mask)
    x = _ghost_input(layout, dtype, 6, v)
    dy = _randn(x.shape, dtype)
    weight, bias = _randn((C,), dtype, 0.5, 1.0), _randn((C,), dtype)
    mean, var = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5
    mean0, var0 = _np(mean), _np(var)

    def fn(x, w, b):
        return NF.batch_norm(
            x, mean, var, w, b, True, 0.2, EPS, dim, mask=mask, virtual_batch_size=v
        )

    y, *grads = _fn_step(fn, x, weight, bias, dy)
    w, b = _np(weight), _np(bias)
    _assert_ref(
        y, ref.batch_norm_train(_np(x), w, b, EPS, dim, m, virtual_batch_size=v), tol(dtype)
    )
    grads_ref = ref.batch_norm_train_backward(
        _np(dy), _np(x), w, b, EPS, dim, m, virtual_batch_size=v
    )
    for g, g_ref in zip(grads, grads_ref, strict=True):
        _assert_ref(g, g_ref, grad_tol(dtype))
    mean_ref, var_ref = ref.batch_norm_update_running_stats(
        _np(x), mean0, var0, 0.2, dim, m, virtual_batch_size=v
    )
    _assert_ref(mean, mean_ref, tol(dtype))
    _assert_ref(var, var_ref, tol(dtype))


@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_ghost_batch_norm_normalizes_each_virtual_batch_independently(layout, dim):
    """Changing the samples of one virtual batch changes nothing in another: neither its
    outputs nor, with dy only on another virtual batch, its gradient."""
    dtype, v = torch.float64, 2
    module = _randomize_affine(normlab.BatchNorm(C, dim=dim, virtual_batch_size=v, dtype=dtype))
    x = _ghost_input(layout, dtype, 6, v)
    y = module(x)
    changed = x.clone()
    changed[2:4] = _randn(changed[2:4].shape, dtype, 5.0, -3.0)  # virtual batch 1 only
    y_changed = module(changed)
    assert torch.equal(y_changed[:2], y[:2])
    assert torch.equal(y_changed[4:], y[4:])
    assert (y_changed[2:4] - y[2:4]).abs().max() > 1e-3
    leaf = x.clone().requires_grad_(True)
    dy = torch.zeros_like(x)
    dy[2:4] = _randn(dy[2:4].shape, dtype)
    module(leaf).backward(dy)
    assert leaf.grad[:2].abs().max() == 0 and leaf.grad[4:].abs().max() == 0
    assert leaf.grad[2:4].abs().max() > 0


@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_ghost_batch_norm_eval_uses_running_stats_whatever_the_batch(layout, dim, masked):
    """After ghost training, inference normalizes with the running statistics: a sample's
    output is the same alone, in any batch, in a batch not divisible by the virtual batch
    size, and with or without a mask (Keras issue #15790's bug class)."""
    dtype, v = torch.float64, 2
    module = _randomize_affine(normlab.BatchNorm(C, dim=dim, virtual_batch_size=v, dtype=dtype))
    for step in range(3):
        module(
            _ghost_input(layout, dtype, 6, v) + step,
            mask=_mask(masked, torch.tensor([6, 2, 4, 3, 5, 2])),
        )
    module.eval()
    batch = _randn(_shape(layout, batch=5), dtype, 3.0, 1.0)
    y_batch = module(batch)
    expected = ref.batch_norm_eval(
        _np(batch),
        _np(module.running_mean),
        _np(module.running_var),
        _np(module.weight),
        _np(module.bias),
        EPS,
        dim,
    )
    _assert_ref(y_batch, expected, tol(dtype))
    for i in range(5):
        alone = module(batch[i : i + 1])
        torch.testing.assert_close(alone, y_batch[i : i + 1], **tol(dtype))
    shuffled = module(batch.flip(0))
    torch.testing.assert_close(shuffled.flip(0), y_batch, **tol(dtype))
    lengths = torch.tensor([6, 1, 3, 2, 4])
    torch.testing.assert_close(module(batch, lengths=lengths), y_batch, **tol(dtype))


def test_ghost_batch_norm_rejects_a_batch_not_divisible_by_the_virtual_batch_size():
    module = normlab.BatchNorm1d(C, virtual_batch_size=4)
    with pytest.raises(ValueError, match="divisible by virtual_batch_size"):
        module(torch.randn(6, C, 5))
    with pytest.raises(ValueError, match="divisible by virtual_batch_size"):
        NF.batch_norm(
            torch.randn(5, C), torch.zeros(C), torch.ones(C), training=True, virtual_batch_size=2
        )
    assert int(module.num_batches_tracked) <= 1
    assert torch.equal(module.running_mean, torch.zeros(C))  # nothing was learned
    module(torch.randn(8, C, 5))  # divisible: fine


@pytest.mark.parametrize("masked", MASKED, ids=MASKED_IDS)
@pytest.mark.parametrize(("layout", "dim"), LAYOUTS, ids=LAYOUT_IDS)
def test_ghost_batch_norm_gradient_matches_finite_differences(layout, dim, masked):
    x = _double_leaf(_shape(layout, batch=4, length=4), 1.0, 0.5)
    weight, bias = _double_leaf((C,), 0.5, 1.0), _double_leaf((C,))
    mask = _mask(masked, torch.tensor([4, 2, 3, 4]), 4)

    def fn(x, w, b):
        return NF.batch_norm(
            x, None, None, w, b, True, 0.1, EPS, dim, mask=mask, virtual_batch_size=2
        )

    assert gradcheck(fn, (x, weight, bias))
