"""The Numba column kernels: LayerNorm and RMSNorm over a non-trailing axis (channels-first,
``dim=1``) on the (A, C, B) view, against the float64 reference: forward, statistics, dx,
dweight, dbias, gradcheck and double backward, large means, NaN/Inf confinement, determinism,
the custom ops under opcheck and torch.compile, and the routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernel_data
from normlab import backends, reference
from normlab import functional as F
from normlab.backends import registry
from normlab.spec import NormSpec, layout
from recording_backend import recording_backend
from tolerances import conditioned_tol, grad_tol, tol

pytest.importorskip("numba")

from normlab.kernels.cpu import launchers
from normlab.kernels.cpu.columns import (
    column_norm_backward,
    column_norm_forward,
)
from normlab.ops import kernel_ops

DTYPES = [torch.float32, torch.float64]
SHAPES = [(2, 5, 7), (3, 8, 4, 5), (1, 96, 1, 1), (4, 1, 9), (2, 40, 300), (1, 3, 2049)]
EPS = 1e-5


def _inputs(shape, dtype, key):
    x, w, b, dy = kernel_data.inputs(kernel_data.rng(*key), shape, np.float64, shape[1])
    return tuple(torch.from_numpy(a).to(dtype) for a in (x, w, b, dy))


def _norm(center, x, w, b):
    if center:
        return F.layer_norm(x, (x.shape[1],), w, b, eps=EPS, dim=1)
    return F.rms_norm(x, (x.shape[1],), w, eps=EPS, dim=1)


def _reference(center, x, w, b, dy):
    """(y, dx, dweight, dbias) of the float64 reference on the same values."""
    xs, ws, bs, ds = (None if t is None else t.detach().double().numpy() for t in (x, w, b, dy))
    c = x.shape[1]
    if center:
        y = reference.layer_norm(xs, (c,), ws, bs, EPS, dim=1)
        grads = reference.layer_norm_backward(ds, xs, (c,), ws, bs, EPS, dim=1)
    else:
        y = reference.rms_norm(xs, (c,), ws, EPS, dim=1)
        grads = reference.rms_norm_backward(ds, xs, (c,), ws, EPS, dim=1)
    return y, *grads


def _check(got, want, dtype, tolerance):
    if want is None:
        assert got is None
        return
    torch.testing.assert_close(got.double(), torch.as_tensor(want), **tolerance(dtype))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_against_the_reference(dtype, shape, center, affine):
    x, w, b, dy = _inputs(shape, dtype, (1, *shape, center, affine))
    w = w.requires_grad_() if affine else None
    b = b.requires_grad_() if affine and center else None
    x.requires_grad_()
    with backends.use("numba"):
        y = _norm(center, x, w, b)
        assert backends.last_used() == "numba"
    y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = _reference(center, x.detach(), w, b, dy)
    assert y.shape == x.shape and y.is_contiguous()
    _check(y.detach(), y_ref, dtype, tol)
    _check(x.grad, dx_ref, dtype, grad_tol)
    _check(None if w is None else w.grad, dw_ref if affine else None, dtype, grad_tol)
    _check(None if b is None else b.grad, db_ref if b is not None else None, dtype, grad_tol)


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
def test_kernel_statistics(dtype, center):
    """mean and rstd per (a, b), float64; RMSNorm's mean is 0."""
    shape = (3, 11, 37)
    x, w, b, _ = kernel_data.inputs(kernel_data.rng(2, center), shape, dtype, shape[1])
    y, mean, rstd = np.empty_like(x), np.empty((3, 37)), np.empty((3, 37))
    column_norm_forward(x, w, b, EPS, center, y, mean, rstd)
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=1) if center else np.zeros((3, 37))
    var = ((x64 - mu[:, None]) ** 2).mean(axis=1)
    np.testing.assert_allclose(mean, mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(var + EPS), rtol=1e-12)
    if not center:
        assert (mean == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_large_mean_keeps_the_reference_accuracy(dtype, center):
    """x = 1e4 + 1e-3 noise: float64 two-pass statistics keep the noise (as the rows kernels)."""
    g = torch.Generator().manual_seed(3)
    shape = (2, 64, 5, 7)
    x = (1e4 + 1e-3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    w = torch.randn(64, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(64, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    xg = x.clone().requires_grad_()
    with backends.use("numba"):
        y = _norm(center, xg, w, b if center else None)
    y.backward(dy)
    y_ref, dx_ref, *_ = _reference(center, x, w, b if center else None, dy)
    cond = 1e7 if center else 1.0
    torch.testing.assert_close(
        y.detach().double(), torch.as_tensor(y_ref), **conditioned_tol(dtype, cond)
    )
    if center:
        # dx scales as rstd ~ 1e3: compare relative to its size
        scale = float(np.abs(dx_ref).max())
        err = float((xg.grad.double() - torch.as_tensor(dx_ref)).abs().max())
        assert err <= 1e-4 * scale if dtype == torch.float32 else err <= 1e-6 * scale


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_and_inf_stay_in_their_columns(bad):
    x = torch.randn(3, 6, 4, 5)
    x[1, 2, 3, 4] = bad
    x[0, 5, 0, 1] = bad
    w, b = torch.randn(6), torch.randn(6)
    with backends.use("numba"):
        y = F.layer_norm(x, (6,), w, b, dim=1)
    finite = torch.isfinite(y)
    columns = torch.ones(3, 4, 5, dtype=torch.bool)
    columns[1, 3, 4] = columns[0, 0, 1] = False
    assert finite.all(dim=1).eq(columns).all()
    assert (~finite).all(dim=1).eq(~columns).all()  # the whole column, nothing else


def test_deterministic_across_thread_counts():
    x, w, b, dy = _inputs((5, 48, 33, 17), torch.float32, (4,))
    view = x.reshape(5, 48, -1)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            y, mean, rstd = launchers.column_norm(view, w, b, EPS, True)
            grads = launchers.column_norm_backward(
                dy.reshape(view.shape), view, w, mean, rstd, True
            )
            results.append([y, mean, rstd, *grads])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for t, u in zip(results[0], other, strict=True):
            assert torch.equal(t, u)


def test_kernel_rejects_bad_shapes():
    x = np.zeros((2, 4, 3), np.float32)
    y = np.empty_like(x)
    with pytest.raises(ValueError, match="weight and bias"):
        column_norm_forward(x, np.ones(3, np.float32), np.zeros(4, np.float32), EPS, True, y,
                            np.empty((2, 3)), np.empty((2, 3)))  # fmt: skip
    with pytest.raises(ValueError, match="mean and rstd"):
        column_norm_backward(x, x, np.ones(4, np.float32), np.empty((2, 4)), np.empty((2, 3)),
                             True, y, np.empty(4, np.float32), np.empty(4, np.float32))  # fmt: skip


# --- autograd, custom ops, compile -----------------------------------------------------------


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_gradcheck_and_double_backward(center):
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if center else None
    inputs = (x, w, b) if center else (x, w)

    def fn(*args):
        out = _norm(center, *args, *((None,) if not center else ()))
        assert backends.last_used() == "numba"
        return out

    with backends.use("numba"):
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_custom_op_passes_opcheck(center):
    x = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    bias = w.detach().clone().requires_grad_() if center else None
    torch.library.opcheck(kernel_ops.column_norm.op, (x, w, bias, 1e-5, center))
    y, mean, rstd = kernel_ops.column_norm.op(x.detach(), w.detach(), bias, 1e-5, center)
    dy = torch.randn_like(y)
    torch.library.opcheck(
        kernel_ops.column_norm_backward.op, (dy, x.detach(), w.detach(), mean, rstd, center)
    )


def test_torch_compile_fullgraph_runs_the_column_ops():
    torch._dynamo.reset()
    seen = {"fw": set(), "bw": set()}
    backend = recording_backend(seen)

    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1))
    import normlab

    norm = normlab.LayerNorm(8, dim=1)
    rms = normlab.RMSNorm(8, dim=1)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()

    def f(x):
        return rms(norm(model(x)))

    x = torch.randn(2, 4, 5, 6)
    with backends.use("numba"):
        compiled = torch.compile(f, fullgraph=True, backend=backend)
        out = compiled(x)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in (*model.parameters(), norm.weight, norm.bias)]
        for p in (*model.parameters(), norm.weight, norm.bias, rms.weight):
            p.grad = None
        want = f(x)
        want.square().sum().backward()
    assert "normlab.column_norm.default" in seen["fw"]
    assert "normlab.column_norm_backward.default" in seen["bw"]
    torch.testing.assert_close(out, want, **tol(torch.float32))
    for g, p in zip(grads, (*model.parameters(), norm.weight, norm.bias), strict=True):
        torch.testing.assert_close(g, p.grad, **grad_tol(torch.float32))


# --- layout and routing ------------------------------------------------------------------------


def test_the_columns_layout():
    lay = layout(NormSpec((1,), (1,)), (3, 8, 4, 5), affine=True)
    assert lay.kind == "columns" and lay.view == (3, 8, 20)
    assert layout(NormSpec((0,), (0,)), (6, 4, 5), affine=True).view == (1, 6, 20)
    assert layout(NormSpec((1,), (1,), center=False), (2, 5, 7), False).kind == "columns"
    # the earlier layouts keep their calls
    assert layout(NormSpec((2,), (2,)), (3, 8, 4), affine=True).kind == "rows"
    assert layout(NormSpec((0, 2), (1,)), (3, 8, 4), affine=True).kind == "channels"
    # given statistics, masks and two reduced axes are not columns
    assert isinstance(layout(NormSpec((1,), (1,), stats="given"), (3, 8, 4), True), str)
    assert isinstance(layout(NormSpec((1,), (1,), masked=True), (3, 8, 4), True), str)
    assert isinstance(layout(NormSpec((1, 2), (1, 2)), (3, 8, 4, 5), True), str)
    # statistics per channel over the batch axis (PowerNorm's warmup) are not a feature norm
    warmup = NormSpec((0,), (1,), center=False)
    assert layout(warmup, (16, 8), affine=False) == (
        "the reduction axes are not the trailing axes; not a (N, G, *reduced) layout; "
        "channel kernels compute centred statistics (PowerNorm uses the composite); "
        "the feature axes are not the normalized axis"
    )


def test_numba_runs_and_triton_refuses_with_the_reason(monkeypatch):
    x = torch.randn(2, 8, 5, 5)
    with backends.use("numba"):
        F.layer_norm(x, (8,), torch.ones(8), dim=1)
        assert backends.last_used() == "numba"
        F.rms_norm(x, (8,), torch.ones(8), dim=1)
        assert backends.last_used() == "numba"
    monkeypatch.setattr(registry, "interpreting", lambda: True)
    monkeypatch.setattr(backends, "triton_available", lambda: True)
    call = registry.Call(NormSpec((1,), (1,)), x, torch.ones(1, 8, 1, 1), None, 1e-5)
    assert registry.TRITON.takes(call) == "no Triton kernel for the columns layout"
    with (
        backends.use("triton"),
        pytest.raises(ValueError, match="no Triton kernel for the columns"),
    ):
        F.layer_norm(x, (8,), torch.ones(8), dim=1)


def test_auto_threshold_for_columns(monkeypatch):
    """ "auto" leaves channels-first LayerNorm/RMSNorm with a gradient to torch below
    AUTO_TORCH_COLUMN_ELEMENTS and runs the column kernel from there on; without one, the
    column kernel (by address once planned) at every size; a strided input goes to torch."""
    monkeypatch.setattr(backends, "AUTO_MIN_ELEMENTS", 1 << 15)
    monkeypatch.setattr(backends, "AUTO_TORCH_COLUMN_ELEMENTS", (1 << 16, 1 << 16))
    weight = torch.ones(32, requires_grad=True)
    with backends.use("auto"):
        F.layer_norm(torch.randn(4, 32, 16, 16), (32,), weight, dim=1)  # 32K elements
        assert backends.last_used() == "torch"
        F.layer_norm(torch.randn(4, 32, 32, 16), (32,), weight, dim=1)  # 64K elements
        assert backends.last_used() == "numba"
        F.rms_norm(torch.randn(4, 32, 32, 16), (32,), weight, dim=1)
        assert backends.last_used() == "numba"
        F.layer_norm(torch.randn(4, 32, 16, 16), (32,), dim=1)  # no gradient
        assert backends.last_used() == "numba"
        x = torch.randn(4, 32, 32, 16).transpose(2, 3)  # not contiguous: torch
        F.layer_norm(x, (32,), dim=1)
        assert backends.last_used() == "torch"


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_a_planned_column_call_gives_the_full_paths_result(name, monkeypatch):
    """A channels-first signature is decided once (``normlab.backends.plans``); the later
    calls run the column kernel's plan runner, with and without a gradient, bit for bit."""
    from normlab.backends import plans

    seen = []
    decide = registry.decide
    monkeypatch.setattr(registry, "decide", lambda call: seen.append(call) or decide(call))
    fn = getattr(F, name)
    x0 = torch.randn(3, 8, 5, 6, dtype=torch.float64) * 3 + 2
    w0 = torch.randn(8, dtype=torch.float64)
    plans.clear()
    results = []
    with backends.use("auto"):
        for _ in range(3):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            y = fn(x, (8,), w, dim=1)
            assert backends.last_used() == "numba"
            (y * torch.arange(6.0, dtype=torch.float64)).sum().backward()
            results.append((y.detach(), x.grad, w.grad))
        with torch.no_grad():
            for _ in range(2):
                backends.record(None)
                results.append((fn(x0, (8,), w0, dim=1),))
                assert backends.last_used() == "numba"
    assert len(seen) == 2  # decided once with a gradient, once without; then the plans
    for got in results[1:]:
        for t, u in zip(got, results[0], strict=False):
            torch.testing.assert_close(t, u, rtol=0, atol=0)
