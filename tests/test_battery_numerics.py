"""Edge-case battery, numerics (issue #8 items 1, 2, 7, 9), over every norm and backend.

1. A large mean with a small spread (1e4 + 1e-3 noise in float32, 1e6 in float64) is
   normalized exactly to the float64 reference, and the running variance is exact: no
   E[x^2] - E[x]^2 cancellation, no mean rounded to the input's precision.
2. float16/bfloat16 input accumulates in float32: values ~300, whose squares overflow
   float16, give the reference's outputs and finite gradients.
7. eps sits inside the square root: eps = 0, tiny and large give the reference; rows of
   zero variance give finite outputs and gradients (also second order) for any eps > 0.
9. NaN and Inf in the input reach exactly the outputs that share a statistic with them (as
   the reference's IEEE arithmetic gives), and no other output, gradient or running entry.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from battery_cases import CASES, applicable, over_backends, over_cases, over_cheap_backends
from normlab import backends
from tolerances import conditioned_tol, grad_tol, tol

HALF = [torch.float16, torch.bfloat16]


def _np(t):
    return t.detach().double().numpy().copy()


def _close(actual, expected, tolerance, what, equal_nan=False):
    expected = torch.from_numpy(np.ascontiguousarray(expected, dtype=np.float64))
    torch.testing.assert_close(
        actual.detach().double(),
        expected,
        **tolerance,
        equal_nan=equal_nan,
        msg=lambda m: f"{what}: {m}",
    )


def _forward_backward(case, module, x, dy):
    """y and dx of ``module`` on a leaf copy of x; the reference's y and dx (from the state
    before the forward) and the buffers the reference expects after it."""
    x_np, dy_np = _np(x), _np(dy)
    with np.errstate(all="ignore"):
        want_y = case.forward_ref(module, x_np)
        want_dx = case.backward_ref(module, x_np, dy_np)
        want_running = {} if case.running_ref is None else case.running_ref(module, x_np)
    leaf = x.detach().clone().requires_grad_(True)
    y = module(leaf)
    y.backward(dy)
    return y, leaf.grad, want_y, want_dx, want_running


# --- 1. large mean, small variance -------------------------------------------------------


@over_cheap_backends
@over_cases
@pytest.mark.parametrize(
    "dtype, offset", [(torch.float32, 1e4), (torch.float64, 1e6)], ids=["f32-1e4", "f64-1e6"]
)
def test_large_mean_small_variance_is_exact_to_the_reference(case, dtype, offset, backend):
    spread = 1e-3
    module = case.make(dtype)
    x = (offset + spread * torch.randn(case.shape, dtype=torch.float64)).to(dtype)
    dy = torch.randn(case.shape, dtype=dtype)
    with applicable(backend):
        y, dx, want_y, want_dx, want_running = _forward_backward(case, module, x, dy)
    tolerance = conditioned_tol(dtype, offset / spread)
    _close(y, want_y, tolerance, "y")
    # dx scales as 1 / std: compare it in units of the input's spread.
    _close(dx * spread, want_dx * spread, tolerance, "dx")
    for name, want in want_running.items():
        # the running variance is about spread^2 (or offset^2 for PowerNorm's phi): relative
        _close(getattr(module, name), want, {"atol": 0, "rtol": tolerance["atol"] + 2e-6}, name)


# --- 2. float16 / bfloat16 ---------------------------------------------------------------


@over_backends
@over_cases
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_input_with_squares_beyond_float16_matches_the_reference(case, dtype, backend):
    module = case.make(dtype)
    x = (300 + 30 * torch.randn(case.shape, dtype=torch.float64)).to(dtype)
    assert torch.isinf(x.square()).any() or dtype == torch.bfloat16
    dy = torch.randn(case.shape, dtype=dtype)
    y, dx, want_y, want_dx, _ = _forward_backward(case, module, x, dy)
    assert y.dtype == dtype and dx.dtype == dtype
    # Outputs are about 1 (or 300 for the norms that do not centre): relative to that.
    scale = float(np.abs(want_y).max())
    _close(y / scale, want_y / scale, tol(dtype), "y")
    grad_scale = float(np.abs(want_dx).max())
    _close(dx / grad_scale, want_dx / grad_scale, grad_tol(dtype), "dx")
    for name, p in module.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    for name, b in module.named_buffers():
        if name == "running_phi" and dtype == torch.float16:
            continue  # a mean of squares (9e4) held in float16: docs/edge-cases.md
        assert torch.isfinite(b).all(), name


@over_backends
@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "BatchNorm-dim-1", "GroupNorm"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_sums_beyond_float16_range_accumulate_in_float32(name, dtype, backend):
    """4096 values of about 300 per statistic: their sum (1.2e6) and the sum of their
    squares overflow float16 and are far beyond bfloat16's 8 bits; the output is the
    reference's."""
    case = CASES[name]
    wide = {"LayerNorm": (2, 1, 4096), "RMSNorm": (2, 1, 4096), "GroupNorm": (2, 4, 2048)}
    shape = wide.get(name, (1024, 4, 4))
    from normlab import LayerNorm, RMSNorm

    module = case.make(dtype)
    if name in ("LayerNorm", "RMSNorm"):  # widen the normalized shape
        module = {"LayerNorm": LayerNorm, "RMSNorm": RMSNorm}[name](4096, dtype=dtype)
    x = (300 + 30 * torch.randn(shape, dtype=torch.float64)).to(dtype)
    with np.errstate(all="ignore"):
        want = case.forward_ref(module, _np(x))
    y = module(x)
    scale = float(np.abs(want).max())
    _close(y / scale, want / scale, tol(dtype), "y")


