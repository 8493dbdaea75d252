"""The Numba row kernels on float16 and bfloat16 (LayerNorm, RMSNorm, the fused residual add):
the bit conversions of ``normlab.kernels.cpu.half`` exhaustively, then the launchers against
the float64 reference on the same half-precision values (forward, statistics, dx, dweight,
dbias), rounding, NaN/Inf, constant and far-from-zero rows, and the routing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

import kernel_data
from normlab import backends
from normlab import functional as F
from normlab.axes import feature_norm_axes
from normlab.kernels.cpu import half, launchers
from normlab.kernels.cpu.half import load, store
from normlab.ops import kernel_ops
from normlab.reference import normalize, normalize_backward, statistics
from tolerances import grad_tol, tol

HALVES = [torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 3), (37, 4), (37, 769), (3, 4097)]
EPS = 1e-5


def _name(dtype):
    return str(dtype).removeprefix("torch.")


def _bits(t):
    return t.view(torch.int16).numpy().view(launchers.HALF_BITS[t.dtype])


def _from_bits(bits, dtype):
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(dtype)


def _f64(t):
    return None if t is None else t.double().numpy()


# --- the conversions ------------------------------------------------------------------------


@numba.njit
def _widen(a, out):
    for j in range(a.shape[0]):
        out[j] = load(a, j)


@numba.njit
def _narrow(v, out):
    for j in range(v.shape[0]):
        store(out, j, v[j])


@numba.njit
def _widen_portable(a, out):
    for j in range(a.shape[0]):
        out[j] = half._float_from_half_bits_portable(a[j])


@numba.njit
def _narrow_portable(v, out):
    for j in range(v.shape[0]):
        out[j] = half._half_bits_from_float_portable(v[j])


# (dtype, widen, narrow): the conversions the kernels use on this machine, and the integer
# float16 ones of targets without F16C (``half.native_float16``).
CONVERSIONS = [
    pytest.param(torch.bfloat16, _widen, _narrow, id="bfloat16"),
    pytest.param(torch.float16, _widen, _narrow, id="float16"),
    pytest.param(torch.float16, _widen_portable, _narrow_portable, id="float16-portable"),
]


@pytest.mark.parametrize(("dtype", "widen", "narrow"), CONVERSIONS)
def test_load_widens_every_bit_pattern_exactly(dtype, widen, narrow):
    """All 65536 patterns (subnormals, Inf, NaN included) widen as torch's conversion."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    got = np.empty(every.numel(), np.float32)
    widen(_bits(every), got)
    want = every.float().numpy()
    nan = np.isnan(want)
    assert nan.sum() > 0 and np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def _edges(dtype):
    info = torch.finfo(dtype)
    top, tiny = float(info.max), float(info.smallest_normal)
    sub = tiny * float(info.eps)  # the smallest subnormal
    values = [0.0, -0.0, np.inf, -np.inf, top, -top, tiny, sub, sub / 2, sub * 0.75]
    values += [top * (1 + info.eps / 2), top * (1 + info.eps / 4), 1 + info.eps / 2]
    return np.array(values + [-v for v in values])


@pytest.mark.parametrize(("dtype", "widen", "narrow"), CONVERSIONS)
def test_store_of_float32_rounds_to_nearest_even(dtype, widen, narrow):
    """float32 -> half as torch's conversion (round to nearest even, overflow to Inf, NaN
    stays NaN) on a million values over the whole exponent range and the edge cases."""
    rng = np.random.default_rng(0)
    v = rng.standard_normal(1 << 20) * np.exp(rng.uniform(-40, 40, 1 << 20))
    v = np.concatenate([v, _edges(dtype), [np.nan]]).astype(np.float32)
    got = np.empty(v.shape, launchers.HALF_BITS[dtype])
    narrow(v, got)
    want = _bits(torch.from_numpy(v).to(dtype))
    nan = np.isnan(v)
    assert np.array_equal(got[~nan], want[~nan])
    assert _from_bits(got[nan], dtype).isnan().all()


