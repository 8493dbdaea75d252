"""The Triton row kernels (LayerNorm, RMSNorm, fused residual add) against the float64
reference: the launchers directly (forward, statistics, dx, dweight, dbias; row in registers
and looped), and the whole module -> functional -> custom op -> Triton path under
``backends.use("triton")``.

Without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), so the shapes are small; skipped when Triton is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import kernel_data
import normlab
import normlab.functional as NF
from normlab import backends
from normlab import reference as ref
from normlab.axes import feature_norm_axes
from normlab.kernels.gpu import interpreting
from normlab.ops import kernel_ops as fused_rows
from tolerances import grad_tol, tol

if not torch.cuda.is_available() and not interpreting():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

from normlab.kernels.gpu import rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5
STATS = tol(torch.float32)  # the statistics are float32 whatever the input dtype
AFFINES = ["none", "weight", "weight_bias"]


def _inputs(shape, dtype, *key):
    """x, weight, bias, dy on DEVICE in ``dtype`` (weight not ones, bias not zero)."""
    arrays = kernel_data.inputs(kernel_data.rng(*key), shape, np.float32, shape[1])
    return tuple(torch.from_numpy(a).to(DEVICE, dtype) for a in arrays)


def _np(t):
    return None if t is None else t.detach().cpu().double().numpy()


def _close(actual, expected, tolerance):
    expected = torch.from_numpy(np.asarray(expected, dtype=np.float64).copy())
    torch.testing.assert_close(actual.detach().cpu().double(), expected, **tolerance)


def _assert_rounded_sum(s, x, residual):
    """s == x + residual rounded to x's dtype, bit for bit. Except bfloat16 in Triton 3.9's
    interpreter, which truncates float32 -> bfloat16 where the GPU rounds to nearest even:
    there within one bfloat16 ulp."""
    exact = {"rtol": 0, "atol": 0}
    if s.dtype == torch.bfloat16 and interpreting():
        exact = {"rtol": 2**-7, "atol": 0}
    torch.testing.assert_close(s, x + residual, **exact)


def _params(weight, bias, affine):
    return (weight if affine != "none" else None, bias if affine == "weight_bias" else None)


def _reference(x, weight, bias, center, eps=EPS):
    """(y, mean, rstd) of the float64 reference on the same (rounded) input values."""
    axes = feature_norm_axes(2, (x.shape[1],), None)
    mean, var = ref.statistics(_np(x), axes, center=center)
    y = ref.normalize(_np(x), axes, _np(weight), _np(bias), eps, center=center)
    return y, mean.ravel(), 1 / np.sqrt(var.ravel() + eps)


def _reference_backward(dy, x, weight, bias, center, eps=EPS):
    """(dx, dweight, dbias) of the reference. The kernel returns dweight and dbias also for
    a norm without them: those of weight ones and bias zeros (the same dx)."""
    n = x.shape[1]
    weight = np.ones(n) if weight is None else _np(weight)
    bias = np.zeros(n) if bias is None else _np(bias)
    axes = feature_norm_axes(2, (n,), None)
    return ref.normalize_backward(_np(dy), _np(x), axes, weight, bias, eps, center=center)


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("shape", [(1, 7), (6, 300)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(dtype, shape, center, affine):
    x, weight, bias, _ = _inputs(shape, dtype, 1, *shape)
    weight, bias = _params(weight, bias, affine)
    y, mean, rstd = rows.row_norm_forward(x, weight, bias, EPS, center)
    assert y.dtype == dtype and mean.dtype == rstd.dtype == torch.float32
    y_ref, mean_ref, rstd_ref = _reference(x, weight, bias, center)
    _close(y, y_ref, tol(dtype))
    _close(mean, mean_ref, STATS)
    _close(rstd, rstd_ref, STATS)
    if not center:
        assert (mean == 0).all()


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("shape", [(1, 7), (6, 300)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_reference(dtype, shape, center, affine):
    x, weight, bias, dy = _inputs(shape, dtype, 2, *shape)
    weight, bias = _params(weight, bias, affine)
    _, mean, rstd = rows.row_norm_forward(x, weight, bias, EPS, center)
    dx, dweight, dbias = rows.row_norm_backward(dy, x, weight, mean, rstd, center, programs=4)
    assert dx.dtype == dweight.dtype == dbias.dtype == dtype
    want = _reference_backward(dy, x, weight, bias, center)
    for got, expected in zip((dx, dweight, dbias), want, strict=True):
        _close(got, expected, grad_tol(dtype))


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_add_normalizes_the_rounded_sum(dtype, center):
    """s = x + residual in x's dtype (bit for bit), y = the norm of that s; the backward adds
    the gradient of s (``extra``) to dx."""
    x, weight, bias, dy = _inputs((5, 70), dtype, 3)
    residual, extra = _inputs((5, 70), dtype, 4)[::3]
    y, s, mean, rstd = rows.add_row_norm_forward(x, residual, weight, bias, EPS, center)
    _assert_rounded_sum(s, x, residual)
    y_ref, mean_ref, rstd_ref = _reference(s, weight, bias, center)
    _close(y, y_ref, tol(dtype))
    _close(mean, mean_ref, STATS)
    _close(rstd, rstd_ref, STATS)
    dx, _, _ = rows.row_norm_backward(dy, s, weight, mean, rstd, center, extra)
    dx_ref = _reference_backward(dy, s, weight, bias, center)[0] + _np(extra)
    _close(dx, dx_ref, grad_tol(dtype))


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_looped_variant_matches_reference(dtype, center):
    """block=16 on rows of 100 features: seven blocks (the last partial) per sweep, forward,
    fused add and backward."""
    shape, block = (5, 100), 16
    assert rows.forward_block(shape[1], 4) >= shape[1]  # the default keeps the row whole
    x, weight, bias, dy = _inputs(shape, dtype, 5)
    residual = _inputs(shape, dtype, 6)[0]
    y, mean, rstd = rows.row_norm_forward(x, weight, bias, EPS, center, block=block)
    y_ref, mean_ref, rstd_ref = _reference(x, weight, bias, center)
    _close(y, y_ref, tol(dtype))
    _close(mean, mean_ref, STATS)
    _close(rstd, rstd_ref, STATS)
    dx, dweight, dbias = rows.row_norm_backward(
        dy, x, weight, mean, rstd, center, residual, block=block, programs=2
    )
    want = _reference_backward(dy, x, weight, bias, center)
    _close(dx, want[0] + _np(residual), grad_tol(dtype))
    _close(dweight, want[1], grad_tol(dtype))
    _close(dbias, want[2], grad_tol(dtype))
    y, s, mean, rstd = rows.add_row_norm_forward(
        x, residual, weight, bias, EPS, center, block=block
    )
    _assert_rounded_sum(s, x, residual)
    y_ref, mean_ref, _ = _reference(s, weight, bias, center)
    _close(y, y_ref, tol(dtype))
    _close(mean, mean_ref, STATS)


@pytest.mark.parametrize("block", [None, 64], ids=["whole", "looped"])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_large_mean_keeps_the_noise(center, block):
    """x = 1e4 + 1e-3 * noise in float32: the statistics around a pivot keep the noise (a
    float32 mean alone is only known to 5e-4), and the backward recovers the exact mean
    although the saved one is rounded to float32."""
    shape = (3, 300)
    generator = kernel_data.rng(7)
    x = torch.from_numpy(1e4 + 1e-3 * generator.standard_normal(shape)).float().to(DEVICE)
    _, weight, bias, dy = _inputs(shape, torch.float32, 8)
    eps = 1e-12
    y, mean, rstd = rows.row_norm_forward(x, weight, bias, eps, center, block=block)
    y_ref, mean_ref, rstd_ref = _reference(x, weight, bias, center, eps)
    _close(y, y_ref, tol(torch.float32))
    _close(mean, mean_ref, STATS)
    _close(rstd, rstd_ref, STATS)
    if center:
        assert rstd.min() > 100  # 1 / std of the noise, not 1 / sqrt(eps)
    got = rows.row_norm_backward(dy, x, weight, mean, rstd, center, block=block, programs=2)
    want = _reference_backward(dy, x, weight, bias, center, eps)
    for g, w in zip(got, want, strict=True):
        scale = np.abs(w).max()  # dx is O(rstd) = O(1e3)
        _close(g / scale, w / scale, grad_tol(torch.float32))


@pytest.mark.parametrize("block", [None, 32], ids=["whole", "looped"])
def test_dweight_and_dbias_are_bit_identical_between_runs(block):
    """Partial sums per program and an in-order reduction: no atomics, same bits."""
    x, weight, _, dy = _inputs((37, 100), torch.float32, 9)
    _, mean, rstd = rows.row_norm_forward(x, weight, None, EPS, True)
    first = rows.row_norm_backward(dy, x, weight, mean, rstd, True, block=block, programs=3)
    second = rows.row_norm_backward(dy, x, weight, mean, rstd, True, block=block, programs=3)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_one_row_and_more_programs_than_rows():
    x, weight, bias, dy = _inputs((1, 50), torch.float32, 10)
    _, mean, rstd = rows.row_norm_forward(x, weight, bias, EPS, True)
    got = rows.row_norm_backward(dy, x, weight, mean, rstd, True, programs=8)
    for g, w in zip(got, _reference_backward(dy, x, weight, bias, True), strict=True):
        _close(g, w, grad_tol(torch.float32))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's NumPy
@pytest.mark.parametrize("block", [None, 16], ids=["whole", "looped"])
def test_nan_stays_in_its_row(block):
    x, weight, bias, dy = _inputs((4, 33), torch.float32, 11)
    x[1, 7] = float("nan")
    x[2, 0] = float("inf")  # the pivot itself
    for center in (True, False):
        y, mean, rstd = rows.row_norm_forward(x, weight, bias, EPS, center, block=block)
        dx = rows.row_norm_backward(dy, x, weight, mean, rstd, center, block=block)[0]
        for out in (y, dx):
            assert out[1].isnan().all()
            assert out[[0, 3]].isfinite().all()
        if center:  # mean = inf: x - mean is -inf or NaN, var NaN
            assert y[2].isnan().all()


# --- the whole path: module -> functional -> custom op -> Triton -------------------------------


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_modules_run_the_triton_kernels(kind, dtype):
    features = 40
    x, weight, bias, dy = _inputs((6, features), dtype, 12)
    x, dy = x.reshape(2, 3, features), dy.reshape(2, 3, features)
    module = getattr(normlab, kind)(features, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        if kind == "LayerNorm":
            module.bias.copy_(bias)
    leaf = _leaf(x)
    with backends.use("triton"):
        y = module(leaf)
        assert backends.last_used() == "triton"
        y.backward(dy)
    assert y.dtype == dtype
    args = (_np(x), (features,), _np(module.weight))
    if kind == "LayerNorm":
        args = (*args, _np(module.bias))
        y_ref, grads = ref.layer_norm(*args), ref.layer_norm_backward(_np(dy), *args)
    else:
        args = (*args, module.eps)
        y_ref, grads = ref.rms_norm(*args), ref.rms_norm_backward(_np(dy), *args)
    _close(y, y_ref, tol(dtype))
    params = [leaf, module.weight] + ([module.bias] if kind == "LayerNorm" else [])
    for param, want in zip(params, grads[: len(params)], strict=True):
        _close(param.grad, want, grad_tol(dtype))


@pytest.mark.parametrize("center", [True, False], ids=["add_layer_norm", "add_rms_norm"])
def test_fused_add_functional_runs_the_triton_kernel(center):
    x, weight, _, dy = _inputs((6, 24), torch.bfloat16, 13)
    residual = _inputs((6, 24), torch.bfloat16, 14)[0]
    leaves = [_leaf(t) for t in (x, residual, weight)]
    with backends.use("triton"):
        if center:
            y, s = NF.add_layer_norm(leaves[0], leaves[1], 24, leaves[2])
        else:
            y, s = NF.add_rms_norm(leaves[0], leaves[1], 24, leaves[2], eps=EPS)
        assert backends.last_used() == "triton"
    _assert_rounded_sum(s, x, residual)
    (y * dy).sum().backward()
    y_ref, _, _ = _reference(s, weight, None, center)
    _close(y, y_ref, tol(torch.bfloat16))
    dx_ref, dweight_ref, _ = _reference_backward(dy, s, weight, None, center)
    _close(leaves[0].grad, dx_ref, grad_tol(torch.bfloat16))
    _close(leaves[1].grad, dx_ref, grad_tol(torch.bfloat16))
    _close(leaves[2].grad, dweight_ref, grad_tol(torch.bfloat16))


def test_custom_op_with_triton_passes_opcheck():
    """Schema, fake implementation (float64 statistics for CPU tensors, float32 for CUDA
    ones, whichever kernel runs) and autograd of normlab::row_norm on the Triton path."""
    x = torch.randn(5, 7, device=DEVICE, requires_grad=True)
    w = torch.randn(7, device=DEVICE, requires_grad=True)
    with backends.use("triton"):
        torch.library.opcheck(fused_rows.row_norm.op, (x, w, w.detach().clone(), EPS, True))


def test_compiled_layer_norm_on_triton_equals_eager():
    x, weight, bias, _ = _inputs((6, 40), torch.float32, 15)

    def fn(x, w, b):
        return NF.layer_norm(x, (40,), w, b)

    with backends.use("triton"):
        eager = fn(x, weight, bias)
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, weight, bias)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


# --- dispatch -----------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU dispatch")
def test_auto_keeps_the_numba_kernels_on_cpu_tensors():
    x = torch.randn(4, 40)
    with backends.use("auto"):
        NF.layer_norm(x, (40,))
        assert backends.last_used() == "numba"


def test_forced_triton_refuses_float64_with_the_reason():
    x = torch.randn(4, 40, dtype=torch.float64, device=DEVICE)
    with backends.use("triton"), pytest.raises(ValueError, match=r"triton.*float64"):
        NF.layer_norm(x, (40,))


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU dispatch")
def test_forced_triton_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backends.use("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET"):
        NF.layer_norm(torch.randn(4, 40), (40,))


# --- compiled for a real GPU ------------------------------------------------------------------


def test_kernels_compile_for_sm90_without_spills():
    """Every default configuration compiles to sm_90 machine code (the interpreter accepts
    code the compiler rejects), within its register budget: at most 8 bytes of stack."""
    pytest.importorskip("triton.backends.nvidia")
    script = Path(__file__).with_name("triton_compile.py")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run(
        [sys.executable, str(script), "rows"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(reports) == 2 * 5 * 3 + 1
    for report in reports:
        assert report.get("stack", 0) <= 8, report
        assert report.get("reg", 0) <= 65536 // (32 * report["num_warps"]), report
