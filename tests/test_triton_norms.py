"""The Triton GroupNorm/InstanceNorm, BatchNorm and PowerNorm kernels (normlab.kernels.gpu
.groups, .channels, .power_norm) against the float64 reference: forward, statistics and
gradients, masked and not, channels first and last, float32/float16/bfloat16, a large mean,
and two runs bit-identical. Without a GPU they run on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, set before Triton is imported), with blocks shrunk so that every loop
and every split of a reduction runs several times on these small inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import normlab
from normlab import backends
from normlab import reference as ref
from normlab.kernels.cpu import launchers
from normlab.kernels.gpu import channels, groups, moments, power_norm
from normlab.spec import Layout
from tolerances import grad_tol, tol

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = [torch.float16, torch.bfloat16]
EPS = 1e-5


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of a few elements: loops over tiles, channel tiles and spans all iterate."""
    monkeypatch.setattr(groups, "TILE", 8)
    monkeypatch.setattr(channels, "TILE", 16)
    monkeypatch.setattr(channels, "MAX_TILE_CHANNELS", 4)
    monkeypatch.setattr(channels, "PARTIAL_TILES", 2)
    monkeypatch.setattr(moments, "COLUMN_BLOCK_ROWS", 2)


def _data(shape, dtype, seed, params, loc=0.5, scale=2.0):
    """x, dy, weight, bias on the test device (weight not ones, bias not zero)."""
    gen = torch.Generator().manual_seed(seed)
    x = loc + scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = 1 + 0.5 * torch.randn(params, generator=gen, dtype=torch.float64)
    bias = torch.randn(params, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype).to(DEVICE) for t in (x, dy, weight, bias))


def _mask(rows, positions, seed):
    """uint8 (rows, positions), ~60% real, every row with a real first position."""
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(rows, positions, generator=gen) < 0.6).to(torch.uint8)
    mask[:, 0] = 1
    return mask.to(DEVICE)


def _np(t):
    return None if t is None else t.detach().double().cpu().numpy()


def _close(actual, expected, tolerance, what):
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected, **tolerance, msg=lambda m: f"{what}: {m}"
    )


# --- GroupNorm / InstanceNorm ------------------------------------------------------------------

# (shape (N, C, S), groups): one group, several, one channel each; S = 1 and S > TILE.
GROUP_CASES = [((3, 6, 7), 1), ((3, 6, 7), 2), ((3, 6, 7), 6), ((2, 8, 1), 2), ((2, 4, 19), 4)]