@pytest.mark.parametrize("dtype", HALVES, ids=_name)
def test_store_of_float64_rounds_once(dtype):
    """float64 -> half is rounded once: just above (below) the midpoint of two half values
    goes up (down), where float64 -> float32 -> half would land on the midpoint and round
    to even; exactly on it, to the even one."""
    rng = np.random.default_rng(1)
    low = torch.from_numpy(rng.uniform(1e-3, 1e3, 5000)).to(dtype)
    low = low[low.isfinite() & (low < torch.finfo(dtype).max)]
    signed = torch.cat([low, -low])
    below_bits = _bits(signed).astype(np.int64)
    above = _from_bits((below_bits + 1).astype(launchers.HALF_BITS[dtype]), dtype)
    a, b = signed.double().numpy(), above.double().numpy()  # |b| > |a|, same sign
    mid = (a + b) / 2
    nudge = np.abs(mid) * 2.0**-35
    outward = np.where(mid > 0, mid + nudge, mid - nudge)
    inward = np.where(mid > 0, mid - nudge, mid + nudge)
    even = np.where(below_bits % 2 == 0, a, b)
    for values, want in ((outward, b), (inward, a), (mid, even)):
        got = np.empty(values.shape, launchers.HALF_BITS[dtype])
        _narrow(values, got)
        np.testing.assert_array_equal(_from_bits(got, dtype).double().numpy(), want)


# --- the kernels, through their launchers ---------------------------------------------------


def _inputs(shape, dtype, *key):
    """x, weight, bias, dy (torch, ``dtype``) from the kernel tests' generator."""
    x, weight, bias, dy = kernel_data.inputs(kernel_data.rng(*key), shape, np.float32, shape[1])
    return tuple(torch.from_numpy(a).to(dtype) for a in (x, weight, bias, dy))


def _axes(n_dims=2):
    return feature_norm_axes(n_dims, (1,), None)


def _reference(x, weight, bias, center, eps=EPS):
    """(y, mean, rstd) of the float64 reference on the half values of x (float64 arrays)."""
    xd = _f64(x)
    axes = feature_norm_axes(2, (x.shape[1],), None)
    mean, var = statistics(xd, axes, center=center)
    y = normalize(xd, axes, _f64(weight), _f64(bias), eps, center=center)
    return y, mean.ravel(), 1 / np.sqrt(var.ravel() + eps)


def _check_rounded(got, want, dtype):
    """``got`` (half) is ``want`` (float64) within the dtype's tolerance, and is its
    correctly rounded value except where float32 arithmetic lands on the other side of a
    rounding boundary (a few in a thousand at most)."""
    np.testing.assert_allclose(_f64(got), want, **tol(dtype))
    finite = np.isfinite(want)
    exact = torch.from_numpy(want).to(dtype).double().numpy()
    assert (_f64(got)[finite] != exact[finite]).mean() < 5e-3


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", HALVES, ids=_name)
def test_forward(dtype, shape, center, affine):
    x, weight, bias, _ = _inputs(shape, dtype, 1, *shape)
    if not affine:
        weight = bias = None
    y, mean, rstd = launchers.row_norm(x, weight, bias, EPS, center)
    assert y.dtype == dtype and mean.dtype == rstd.dtype == torch.float64
    y_ref, mean_ref, rstd_ref = _reference(x, weight, bias, center)
    _check_rounded(y, y_ref, dtype)
    # statistics from float32 arithmetic on exact (widened) values
    np.testing.assert_allclose(mean.numpy(), mean_ref, **tol(torch.float32))
    np.testing.assert_allclose(rstd.numpy(), rstd_ref, **tol(torch.float32))
    if not center:
        assert (mean == 0).all()