# --- 7. eps ------------------------------------------------------------------------------

EPS = {"zero": 0.0, "tiny": 1e-30, "default": 1e-5, "large": 1e3}


@over_backends
@over_cases
@pytest.mark.parametrize("eps", list(EPS.values()), ids=list(EPS))
def test_eps_zero_tiny_and_large_is_inside_the_square_root(case, eps, backend):
    """Against the reference y = (x - mean) / sqrt(var + eps): eps = 1e3 tells it apart
    from (x - mean) / (std + eps) and from sqrt(var) + sqrt(eps)."""
    module = case.make(torch.float64)
    module.eps = eps
    x = torch.randn(case.shape, dtype=torch.float64)
    dy = torch.randn(case.shape, dtype=torch.float64)
    batch_statistics = case.name.startswith(("BatchNorm", "BatchRenorm")) and module.training
    if eps == 0 and batch_statistics:  # as torch: a constant channel would give 0 / 0
        with pytest.raises(ValueError, match="eps must be positive during training"):
            module(x)
        return
    y, dx, want_y, want_dx, want_running = _forward_backward(case, module, x, dy)
    _close(y, want_y, tol(torch.float64), "y")
    _close(dx, want_dx, grad_tol(torch.float64), "dx")
    for name, want in want_running.items():
        _close(getattr(module, name), want, tol(torch.float64), name)


def _zero_variance_input(case, value, dtype):
    """Every statistic of the case sees one repeated value (0 for the norms without
    centring, whose "variance" is the mean square)."""
    uncentred = case.name.startswith(("RMSNorm", "PowerNorm"))
    return torch.full(case.shape, 0.0 if uncentred else value, dtype=dtype)