@pytest.mark.parametrize("shape,num_groups", GROUP_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_reference(shape, num_groups, affine):
    x, dy, weight, bias = _data(shape, torch.float32, 1, shape[1])
    weight, bias = (weight, bias) if affine else (None, None)
    y, mean, var, rstd = groups.group_norm_forward(x, weight, bias, num_groups, EPS, None)
    args = (_np(x), num_groups, _np(weight), _np(bias), EPS)
    _close(y, ref.group_norm(*args), tol(torch.float32), "y")
    grouped = _np(x).reshape(shape[0], num_groups, -1)
    _close(mean, grouped.mean(axis=2), tol(torch.float32), "mean")
    _close(var, grouped.var(axis=2), tol(torch.float32), "var")
    assert mean.dtype == var.dtype == rstd.dtype == torch.float32
    dx, dweight, dbias = groups.group_norm_backward(dy, x, weight, mean, rstd, num_groups, None)
    ref_dx, ref_dweight, ref_dbias = ref.group_norm_backward(_np(dy), *args)
    _close(dx, ref_dx, grad_tol(torch.float32), "dx")
    if affine:
        _close(dweight, ref_dweight, grad_tol(torch.float32), "dweight")
        _close(dbias, ref_dbias, grad_tol(torch.float32), "dbias")


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_masked_instance_norm_matches_reference(dtype):
    """Statistics over the real positions only; every position normalized with them."""
    shape = (3, 4, 19)
    x, dy, weight, bias = _data(shape, dtype, 2, shape[1])
    mask = _mask(shape[0], shape[2], 2)
    mask[0, 1:] = 0  # one real position: variance 0
    y, mean, _, rstd = groups.group_norm_forward(x, weight, bias, shape[1], EPS, mask)
    assert y.dtype == dtype
    args = (_np(x), _np(weight), _np(bias), EPS, _np(mask))
    _close(y, ref.instance_norm(*args), tol(dtype), "y")
    dx, dweight, dbias = groups.group_norm_backward(dy, x, weight, mean, rstd, shape[1], mask)
    want = ref.instance_norm_backward(_np(dy), *args)
    for got, expected, name in zip((dx, dweight, dbias), want, ("dx", "dw", "db"), strict=True):
        _close(got, expected, grad_tol(dtype), name)


@pytest.mark.parametrize("masked", [False, True])
def test_group_norm_large_mean(masked):
    """x = 1e4 + 1e-3 noise in float32: moments of x minus a pivot keep y exact, and the
    backward recovers what the float32 mean lost."""
    shape = (2, 4, 19)
    x, dy, weight, bias = _data(shape, torch.float32, 12, shape[1], loc=1e4, scale=1e-3)
    mask = _mask(shape[0], shape[2], 12) if masked else None
    if mask is not None:  # zeros in the padding, first: the pivot must be a real value
        mask[:, 0] = 0
        x = x.masked_fill((mask == 0)[:, None, :], 0.0)
    y, mean, _, rstd = groups.group_norm_forward(x, weight, bias, 2, EPS, mask)
    args = (_np(x), 2, _np(weight), _np(bias), EPS, _np(mask))
    _close(y, ref.group_norm(*args), tol(torch.float32), "y")
    grads = groups.group_norm_backward(dy, x, weight, mean, rstd, 2, mask)
    for got, want in zip(grads, ref.group_norm_backward(_np(dy), *args), strict=True):
        _close(got, want, grad_tol(torch.float32), "gradient")


def test_group_norm_ignores_nan_in_padding():
    """NaN in padded positions (where dy = 0) enters neither statistics nor gradients."""
    shape = (2, 6, 9)
    x, dy, weight, bias = _data(shape, torch.float32, 3, shape[1])
    mask = _mask(shape[0], shape[2], 3)
    mask[:, 0] = 0  # padding first: the pivot must come from a real position
    pad = (mask == 0)[:, None, :].expand(shape)
    clean = x.masked_fill(pad, 0.0)
    dirty, dy = x.masked_fill(pad, float("nan")), dy.masked_fill(pad, 0.0)
    y, mean, _, rstd = groups.group_norm_forward(dirty, weight, bias, 3, EPS, mask)
    args = (_np(clean), 3, _np(weight), _np(bias), EPS, _np(mask))
    _close(y[~pad], ref.group_norm(*args)[~pad.cpu().numpy()], tol(torch.float32), "y")
    grads = groups.group_norm_backward(dy, dirty, weight, mean, rstd, 3, mask)
    for got, want in zip(grads, ref.group_norm_backward(_np(dy), *args), strict=True):
        _close(got, want, grad_tol(torch.float32), "gradient")


# --- BatchNorm -----------------------------------------------------------------------------

# (A, C, B): channels last (B == 1; more channels than a channel tile), channels first.
BN_SHAPES = [(37, 6, 1), (5, 3, 7)]


def _bn_reference(x, dy, weight, bias, mask):
    args = (_np(x), _np(weight), _np(bias), EPS)
    m = _np(mask)
    return ref.batch_norm_train(*args, dim=1, mask=m), ref.batch_norm_train_backward(
        _np(dy), *args, dim=1, mask=m
    )


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_batch_norm_train_matches_reference(shape, masked, dtype):
    x, dy, weight, bias = _data(shape, dtype, 4, shape[1])
    mask = _mask(shape[0], shape[2], 4) if masked else None
    y, mean, var, rstd, count = channels.batch_norm_train(x, weight, bias, EPS, mask)
    assert y.dtype == dtype
    assert mean.dtype == var.dtype == rstd.dtype == count.dtype == torch.float32
    ref_y, ref_grads = _bn_reference(x, dy, weight, bias, mask)
    _close(y, ref_y, tol(dtype), "y")
    real = np.ones((shape[0], shape[2])) if mask is None else _np(mask)
    xs = np.where(real[:, None, :] > 0, _np(x), np.nan)
    _close(mean, np.nanmean(xs, axis=(0, 2)), tol(torch.float32), "mean")
    _close(var, np.nanvar(xs, axis=(0, 2)), tol(torch.float32), "var")
    assert count.item() == real.sum()
    grads = channels.batch_norm_backward(dy, x, weight, mean, rstd, mask, count, False)
    for got, want, name in zip(grads, ref_grads, ("dx", "dweight", "dbias"), strict=True):
        assert got.dtype == dtype
        _close(got, want, grad_tol(dtype), name)


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_given_statistics_matches_reference(shape, affine):
    x, dy, weight, bias = _data(shape, torch.float32, 5, shape[1])
    weight, bias = (weight, bias) if affine else (None, None)
    running_mean = torch.linspace(-1, 1, shape[1], device=DEVICE)
    running_var = torch.linspace(0.5, 3, shape[1], device=DEVICE)
    y, mean, rstd = channels.batch_norm_given(x, weight, bias, running_mean, running_var, EPS)
    args = (_np(x), _np(running_mean), _np(running_var), _np(weight), _np(bias), EPS)
    _close(y, ref.batch_norm_eval(*args), tol(torch.float32), "y")
    count = torch.ones(1, dtype=torch.float64)  # as the op passes it: not read
    grads = channels.batch_norm_backward(dy, x, weight, mean, rstd, None, count, True)
    ref_grads = ref.batch_norm_eval_backward(_np(dy), *args)
    _close(grads[0], ref_grads[0], grad_tol(torch.float32), "dx")
    if affine:
        _close(grads[1], ref_grads[1], grad_tol(torch.float32), "dweight")
        _close(grads[2], ref_grads[2], grad_tol(torch.float32), "dbias")


@pytest.mark.parametrize("shape", [(300, 3, 1), (6, 2, 50)])
@pytest.mark.parametrize("masked", [False, True])
def test_batch_norm_large_mean(shape, masked):
    """x = 1e4 + 1e-3 noise in float32 (|mean| / std = 1e7): the spans' moments of x minus a
    pivot keep the variance and y exact, and the backward recovers what the float32 mean
    (rounded by up to half the noise) lost."""
    x, dy, weight, bias = _data(shape, torch.float32, 6, shape[1], loc=1e4, scale=1e-3)
    mask = _mask(shape[0], shape[2], 6) if masked else None
    if mask is not None:  # zeros in the padding, first: the pivot must be a real value
        mask[0] = 0
        x = x.masked_fill((mask == 0)[:, None, :], 0.0)
    assert channels.layout(shape).partials > 2
    y, mean, var, rstd, count = channels.batch_norm_train(x, weight, bias, EPS, mask)
    ref_y, ref_grads = _bn_reference(x, dy, weight, bias, mask)
    real = np.ones((shape[0], shape[2])) if mask is None else _np(mask)
    xs = np.where(real[:, None, :] > 0, _np(x), np.nan)
    _close(var, np.nanvar(xs, axis=(0, 2)), {"rtol": 1e-4, "atol": 0.0}, "var")
    _close(y, ref_y, tol(torch.float32), "y")
    grads = channels.batch_norm_backward(dy, x, weight, mean, rstd, mask, count, False)
    for got, want, name in zip(grads, ref_grads, ("dx", "dweight", "dbias"), strict=True):
        _close(got, want, grad_tol(torch.float32), name)


def test_batch_norm_nan_in_padding_does_not_leak():
    shape = (40, 5, 1)
    x, dy, weight, bias = _data(shape, torch.float32, 7, shape[1])
    mask = _mask(shape[0], shape[2], 7)
    mask[0] = 0  # the first element is padding: the pivot must come from a real one
    pad = (mask == 0)[:, None, :].expand(shape)
    clean, dy = x.masked_fill(pad, 0.0), dy.masked_fill(pad, 0.0)
    dirty = x.masked_fill(pad, float("nan"))
    y, mean, _, rstd, count = channels.batch_norm_train(dirty, weight, bias, EPS, mask)
    ref_y, ref_grads = _bn_reference(clean, dy, weight, bias, mask)
    _close(y[~pad], ref_y[~pad.cpu().numpy()], tol(torch.float32), "y")
    grads = channels.batch_norm_backward(dy, dirty, weight, mean, rstd, mask, count, False)
    for got, want in zip(grads, ref_grads, strict=True):
        _close(got, want, grad_tol(torch.float32), "gradient")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0 / 0
def test_batch_norm_without_real_elements_gives_nan_statistics():
    x, _, weight, bias = _data((6, 3, 2), torch.float32, 8, 3)
    mask = torch.zeros(6, 2, dtype=torch.uint8, device=DEVICE)
    _, mean, var, _, count = channels.batch_norm_train(x, weight, bias, EPS, mask)
    assert count.item() == 0 and mean.isnan().all() and var.isnan().all()


@pytest.mark.parametrize("shape", [(0, 3, 1), (4, 0, 2), (4, 3, 0)])
def test_empty_inputs_launch_nothing(shape):
    """No element: NaN statistics (as no real element), zero parameter gradients."""
    x, dy, weight, bias = _data(shape, torch.float32, 20, shape[1])
    y, mean, var, rstd, count = channels.batch_norm_train(x, weight, bias, EPS, None)
    assert y.shape == shape and count.item() == 0 and mean.isnan().all() and var.isnan().all()
    dx, dweight, dbias = channels.batch_norm_backward(dy, x, weight, mean, rstd, None, count, False)
    assert dx.shape == shape and not dweight.any() and not dbias.any()
    y, mean, _, rstd = groups.group_norm_forward(x, weight, bias, 1, EPS, None)
    assert y.shape == shape and mean.shape == (shape[0], 1)
    dx, dweight, dbias = groups.group_norm_backward(dy, x, weight, mean, rstd, 1, None)
    assert dx.shape == shape and not dweight.any() and not dbias.any()


# --- PowerNorm -----------------------------------------------------------------------------


def _power_inputs(shape, dtype, masked, seed):
    """x (N, L, C) channels last, its dy, weight, bias, phi (1, 1, C), nu (C,), bool mask
    (N, L, 1) and the channels plan (computed as the Numba one: the same view)."""
    x, dy, weight, bias = _data(shape, dtype, seed, shape[-1])
    gen = torch.Generator().manual_seed(seed)
    phi = (0.5 + torch.rand(shape[-1], generator=gen)).to(dtype).to(DEVICE).reshape(1, 1, -1)
    nu = (0.1 * torch.randn(shape[-1], generator=gen)).to(DEVICE)
    mask = _mask(shape[0], shape[1], seed).bool()[..., None] if masked else None
    weight, bias = weight.reshape(phi.shape), bias.reshape(phi.shape)
    plan = Layout(
        "channels",
        (shape[0] * shape[1], shape[2], 1),
        mask_view=None if mask is None else (shape[0] * shape[1], 1),
        mask_channel_axes=(2,),
    )
    return x, dy, weight, bias, phi, nu, mask, plan


@pytest.mark.parametrize("masked", [False, True])
def test_power_norm_matches_numba(masked):
    """Forward and the approximate backward (dx, dweight, dbias, new nu) as the Numba
    kernel computes them, which its own tests check against the reference."""
    x, dy, weight, bias, phi, nu, mask, plan = _power_inputs((4, 9, 6), torch.float32, masked, 9)
    y = power_norm.power_norm_forward(plan, x, weight, bias, phi, EPS)
    on_cpu = [t.cpu() for t in (x, weight, bias, phi)]  # the Numba kernel runs on the CPU
    _close(y, _np(launchers.power_norm_forward(plan, *on_cpu, EPS)), tol(x.dtype), "y")
    args = (plan, dy, x, weight, bias, phi, nu, EPS, 0.9, mask)
    got = power_norm.power_norm_backward(*args)
    want = launchers.power_norm_backward(
        *(t.cpu() if isinstance(t, torch.Tensor) else t for t in args)
    )
    for g, w, name in zip(got, want, ("dx", "dweight", "dbias", "nu"), strict=True):
        assert g.shape == w.shape
        _close(g, _np(w), grad_tol(torch.float32), name)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_power_norm_matches_reference(dtype):
    x, dy, weight, bias, phi, nu, mask, plan = _power_inputs((3, 7, 5), dtype, True, 10)
    y = power_norm.power_norm_forward(plan, x, weight, bias, phi, EPS)
    assert y.dtype == dtype
    _close(
        y, ref.power_norm_forward(_np(x), _np(phi), _np(weight), _np(bias), EPS), tol(dtype), "y"
    )
    got = power_norm.power_norm_backward(plan, dy, x, weight, bias, phi, nu, EPS, 0.9, mask)
    want = ref.power_norm_backward(
        _np(dy), _np(x), _np(phi), _np(nu), _np(weight), _np(bias), EPS, 0.9, mask=_np(mask[..., 0])
    )
    for g, w, name in zip(got, want, ("dx", "dweight", "dbias", "nu"), strict=True):
        _close(g, np.reshape(w, g.shape), grad_tol(dtype), name)


# --- determinism ---------------------------------------------------------------------------


def test_two_runs_are_bit_identical():
    """Fixed spans and fixed merge order, no atomics: the same bits every run."""
    shape = (23, 6, 1)
    x, dy, weight, bias = _data(shape, torch.float32, 11, shape[1])
    mask = _mask(shape[0], 1, 11)

    def run():
        y, mean, var, rstd, count = channels.batch_norm_train(x, weight, bias, EPS, mask)
        grads = channels.batch_norm_backward(dy, x, weight, mean, rstd, mask, count, False)
        gx = x.reshape(shape[0], 6, 1)
        gy, gmean, _, grstd = groups.group_norm_forward(gx, weight, bias, 2, EPS, None)
        ggrads = groups.group_norm_backward(dy, gx, weight, gmean, grstd, 2, None)
        return (y, mean, var, *grads, gy, gmean, *ggrads)

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


# --- modules on the Triton backend ---------------------------------------------------------


def _step(module, x, dy, **kwargs):
    """y, x.grad and the parameters' grads of one forward/backward under use("triton"),
    after checking that the Triton kernels ran."""
    x = x.detach().clone().requires_grad_(True)
    with backends.use("triton"):
        y = module(x, **kwargs)
        assert backends.last_used() == "triton"
        y.backward(dy)
    return y, x.grad, [p.grad for p in module.parameters()]


def _torch_step(module, x, dy):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    return y, x.grad, [p.grad for p in module.parameters()]


def _assert_same_step(got, want, dtype=torch.float32):
    (y, dx, grads), (ref_y, ref_dx, ref_grads) = got, want
    _close(y, _np(ref_y), tol(dtype), "y")
    _close(dx, _np(ref_dx), grad_tol(dtype), "dx")
    for g, r in zip(grads, ref_grads, strict=True):
        _close(g, _np(r), grad_tol(dtype), "parameter grad")


def _pair(normlab_cls, torch_cls, *args):
    """A normlab module and its torch.nn twin with the same random affine parameters."""
    ours, theirs = normlab_cls(*args).to(DEVICE), torch_cls(*args).to(DEVICE)
    gen = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
            q.copy_(p)
    return ours, theirs


@pytest.mark.parametrize("num_groups", [2, 6])
def test_group_norm_module_on_triton_matches_torch(num_groups):
    ours, theirs = _pair(normlab.GroupNorm, torch.nn.GroupNorm, num_groups, 6)
    x, dy, _, _ = _data((3, 6, 2, 3), torch.float32, 14, 1)
    _assert_same_step(_step(ours, x, dy), _torch_step(theirs, x, dy))


def test_masked_instance_norm_module_on_triton_matches_reference():
    module = normlab.InstanceNorm1d(4, affine=True).to(DEVICE)
    x, dy, weight, bias = _data((3, 4, 11), torch.float32, 15, 4)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    mask = _mask(3, 11, 15).bool()
    y, dx, (dweight, dbias) = _step(module, x, dy, mask=mask)
    args = (_np(x), _np(weight), _np(bias), EPS, _np(mask))
    _close(y, ref.instance_norm(*args), tol(torch.float32), "y")
    want = ref.instance_norm_backward(_np(dy), *args)
    for got, expected in zip((dx, dweight, dbias), want, strict=True):
        _close(got, expected, grad_tol(torch.float32), "gradient")


@pytest.mark.parametrize(
    "cls,shape", [(normlab.BatchNorm1d, (9, 5)), (normlab.BatchNorm2d, (4, 3, 2, 3))]
)
def test_batch_norm_module_on_triton_matches_torch_in_train_and_eval(cls, shape):
    torch_cls = getattr(torch.nn, cls.__name__)
    ours, theirs = _pair(cls, torch_cls, shape[1])
    x, dy, _, _ = _data(shape, torch.float32, 16, 1)
    _assert_same_step(_step(ours, x, dy), _torch_step(theirs, x, dy))
    for name in ("running_mean", "running_var"):
        _close(getattr(ours, name), _np(getattr(theirs, name)), tol(torch.float32), name)
    ours.eval()
    theirs.eval()
    for module in (ours, theirs):
        module.zero_grad()
    _assert_same_step(_step(ours, x, dy), _torch_step(theirs, x, dy))


def test_masked_channels_last_batch_norm_module_on_triton_matches_reference():
    module = normlab.BatchNorm(5, dim=-1).to(DEVICE)
    x, dy, weight, bias = _data((3, 7, 5), torch.float32, 17, 5)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    mask = _mask(3, 7, 17).bool()
    y, dx, (dweight, dbias) = _step(module, x, dy, mask=mask)
    args = (_np(x), _np(weight), _np(bias), EPS)
    _close(y, ref.batch_norm_train(*args, dim=-1, mask=_np(mask)), tol(torch.float32), "y")
    want = ref.batch_norm_train_backward(_np(dy), *args, dim=-1, mask=_np(mask))
    for got, expected in zip((dx, dweight, dbias), want, strict=True):
        _close(got, expected, grad_tol(torch.float32), "gradient")
    running = ref.batch_norm_update_running_stats(
        _np(x), np.zeros(5), np.ones(5), 0.1, dim=-1, mask=_np(mask)
    )
    _close(module.running_mean, running[0], tol(torch.float32), "running_mean")
    _close(module.running_var, running[1], tol(torch.float32), "running_var")


def test_power_norm_module_on_triton_matches_composite_over_steps():
    """Two steps after warmup (forward on the running phi, approximate backward updating
    nu): outputs, gradients and both running statistics as the composite backend."""
    ours = normlab.PowerNorm(6, warmup_iters=0).to(DEVICE)
    twin = normlab.PowerNorm(6, warmup_iters=0).to(DEVICE)
    twin.load_state_dict(ours.state_dict())
    mask = _mask(4, 5, 18).bool()
    for seed in (18, 19):
        x, dy, _, _ = _data((4, 5, 6), torch.float32, seed, 1)
        got = _step(ours, x, dy, mask=mask)
        x = x.detach().clone().requires_grad_(True)
        with backends.use("composite"):
            y = twin(x, mask=mask)
            y.backward(dy)
        _assert_same_step(got, (y, x.grad, [p.grad for p in twin.parameters()]))
        for name in ("running_phi", "running_grad_stat"):
            _close(getattr(ours, name), _np(getattr(twin, name)), tol(torch.float32), name)


# --- compiled for a real GPU ---------------------------------------------------------------


def test_kernels_compile_for_sm90_without_spills():
    """Every kernel compiles to sm_90 machine code at the launchers' blocks and warps (the
    interpreter accepts code the compiler rejects), within its register budget."""
    pytest.importorskip("triton.backends.nvidia")
    script = Path(__file__).with_name("triton_compile.py")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run(
        [sys.executable, str(script), "norms"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(reports) == 3 * 6 + 2 + 3 * 2 + 1
    for report in reports:
        assert report.get("stack", 0) <= 8, report
        assert report.get("reg", 0) <= 65536 // (32 * report["num_warps"]), report