def _backward_reference(dy, x, weight, bias, center, eps=EPS):
    axes = feature_norm_axes(2, (x.shape[1],), None)
    return normalize_backward(_f64(dy), _f64(x), axes, _f64(weight), _f64(bias), eps, center=center)


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", HALVES, ids=_name)
def test_backward(dtype, shape, center):
    x, weight, bias, dy = _inputs(shape, dtype, 2, *shape)
    _, mean, rstd = launchers.row_norm(x, weight, bias, EPS, center)
    grads = launchers.row_norm_backward(dy, x, weight, mean, rstd, center, None)
    refs = _backward_reference(dy, x, weight, bias, center)
    for got, want in zip(grads, refs, strict=True):
        assert got.dtype == dtype
        np.testing.assert_allclose(_f64(got), want, **grad_tol(dtype))


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", HALVES, ids=_name)
def test_backward_without_weight_and_with_extra(dtype, center):
    """No weight (ones), and ``extra`` (the fused add's gradient of its sum) added to dx."""
    x, _, _, dy = _inputs((37, 769), dtype, 3)
    extra = torch.randn(x.shape).to(dtype)
    _, mean, rstd = launchers.row_norm(x, None, None, EPS, center)
    dx, _, dbias = launchers.row_norm_backward(dy, x, None, mean, rstd, center, extra)
    dx_ref = _backward_reference(dy, x, None, None, center)[0]
    np.testing.assert_allclose(_f64(dx), dx_ref + _f64(extra), **grad_tol(dtype))
    np.testing.assert_allclose(_f64(dbias), _f64(dy).sum(0), **grad_tol(dtype))


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("shape", [(1, 1), (37, 769), (3, 4097)], ids=str)
@pytest.mark.parametrize("dtype", HALVES, ids=_name)
def test_add_forward(dtype, shape, center):
    """sum_out = x + residual rounded to the dtype, bit for bit as torch adds them; y is the
    norm of that rounded sum."""
    x, weight, bias, residual = _inputs(shape, dtype, 4, *shape)
    y, total, mean, rstd = launchers.add_row_norm(x, residual, weight, bias, EPS, center)
    torch.testing.assert_close(total, x + residual, atol=0, rtol=0)
    y_ref, mean_ref, rstd_ref = _reference(x + residual, weight, bias, center)
    _check_rounded(y, y_ref, dtype)
    np.testing.assert_allclose(mean.numpy(), mean_ref, **tol(torch.float32))
    np.testing.assert_allclose(rstd.numpy(), rstd_ref, **tol(torch.float32))


@pytest.mark.parametrize("dtype", HALVES, ids=_name)
def test_nan_and_inf(dtype):
    """NaN stays in its row (forward and dx), an Inf input makes its LayerNorm row NaN, an
    Inf bias stays Inf in its column, and an output beyond the dtype's range is Inf."""
    x, weight, bias, dy = _inputs((5, 33), dtype, 8)
    x[2, 7] = float("nan")
    x[3, 0] = float("inf")
    bias[5] = float("inf")
    for center in (True, False):
        y, mean, rstd = launchers.row_norm(x, weight, bias, EPS, center)
        dx, _, _ = launchers.row_norm_backward(dy, x, weight, mean, rstd, center, None)
        for out in (y, dx):
            assert out[2].isnan().all()
            assert out[[0, 1, 4]].isfinite()[:, [j for j in range(33) if j != 5]].all()
        assert (y[[0, 1, 4], 5] == float("inf")).all()
        if center:
            assert y[3].isnan().all()
    big = torch.full((33,), torch.finfo(dtype).max, dtype=dtype)
    xs = torch.linspace(-3, 3, 33).to(dtype).reshape(1, 33)
    y, _, _ = launchers.row_norm(xs, big, None, EPS, True)
    assert y[0, 0] == -float("inf") and y[0, -1] == float("inf")
    assert y[0, 16].isfinite()


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", HALVES, ids=_name)
def test_constant_rows(dtype, center):
    """A constant row, near zero or far from it: LayerNorm's x - mean is exactly 0 (the sum
    is taken from the row's first element), so y is the bias bit for bit."""
    n = 4097
    # bfloat16 up to 1e16: the float32 sum of n squares must stay below 3.4e38
    values = torch.tensor([0.1, -3.0, 1e4, 6e4 if dtype == torch.float16 else 1e16])
    x = values.to(dtype).reshape(-1, 1).expand(-1, n).contiguous()
    _, weight, bias, _ = _inputs((4, n), dtype, 10)
    y, mean, rstd = launchers.row_norm(x, weight, bias, EPS, center)
    if center:
        torch.testing.assert_close(y, bias.expand_as(y), atol=0, rtol=0)
        np.testing.assert_array_equal(mean.numpy(), x[:, 0].double().numpy())
        np.testing.assert_allclose(rstd.numpy(), 1 / np.sqrt(EPS), rtol=1e-6)
    else:  # y = +-weight + bias: often a tie of the dtype, which float32 error decides
        np.testing.assert_allclose(_f64(y), _reference(x, weight, bias, False)[0], **tol(dtype))


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", HALVES, ids=_name)
def test_far_from_zero(dtype, center):
    """x = 1e4 + spread of a few ulps (the 1e4 + 1e-3 noise case as far as the dtype can
    hold it: 1e-3 is below its resolution at 1e4): forward and backward as the reference on
    the same values."""
    ulp = 8.0 if dtype == torch.float16 else 64.0  # at 1e4
    gen = torch.Generator().manual_seed(5)
    shape = (3, 4097)
    x = (1e4 + 3 * ulp * torch.randn(shape, generator=gen)).to(dtype)
    _, weight, bias, dy = _inputs(shape, dtype, 5)
    y, mean, rstd = launchers.row_norm(x, weight, bias, EPS, center)
    y_ref, mean_ref, rstd_ref = _reference(x, weight, bias, center)
    _check_rounded(y, y_ref, dtype)
    np.testing.assert_allclose(mean.numpy(), mean_ref, **tol(torch.float32))
    np.testing.assert_allclose(rstd.numpy(), rstd_ref, **tol(torch.float32))
    grads = launchers.row_norm_backward(dy, x, weight, mean, rstd, center, None)
    for got, want in zip(grads, _backward_reference(dy, x, weight, bias, center), strict=True):
        scale = np.abs(want).max()
        np.testing.assert_allclose(_f64(got) / scale, want / scale, **grad_tol(dtype))