@over_backends
@over_cases
@pytest.mark.parametrize("eps", [1e-30, 1e-5], ids=["tiny", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_zero_variance_rows_give_finite_outputs_and_gradients(case, eps, dtype, backend):
    module = case.make(dtype)
    module.eps = eps
    for value in (3.0, 0.1):  # 0.1 is not exact in binary: the mean may round off it
        x = _zero_variance_input(case, value, dtype)
        dy = torch.randn(case.shape, dtype=dtype)
        y, dx, want_y, want_dx, _ = _forward_backward(case, module, x, dy)
        assert torch.isfinite(y).all() and torch.isfinite(dx).all()
        if value == 3.0 and eps == 1e-5:  # exact data: the reference's numbers
            _close(y, want_y, tol(dtype), "y")
            _close(dx * eps**0.5, want_dx * eps**0.5, grad_tol(dtype), "dx * sqrt(eps)")
        for name, p in module.named_parameters():
            assert torch.isfinite(p.grad).all(), name
            p.grad = None


@over_backends
@over_cases
def test_zero_variance_rows_have_finite_second_derivatives(case, backend):
    """A gradient penalty through a zero-variance row: the eps inside the square root keeps
    d/dvar rsqrt(var + eps) finite (sqrt(var) + eps would give NaN at var = 0)."""
    if case.name == "PowerNorm-after-warmup":
        pytest.skip("first-order only: its double backward raises (test_battery_state)")
    module = case.make(torch.float64)
    x = _zero_variance_input(case, 3.0, torch.float64).requires_grad_(True)
    y = module(x)
    inputs = [x, *module.parameters()]
    grads = torch.autograd.grad((y * torch.randn_like(y)).sum(), inputs, create_graph=True)
    penalty = sum(g.square().sum() for g in grads if g.requires_grad)
    second = torch.autograd.grad(penalty, inputs, allow_unused=True)
    for g in (*grads, *second):
        assert g is None or torch.isfinite(g).all()


@over_backends
@over_cases
def test_eps_zero_on_zero_variance_gives_nan_as_the_reference(case, backend):
    """eps = 0 and a zero variance is 0 / 0: NaN, as the reference and torch.nn, never a
    made-up finite number. (BatchNorm in training refuses eps = 0, as torch does.)"""
    module = case.make(torch.float64)
    module.eps = 0.0
    x = _zero_variance_input(case, 3.0, torch.float64)
    if case.name.startswith(("BatchNorm", "BatchRenorm")) and module.training:
        with pytest.raises(ValueError, match="eps must be positive during training"):
            module(x)
        return
    with np.errstate(all="ignore"):
        want = case.forward_ref(module, _np(x))
    y = module(x)
    _close(y, want, tol(torch.float64), "y", equal_nan=True)


# --- 9. NaN and Inf ----------------------------------------------------------------------

NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


@over_cheap_backends
@over_cases
@pytest.mark.parametrize("value", list(NON_FINITE.values()), ids=list(NON_FINITE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nan_and_inf_reach_exactly_the_outputs_that_share_their_statistic(
    case, value, dtype, backend
):
    module = case.make(dtype)
    x = torch.randn(case.shape, dtype=dtype)
    index = (1, *(min(2, n - 1) for n in case.shape[1:]))
    x[index] = value
    dy = torch.randn(case.shape, dtype=dtype)
    with warnings.catch_warnings(), applicable(backend):
        warnings.simplefilter("ignore", RuntimeWarning)
        y, dx, want_y, want_dx, want_running = _forward_backward(case, module, x, dy)
    # The reference's IEEE arithmetic says which outputs are NaN or infinite...
    _close(y, want_y, tol(dtype), "y", equal_nan=True)
    _close(dx, want_dx, grad_tol(dtype), "dx", equal_nan=True)
    # ... and none of them is outside the statistic the bad value entered.
    unaffected = torch.from_numpy(~case.affected(case.shape, index))
    assert torch.isfinite(y[unaffected]).all()
    assert torch.isfinite(dx[unaffected]).all()
    if case.running_ref is not None:
        channel = index[case.channel]
        for name, want in want_running.items():
            # The affected entry is NaN or infinite (an infinite mean may come out as NaN:
            # inf - inf in a centring step); every other entry is the reference's.
            buffer = getattr(module, name)
            others = torch.arange(buffer.numel()) != channel
            _close(buffer[others], want[others.numpy()], tol(dtype), name)
            assert not torch.isfinite(buffer[channel]), f"{name}: a NaN became a number"


@over_backends
@pytest.mark.parametrize("name", ["LayerNorm", "BatchNorm1d-train", "GroupNorm"])
def test_nan_in_one_row_leaves_the_other_rows_bit_identical(name, backend):
    """The finite outputs next to a NaN are the numbers computed without it."""
    case = CASES[name]
    module = case.make()
    x = torch.randn(case.shape)
    clean = module(x).detach()
    x[(1,) * len(case.shape)] = float("nan")
    y = module(x).detach()
    unaffected = torch.from_numpy(~case.affected(case.shape, (1,) * len(case.shape)))
    assert torch.equal(y[unaffected], clean[unaffected])


def test_the_battery_runs_the_numba_kernels_on_auto():
    """Guard of the battery itself: on "auto" each case that a Numba kernel takes runs it."""
    other = {"PowerNorm-warmup": "composite"}  # no kernel layout
    for case in CASES.values():
        with backends.use("auto"):
            case.make()(torch.randn(case.shape))
        expected = other.get(case.name, "numba")
        assert backends.last_used() == expected, case.name
