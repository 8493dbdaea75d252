"""The Triton kernels past 2^31 elements on a real GPU: index arithmetic that a 32-bit offset
would wrap (rows, groups and channels layouts, forward and the rows backward). Rows far apart
are checked against float64 computed on the device. Opt-in (NORMLAB_HUGE_TESTS=1) and CUDA
only: each case holds 8.6 GB inputs and as much again in outputs and gradients."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import normlab.functional as NF
from normlab import backends
from tolerances import grad_tol, tol

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("NORMLAB_HUGE_TESTS") != "1", reason="opt-in: NORMLAB_HUGE_TESTS=1"
    ),
]

EPS = 1e-5
ELEMENTS = (1 << 31) + (1 << 10)  # just past the int32 range


@pytest.fixture(autouse=True)
def _memory():
    if torch.cuda.mem_get_info()[0] < 48 * 2**30:
        pytest.skip("needs about 48 GiB of free device memory")
    yield
    torch.cuda.empty_cache()


def _close(actual, expected, tolerance):
    torch.testing.assert_close(actual.double(), expected, **tolerance)


def test_layer_norm_rows_forward_and_backward_past_int32():
    features = 1 << 10
    rows = ELEMENTS // features
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, features, device="cuda", generator=gen).requires_grad_()
    weight = (1 + 0.5 * torch.randn(features, device="cuda", generator=gen)).requires_grad_()
    bias = torch.randn(features, device="cuda", generator=gen).requires_grad_()
    with backends.use("triton"):
        y = NF.layer_norm(x, (features,), weight, bias, EPS)
        assert backends.last_used() == "triton"
        dy = torch.randn_like(y)
        y.backward(dy)
    picked = torch.tensor([0, 1, rows // 2, rows - 2, rows - 1], device="cuda")
    x64, dy64 = x.detach()[picked].double(), dy[picked].double()
    w64, b64 = weight.detach().double(), bias.detach().double()
    mean = x64.mean(dim=1, keepdim=True)
    rstd = (x64.var(dim=1, unbiased=False, keepdim=True) + EPS).rsqrt()
    xhat = (x64 - mean) * rstd
    _close(y.detach()[picked], xhat * w64 + b64, tol(torch.float32))
    g = dy64 * w64
    dx = rstd * (g - g.mean(dim=1, keepdim=True) - xhat * (g * xhat).mean(dim=1, keepdim=True))
    _close(x.grad[picked], dx, grad_tol(torch.float32))
    # dweight and dbias sum every row: compare with torch's float64 sums over the whole input.
    with torch.no_grad():
        dbias = torch.zeros(features, dtype=torch.float64, device="cuda")
        dweight = torch.zeros_like(dbias)
        for chunk in range(0, rows, 1 << 18):
            xs = x.detach()[chunk : chunk + (1 << 18)].double()
            ds = dy[chunk : chunk + (1 << 18)].double()
            m = xs.mean(dim=1, keepdim=True)
            r = (xs.var(dim=1, unbiased=False, keepdim=True) + EPS).rsqrt()
            dweight += (ds * (xs - m) * r).sum(dim=0)
            dbias += ds.sum(dim=0)
    _close(weight.grad, dweight, {"atol": 5e-2, "rtol": 1e-4})
    _close(bias.grad, dbias, {"atol": 5e-2, "rtol": 1e-4})


def test_group_norm_groups_layout_past_int32():
    n, c, spatial = (1 << 11) + 1, 32, 1 << 15
    x = torch.randn(n, c, spatial, device="cuda")
    with backends.use("triton"), torch.no_grad():
        y = NF.group_norm(x, 8, eps=EPS)
        assert backends.last_used() == "triton"
    for sample in (0, n // 2, n - 1):
        xs = x[sample].double().reshape(8, -1)
        mean = xs.mean(dim=1, keepdim=True)
        rstd = (xs.var(dim=1, unbiased=False, keepdim=True) + EPS).rsqrt()
        _close(y[sample].reshape(8, -1), (xs - mean) * rstd, tol(torch.float32))


def test_batch_norm_channels_layout_past_int32():
    a, c, b = (1 << 21) + 1, 2, 1 << 9
    x = torch.randn(a, c, b, device="cuda")
    with backends.use("triton"), torch.no_grad():
        y = NF.batch_norm(x, None, None, training=True, eps=EPS)
        assert backends.last_used() == "triton"
        total = torch.zeros(c, dtype=torch.float64, device="cuda")
        for chunk in range(0, a, 1 << 18):
            total += x[chunk : chunk + (1 << 18)].double().sum(dim=(0, 2))
        mean = total / (a * b)
        squares = torch.zeros_like(total)
        for chunk in range(0, a, 1 << 18):
            d = x[chunk : chunk + (1 << 18)].double() - mean[None, :, None]
            squares += (d * d).sum(dim=(0, 2))
        rstd = (squares / (a * b) + EPS).rsqrt()
    for row in (0, a // 2, a - 1):
        want = (x[row].double() - mean[:, None]) * rstd[:, None]
        _close(y[row], want, tol(torch.float32))