@pytest.mark.parametrize("dtype", HALVES, ids=_name)
def test_deterministic(dtype):
    """Same bits on a second run and with one thread instead of two."""
    x, weight, bias, dy = _inputs((301, 769), dtype, 9)
    extra = dy.flip(0).contiguous()
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (2, 2, 1):
            torch.set_num_threads(threads)
            y, mean, rstd = launchers.row_norm(x, weight, bias, EPS, True)
            grads = launchers.row_norm_backward(dy, x, weight, mean, rstd, True, extra)
            results.append((y, mean, rstd, *grads))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


# --- routing and the public functions ---------------------------------------------------------


def _leaf(t):
    return t.clone().requires_grad_()


@pytest.mark.parametrize("backend", ["numba", "auto"])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", HALVES, ids=_name)
def test_public_functions_run_numba_with_gradients(dtype, center, backend):
    """F.layer_norm / F.rms_norm / F.add_layer_norm on half tensors that need a gradient run
    the Numba kernels (forced, and under "auto") and match the reference."""
    if not backends.numba_available():
        pytest.skip("numba not installed")
    x, weight, bias, dy = _inputs((64, 769), dtype, 11)
    xl, wl, bl = _leaf(x), _leaf(weight), _leaf(bias)
    with backends.use(backend):
        if center:
            y = F.layer_norm(xl, (769,), wl, bl, eps=EPS)
        else:
            y = F.rms_norm(xl, (769,), wl, eps=EPS)
        assert backends.last_used() == "numba"
        y.backward(dy)
    bias_used = bias if center else None
    _check_rounded(y.detach(), _reference(x, weight, bias_used, center)[0], dtype)
    refs = _backward_reference(dy, x, weight, bias_used, center)
    got = (xl.grad, wl.grad, bl.grad if center else None)
    for g, want in zip(got, refs, strict=True):
        if want is None or g is None:
            assert g is None or not center
            continue
        assert g.dtype == dtype
        np.testing.assert_allclose(_f64(g), want, **grad_tol(dtype))
    residual = _leaf(dy)
    with backends.use(backend):
        out, total = F.add_layer_norm(_leaf(x), residual, (769,), _leaf(weight))
        assert backends.last_used() == "numba"
    (out.float().sum() + total.float().sum()).backward()
    assert residual.grad.dtype == dtype and residual.grad.isfinite().all()


@pytest.mark.parametrize("dtype", HALVES, ids=_name)
def test_group_and_channel_layouts_refuse_half(dtype):
    """The group and channel kernels read float32/float64 only: forcing "numba" on a half
    GroupNorm or BatchNorm raises with the reason; "auto" runs something else."""
    if not backends.numba_available():
        pytest.skip("numba not installed")
    x = torch.randn(4, 8, 16).to(dtype)
    ones = torch.ones(8, dtype=dtype)
    calls = {
        "groups": lambda: F.group_norm(x, 2, ones, ones),
        "channels": lambda: F.batch_norm(x, None, None, ones, ones, training=True),
    }
    for kind, call in calls.items():
        with backends.use("numba"), pytest.raises(ValueError, match=f"not the {kind} layout"):
            call()
        with backends.use("auto"):
            call()
            assert backends.last_used() != "numba"


@pytest.mark.parametrize("dtype", HALVES, ids=_name)
def test_custom_ops_pass_torch_opcheck(dtype):
    """The row ops on half tensors: schema, fake (outputs of x's dtype, float64 statistics
    on the CPU), autograd registration and aot_dispatch."""
    if not backends.numba_available():
        pytest.skip("numba not installed")
    x = torch.randn(5, 7).to(dtype).requires_grad_()
    w = torch.randn(7).to(dtype).requires_grad_()
    torch.library.opcheck(kernel_ops.row_norm.op, (x, w, w.detach().clone(), EPS, True))
    torch.library.opcheck(kernel_ops.row_norm.op, (x, None, None, EPS, False))
    torch.library.opcheck(kernel_ops.add_row_norm.op, (x, x.detach().clone(), w, None, EPS, True))
    y, mean, rstd = kernel_ops.row_norm.op(x, w, None, EPS, True)
    assert y.dtype == dtype and mean.dtype == rstd.dtype == kernel_ops.stats_dtype(x)


def test_runs_without_f16c(tmp_path):
    """On a CPU target without F16C (``NUMBA_CPU_NAME=generic``) the float16 conversions
    still compile (LLVM's ``half`` type would call a runtime function Numba does not link,
    and LLVM would abort the process)."""
    script = (
        "import torch\n"
        "from normlab.kernels.cpu import launchers\n"
        "for dtype in (torch.float16, torch.bfloat16):\n"
        "    x = torch.linspace(-3, 3, 40).reshape(4, 10).to(dtype)\n"
        "    y, mean, rstd = launchers.row_norm(x, x[0], x[1], 1e-5, True)\n"
        "    dx, _, _ = launchers.row_norm_backward(x, x, x[0], mean, rstd, True, None)\n"
        "    assert y.isfinite().all() and dx.isfinite().all()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(launchers.__file__).parents[3]), *sys.path])
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("dtype", HALVES, ids=_name)
def test_auto_routes_half_rows_to_numba_from_the_size_thresholds(dtype, monkeypatch):
    """Under "auto" with the real thresholds: a half LayerNorm/RMSNorm that needs a gradient
    runs Numba at any size (torch's half gradient is refused, and below AUTO_MIN_ELEMENTS the
    kernel's launch still costs less than the composite); without a gradient Numba too
    (its plan launches the kernel by address, faster than torch's op at every size), also
    for a strided input (on a contiguous copy)."""
    if not backends.numba_available():
        pytest.skip("numba not installed")
    monkeypatch.setattr(backends, "AUTO_MIN_ELEMENTS", 1 << 15)  # conftest sets 0
    monkeypatch.setattr(backends, "AUTO_TORCH_ELEMENTS", (1 << 20, 1 << 18, 1 << 20))
    for rows, grad, strided, expected in (
        (64, True, False, "numba"),  # 32K elements
        (2, True, False, "numba"),
        (64, False, False, "numba"),
        (64, False, True, "numba"),
        (2048, False, True, "numba"),  # 1M elements
    ):
        x = torch.randn(rows, 1024 if strided else 512).to(dtype)
        x = (x[:, ::2] if strided else x).requires_grad_(grad)
        w = torch.ones(512, dtype=dtype, requires_grad=grad)
        with backends.use("auto"):
            for norm in (F.layer_norm, F.rms_norm):
                norm(x, (512,), w)
                assert backends.last_used() == expected, (norm.__name__, rows, grad, strided)
