"""The Numba backend through the public API: it takes the calls it was written for, equals the
float64 reference and the composite backend, falls back (or refuses when forced) otherwise,
registers real torch custom ops, compiles without graph breaks and is deterministic.

(The kernels alone are specified in tests/test_kernels_*.py; every other test module runs
on the "auto" backend, and the reference/masked/gradcheck modules run on both backends.)
"""

from __future__ import annotations

import subprocess
import sys

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normlab
import normlab.functional as NF
from normlab import backends
from normlab import reference as ref
from normlab.ops import kernel_ops as fused_channels
from normlab.ops import kernel_ops as fused_groups
from normlab.ops import kernel_ops as fused_rows
from recording_backend import recording_backend
from tolerances import grad_tol, tol

FLOATS = [torch.float32, torch.float64]
ROWS = [1, 3, 37]
FEATURES = [1, 7, 769, 4097]


def _np(t):
    return None if t is None else t.detach().double().numpy().copy()


def _close(actual, expected, tolerance):
    expected = torch.from_numpy(np.ascontiguousarray(np.asarray(expected, dtype=np.float64)))
    torch.testing.assert_close(actual.detach().double(), expected, **tolerance)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _run(backend, fn, *tensors):
    """fn(*leaves) on ``backend``; returns (output, grads of every leaf, backend that ran)."""
    leaves = [_leaf(t) for t in tensors]
    with backends.use(backend):
        out = fn(*leaves)
        used = backends.last_used()
    y = out[0] if isinstance(out, tuple) else out
    dy = torch.randn_like(y)
    loss = (y * dy).sum() + (out[1].sum() if isinstance(out, tuple) else 0)
    loss.backward()
    return out, dy, [leaf.grad for leaf in leaves], used


def _conditioned(dtype):
    """Tolerance for x = 1e4 + 1e-3 noise: one rounding of the mean (|mean| * eps) is
    |mean| / std = 1e7 times larger relative to the standard deviation, in any exact
    implementation; float32 input is computed in float64 and keeps the usual tolerance."""
    return tol(dtype) if dtype == torch.float32 else {"atol": 1e7 * 1e-15, "rtol": 0}


# --- rows: LayerNorm, RMSNorm, fused add ------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("features", FEATURES)
def test_layer_norm_kernel_matches_reference(rows, features, dtype):
    x = torch.randn(rows, features, dtype=dtype) * 3 + 1
    w, b = torch.randn(features, dtype=dtype), torch.randn(features, dtype=dtype)
    y, dy, (dx, dw, db), used = _run(
        "numba", lambda x, w, b: NF.layer_norm(x, (features,), w, b), x, w, b
    )
    assert used == "numba"
    args = (_np(x), (features,), _np(w), _np(b))
    _close(y, ref.layer_norm(*args), tol(dtype))
    for got, want in zip((dx, dw, db), ref.layer_norm_backward(_np(dy), *args), strict=True):
        _close(got, want, grad_tol(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("features", FEATURES)
def test_rms_norm_kernel_matches_reference(rows, features, dtype):
    x = torch.randn(rows, features, dtype=dtype) + 0.5
    w = torch.randn(features, dtype=dtype)
    y, dy, (dx, dw), used = _run(
        "numba", lambda x, w: NF.rms_norm(x, (features,), w, eps=1e-6), x, w
    )
    assert used == "numba"
    args = (_np(x), (features,), _np(w), 1e-6)
    _close(y, ref.rms_norm(*args), tol(dtype))
    want = ref.rms_norm_backward(_np(dy), *args)
    _close(dx, want[0], grad_tol(dtype))
    _close(dw, want[1], grad_tol(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("center", [True, False], ids=["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 769)])
def test_fused_add_equals_add_then_norm(shape, center, dtype):
    features = shape[-1]
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    w, b = torch.randn(features, dtype=dtype), torch.randn(features, dtype=dtype)

    def fused(x, r, w, b):
        if center:
            return NF.add_layer_norm(x, r, features, w, b)
        return NF.add_rms_norm(x, r, features, w, eps=1e-6)

    (y, s), dy, grads, used = _run("numba", fused, x, r, w, b)
    assert used == "numba"
    torch.testing.assert_close(s, x + r, rtol=0, atol=0)
    (y_ref, _), _, grads_ref, _ = _run("composite", fused, x, r, w, b)
    # the same upstream gradients on both backends
    torch.manual_seed(1)
    torch.testing.assert_close(y, y_ref, **tol(dtype))
    # the loss is sum(y * dy) + sum(s): recompute the composite gradients with this dy
    leaves = [_leaf(t) for t in (x, r, w, b)]
    with backends.use("composite"):
        y_c, s_c = fused(*leaves)
    ((y_c * dy).sum() + s_c.sum()).backward()
    for got, leaf in zip(grads, leaves, strict=True):
        if leaf.grad is None:
            assert got is None or not center  # add_rms_norm has no bias
            continue
        torch.testing.assert_close(got, leaf.grad, **grad_tol(dtype))
    del grads_ref


def test_rows_are_independent_bit_for_bit():
    """LN(x)[:-1] == LN(x[:-1]) exactly (pytorch/pytorch#149301)."""
    x = torch.randn(37, 769)
    with backends.use("numba"):
        full = NF.layer_norm(x, (769,))
        part = NF.layer_norm(x[:-1].contiguous(), (769,))
    assert torch.equal(full[:-1], part)


@pytest.mark.parametrize("dtype", FLOATS)
def test_large_mean_small_variance_rows(dtype):
    x = 1e4 + 1e-3 * torch.randn(8, 4097, dtype=torch.float64)
    x = x.to(dtype)
    with backends.use("numba"):
        y = NF.layer_norm(x, (4097,))
    _close(y, ref.layer_norm(_np(x), (4097,)), _conditioned(dtype))


# --- groups: GroupNorm, InstanceNorm ----------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("shape", [(1, 6, 1), (3, 6, 7), (2, 6, 5, 9)])
def test_group_norm_kernel_matches_reference(shape, groups, dtype):
    x = torch.randn(shape, dtype=dtype) * 2 - 1
    w, b = torch.randn(6, dtype=dtype), torch.randn(6, dtype=dtype)
    if shape[2:] == (1,) and groups == 6:
        pytest.skip("one value per group")
    y, dy, (dx, dw, db), used = _run(
        "numba", lambda x, w, b: NF.group_norm(x, groups, w, b), x, w, b
    )
    assert used == "numba"
    args = (_np(x), groups, _np(w), _np(b))
    _close(y, ref.group_norm(*args), tol(dtype))
    for got, want in zip((dx, dw, db), ref.group_norm_backward(_np(dy), *args), strict=True):
        _close(got, want, grad_tol(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_masked_instance_norm_kernel_matches_reference(dtype):
    x = torch.randn(3, 4, 11, dtype=dtype)
    lengths = torch.tensor([11, 2, 6])
    mask = normlab.lengths_to_mask(lengths, 11)
    real = mask.unsqueeze(1).expand_as(x)
    w, b = torch.randn(4, dtype=dtype), torch.randn(4, dtype=dtype)

    def fn(x, w, b):
        return NF.instance_norm(x, weight=w, bias=b, lengths=lengths)

    y, dy, grads, used = _run("numba", fn, x, w, b)
    assert used == "numba"
    args = (_np(x), _np(w), _np(b))
    _close(y, ref.instance_norm(*args, mask=mask.numpy()), tol(dtype))
    want = ref.instance_norm_backward(_np(dy), *args, mask=mask.numpy())
    for got, expected in zip(grads, want, strict=True):
        _close(got, expected, grad_tol(dtype))
    # NaN in the padding stays out of the real positions' statistics
    with backends.use("numba"):
        y_nan = fn(torch.where(real, x, float("nan")), w, b)
    torch.testing.assert_close(y_nan[real], y[real].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOATS)
def test_masked_group_norm_matches_composite(dtype):
    x = torch.randn(3, 8, 13, dtype=dtype)
    lengths = torch.tensor([13, 3, 7])
    w, b = torch.randn(8, dtype=dtype), torch.randn(8, dtype=dtype)

    def fn(x, w, b):
        return NF.group_norm(x, 4, w, b, lengths=lengths)

    y, dy, grads, used = _run("numba", fn, x, w, b)
    assert used == "numba"
    mask = normlab.lengths_to_mask(lengths, 13).numpy()
    _close(y, ref.group_norm(_np(x), 4, _np(w), _np(b), mask=mask), tol(dtype))
    want = ref.group_norm_backward(_np(dy), _np(x), 4, _np(w), _np(b), mask=mask)
    for got, expected in zip(grads, want, strict=True):
        _close(got, expected, grad_tol(dtype))


# --- channels: BatchNorm ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    ("shape", "dim"), [((2, 1), 1), ((37, 7), 1), ((4, 3, 769), 1), ((5, 9, 6), -1)]
)
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_batch_norm_kernel_matches_reference(shape, dim, masked, dtype):
    channels = shape[dim]
    x = torch.randn(shape, dtype=dtype) * 2 + 3
    w, b = torch.randn(channels, dtype=dtype), torch.randn(channels, dtype=dtype)
    mask = None
    if masked:
        if len(shape) == 2:
            pytest.skip("no positional axis to pad")
        length_axis = 2 if dim == 1 else 1
        lengths = torch.randint(1, shape[length_axis] + 1, (shape[0],))
        lengths[0] = shape[length_axis]
        mask = normlab.lengths_to_mask(lengths, shape[length_axis])
    rm, rv = torch.zeros(channels, dtype=dtype), torch.ones(channels, dtype=dtype)

    def fn(x, w, b):
        return NF.batch_norm(x, rm, rv, w, b, training=True, dim=dim, mask=mask)

    y, dy, (dx, dw, db), used = _run("numba", fn, x, w, b)
    assert used == "numba"
    m = None if mask is None else mask.numpy()
    args = (_np(x), _np(w), _np(b), 1e-5, dim)
    _close(y, ref.batch_norm_train(*args, mask=m), tol(dtype))
    want = ref.batch_norm_train_backward(_np(dy), *args, mask=m)
    for got, expected in zip((dx, dw, db), want, strict=True):
        _close(got, expected, grad_tol(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_batch_norm_eval_kernel_matches_reference(dtype):
    x = torch.randn(6, 5, 33, dtype=dtype)
    w, b = torch.randn(5, dtype=dtype), torch.randn(5, dtype=dtype)
    rm, rv = torch.randn(5, dtype=dtype), torch.rand(5, dtype=dtype) + 0.5

    def fn(x, w, b):
        return NF.batch_norm(x, rm, rv, w, b, training=False)

    y, dy, (dx, dw, db), used = _run("numba", fn, x, w, b)
    assert used == "numba"
    args = (_np(x), _np(rm), _np(rv), _np(w), _np(b), 1e-5)
    _close(y, ref.batch_norm_eval(*args), tol(dtype))
    for got, want in zip((dx, dw, db), ref.batch_norm_eval_backward(_np(dy), *args), strict=True):
        _close(got, want, grad_tol(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_large_mean_small_variance_batch_norm(dtype):
    x = (1e4 + 1e-3 * torch.randn(64, 3, 50, dtype=torch.float64)).to(dtype)
    rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    with backends.use("numba"):
        y = NF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    _close(y, ref.batch_norm_train(_np(x)), _conditioned(dtype))
    # the running variance is the unbiased batch variance: exact, not cancelled
    want = _np(x).transpose(1, 0, 2).reshape(3, -1).var(axis=1, ddof=1)
    _close(rv, want, {"rtol": 1e-4 if dtype == torch.float32 else 1e-10, "atol": 0})


def test_batch_norm_module_running_stats_equal_composite():
    x = torch.randn(16, 8, 10)
    lengths = torch.randint(3, 11, (16,))
    modules = {}
    for backend in ("numba", "composite"):
        m = normlab.BatchNorm1d(8)
        with backends.use(backend):
            for _ in range(3):
                m(x, lengths=lengths)
        modules[backend] = m
    for key, value in modules["numba"].state_dict().items():
        torch.testing.assert_close(
            value, modules["composite"].state_dict()[key], **tol(torch.float32)
        )


# --- PowerNorm -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize(("shape", "dim"), [((6, 9, 16), -1), ((6, 16, 9), 1)])
def test_power_norm_after_warmup_kernel_equals_composite(shape, dim, masked, dtype):
    """The one-pass approximate backward: dx, dweight, dbias and the running statistics
    (phi in the forward, nu in the backward) over three steps, against the composite."""
    x = torch.randn(3, *shape, dtype=dtype) * 2 + 1
    lengths = torch.tensor([9, 4, 7, 1, 9, 5]) if masked else None
    results = {}
    for backend in ("numba", "composite"):
        torch.manual_seed(5)
        module = normlab.PowerNorm(16, warmup_iters=0, dim=dim).to(dtype)
        with torch.no_grad():
            module.weight.normal_()
            module.bias.normal_()
        outs = []
        for step in range(3):
            leaf = _leaf(x[step])
            with backends.use(backend):
                y = module(leaf, lengths=lengths)
                used = backends.last_used()
            y.backward(torch.randn_like(y))
            outs += [y, leaf.grad]
        assert used == backend
        results[backend] = (outs, module)
    (outs, module), (want, twin) = results["numba"], results["composite"]
    for got, expected in zip(outs, want, strict=True):
        torch.testing.assert_close(got, expected, **grad_tol(dtype))
    for name in ("weight", "bias"):
        torch.testing.assert_close(
            getattr(module, name).grad, getattr(twin, name).grad, **grad_tol(dtype)
        )
    for name, buffer in module.named_buffers():
        torch.testing.assert_close(buffer, twin.get_buffer(name), **grad_tol(dtype))


# --- dispatch ---------------------------------------------------------------------------------


def test_rows_of_any_strides_run_the_kernel_on_their_values():
    """Rows whose features are not contiguous (every other element) run the rows kernel on
    one contiguous copy: the contiguous input's bits, with and without gradient."""
    x = torch.randn(8, 2 * 769)[:, ::2]
    assert not x.is_contiguous()
    with backends.use("auto"):
        y = NF.layer_norm(x, (769,))
        assert backends.last_used() == "numba"
        y_grad = NF.layer_norm(x, (769,), torch.ones(769, requires_grad=True))
        assert backends.last_used() == "numba"
    with backends.use("numba"):
        y_contiguous = NF.layer_norm(x.contiguous(), (769,))
        assert backends.last_used() == "numba"
    torch.testing.assert_close(y, y_contiguous, rtol=0, atol=0)
    torch.testing.assert_close(y_grad, y_contiguous, rtol=0, atol=0)


def _bfloat16_group_norm():
    x = torch.randn(4, 6, 5, dtype=torch.bfloat16)
    return NF.group_norm(x, 2, torch.ones(6, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (
            lambda: NF.layer_norm(torch.randn(4, 6, 5).transpose(0, 2), (6,), dim=1),
            "not contiguous",
        ),
        (_bfloat16_group_norm, "dtype torch.bfloat16: .* rows layout only"),
    ],
)
def test_forcing_numba_on_an_input_it_cannot_take_says_why(call, reason):
    with backends.use("numba"), pytest.raises(ValueError, match=reason):
        call()


def test_auto_takes_numba_for_the_layouts_it_was_written_for():
    cases = {
        "layer_norm": lambda: NF.layer_norm(torch.randn(3, 5), (5,)),
        "rms_norm": lambda: NF.rms_norm(torch.randn(3, 5), (5,)),
        "group_norm": lambda: NF.group_norm(torch.randn(2, 4, 5), 2, torch.ones(4)),
        "instance_norm": lambda: NF.instance_norm(torch.randn(2, 4, 5), weight=torch.ones(4)),
        "batch_norm": lambda: NF.batch_norm(torch.randn(6, 4, 5), None, None, training=True),
        "batch_norm_eval": lambda: NF.batch_norm(
            torch.randn(6, 4), torch.zeros(4), torch.ones(4), training=False
        ),
    }
    for name, call in cases.items():
        with backends.use("auto"):
            call()
        assert backends.last_used() == "numba", name
    with backends.use("composite"):
        cases["layer_norm"]()
    assert backends.last_used() == "composite"


def test_auto_leaves_small_inputs_to_torchs_op_or_the_composite(monkeypatch):
    monkeypatch.setattr(backends, "AUTO_MIN_ELEMENTS", 1 << 15)
    with backends.use("auto"):
        NF.layer_norm(torch.randn(4, 8, requires_grad=True), (8,))
        assert backends.last_used() == "torch"
        NF.layer_norm(torch.randn(4, 8), (8,))  # no gradient: the kernel by address
        assert backends.last_used() == "numba"
        NF.group_norm(torch.randn(4, 8, 3, requires_grad=True), 2)
        assert backends.last_used() == "torch"
        NF.group_norm(torch.randn(4, 8, 3), 2)  # no parameters, no gradient: rows by address
        assert backends.last_used() == "numba"
        NF.group_norm(torch.randn(4, 8, 3), 2, lengths=torch.tensor([3, 2, 1, 3]))
        assert backends.last_used() == "composite"  # masked: no torch op computes it
        NF.layer_norm(torch.randn(64, 512), (512,))
        assert backends.last_used() == "numba"
    with backends.use("numba"):
        NF.layer_norm(torch.randn(4, 8), (8,))
        assert backends.last_used() == "numba"


def test_backend_names_are_checked_and_use_restores():
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.set_backend("cuda")
    before = backends.get_backend()
    with backends.use("composite"):
        assert backends.get_backend() == "composite"
    assert backends.get_backend() == before


def test_numba_threads_follow_torch_and_small_inputs_run_on_one():
    threads = torch.get_num_threads()
    big = torch.randn(64, 1024)
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with backends.use("numba"):
                NF.layer_norm(big, (1024,))
            assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)
            with backends.use("numba"):  # (without a gradient a planned call runs the
                # serial kernel on the calling thread, leaving Numba's count as it is)
                NF.layer_norm(torch.randn(4, 8, requires_grad=True), (8,))
            assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_the_first_kernel_call_keeps_the_users_torch_thread_count():
    """Starting Numba's OpenMP pool resets OpenMP's thread count; normlab restores torch's.
    A fresh process, so that the pool starts in it."""
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "import normlab.functional as F\n"
        "from normlab import backends\n"
        "with backends.use('numba'): F.layer_norm(torch.randn(300, 200), (200,))\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_cache_dir_falls_back_when_the_package_is_read_only(monkeypatch, tmp_path):
    """A read-only install (and a read-only home) must not make the first call fail: the
    cache goes to the user's cache directory, else the temporary directory."""
    from pathlib import Path

    from normlab.kernels.cpu import runtime

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    writable = {"package": False, "user": True}

    def fake_writable(path: Path) -> bool:
        if "__pycache__" in str(path):
            return writable["package"]
        if str(path).startswith(str(tmp_path)):
            return writable["user"]
        return True  # the temporary directory

    monkeypatch.setattr(runtime, "_writable", fake_writable)
    assert runtime._choose_cache_dir() == str(tmp_path / "cache" / "normlab" / "numba")
    writable["user"] = False
    assert "normlab-numba-" in runtime._choose_cache_dir()
    writable["package"] = True
    assert runtime._choose_cache_dir() is None  # Numba's own place, next to the source
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert runtime._choose_cache_dir() is None  # the user's choice stands


# --- custom ops, autograd, compile ----------------------------------------------------------


def _opcheck_cases():
    x2 = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w7 = torch.randn(7, dtype=torch.float64, requires_grad=True)
    x3 = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    w6 = torch.randn(6, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(4, 5, dtype=torch.uint8)
    mask[1, 3:] = 0
    return [
        (fused_rows.row_norm, (x2, w7, w7.detach().clone(), 1e-5, True)),
        (fused_rows.row_norm, (x2, None, None, 1e-6, False)),
        (fused_rows.add_row_norm, (x2, x2.detach().clone(), w7, None, 1e-5, True)),
        (fused_groups.group_norm, (x3, w6, w6.detach().clone(), 3, 1e-5, mask)),
        (fused_channels.batch_norm_train, (x3, w6, None, 1e-5, mask)),
        (fused_channels.batch_norm_given, (x3, w6, None, w6.detach(), w6.detach().abs(), 1e-5)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_custom_ops_pass_torch_opcheck(case):
    """Schema, fake (meta) implementation, autograd registration and aot_dispatch."""
    run, args = _opcheck_cases()[case]
    torch.library.opcheck(run.op, args)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (lambda x, w, b: NF.layer_norm(x, (7,), w, b), (5, 7), 7),
        lambda: (lambda x, w, b: NF.group_norm(x, 2, w, b), (3, 4, 5), 4),
        lambda: (lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True), (6, 4, 3), 4),
    ],
    ids=["rows", "groups", "channels"],
)
def test_gradcheck_and_double_backward_through_the_kernels(make):
    fn, shape, c = make()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    with backends.use("numba"):
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = normlab.LayerNorm(16)
        self.rms = normlab.RMSNorm(16)
        self.bn = normlab.BatchNorm(16, dim=-1)
        self.gn = normlab.GroupNorm(4, 16)
        self.inorm = normlab.InstanceNorm1d(16, affine=True)
        self.linear = nn.Linear(16, 16)

    def forward(self, x, residual, lengths):
        h, s = NF.add_layer_norm(x, residual, 16, self.ln.weight, self.ln.bias)
        h = self.rms(self.linear(h))
        h = self.bn(h, lengths=lengths)
        h = self.gn(h.transpose(1, 2).contiguous())
        h = self.inorm(h, lengths=lengths)
        return h.transpose(1, 2) + s


def test_torch_compile_fullgraph_runs_the_kernels_with_no_graph_break():
    torch._dynamo.reset()
    model = _Block()
    x, r = torch.randn(4, 9, 16), torch.randn(4, 9, 16)
    lengths = torch.tensor([9, 5, 7, 2])
    eager = _Block()
    eager.load_state_dict(model.state_dict())
    seen = {"fw": set(), "bw": set()}
    with backends.use("numba"):
        compiled = torch.compile(model, fullgraph=True, backend=recording_backend(seen))
        out = compiled(x, r, lengths)
        out.sum().backward()
        want = eager(x, r, lengths)
        want.sum().backward()
    for op in ("add_row_norm", "row_norm", "batch_norm_train", "group_norm"):
        assert f"normlab.{op}.default" in seen["fw"], op
    for op in ("row_norm_backward", "batch_norm_backward", "group_norm_backward"):
        assert f"normlab.{op}.default" in seen["bw"], op
    torch.testing.assert_close(out, want, **tol(torch.float32))
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **grad_tol(torch.float32), msg=name)


def test_inductor_compiles_a_model_with_the_custom_ops():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 8), normlab.LayerNorm(8), normlab.RMSNorm(8))
    x = torch.randn(5, 8)
    with backends.use("numba"):
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x), **tol(torch.float32))


# --- determinism ------------------------------------------------------------------------------


def _all_outputs(x, w, b, mask_lengths):
    outs = []
    for fn in (
        lambda x, w, b: NF.layer_norm(x.reshape(-1, 64), (64,), w, b),
        lambda x, w, b: NF.batch_norm(
            x.reshape(32, 64, -1), None, None, w, b, training=True, lengths=mask_lengths
        ),
        lambda x, w, b: NF.group_norm(x.reshape(32, 64, -1), 8, w, b, lengths=mask_lengths),
    ):
        y, _, grads, used = _run("numba", fn, x, w, b)
        assert used == "numba"
        outs += [y, *grads]
    return outs


def test_two_runs_and_thread_counts_give_identical_bits():
    x = torch.randn(32 * 64 * 40)
    w, b = torch.randn(64), torch.randn(64)
    lengths = torch.randint(2, 41, (32,))
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (threads, threads, 1):
            torch.set_num_threads(n)
            torch.manual_seed(3)  # the same upstream gradients
            runs.append(_all_outputs(x, w, b, lengths))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b_ in zip(runs[0], run, strict=True):
            assert torch.equal(a, b_)


def test_kernel_output_agrees_with_torch_nn():
    x = torch.randn(7, 769)
    with backends.use("numba"):
        y = NF.layer_norm(x, (769,))
    torch.testing.assert_close(y, TF.layer_norm(x, (769,)), **tol(torch.float32))


@pytest.mark.parametrize("backend", ["numba", "composite"])
def test_power_norm_after_warmup_under_torch_compile_equals_eager(backend):
    """The approximate backward updates nu in place: under torch.compile it runs eagerly (a
    graph break, ``torch.compiler.disable``), since a traced version gave other numbers."""
    x = torch.randn(4, 8, 6)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(1)  # the same buffers and parameters for both runs
        phi, nu = torch.rand(6) + 0.5, torch.zeros(6)
        w = torch.randn(6, requires_grad=True)
        b = torch.randn(6, requires_grad=True)

        def step(x, phi=phi, nu=nu, w=w, b=b):
            return NF.power_norm(x, phi, nu, w, b, True, 0.1, 0.9, 1e-5, dim=-1, warmup=False)

        fn = torch.compile(step, backend="aot_eager") if compiled else step
        with backends.use(backend):
            for _ in range(2):
                y = fn(x)
                y.backward(torch.ones_like(y))
        results.append((y.detach(), w.grad, b.grad, phi, nu))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, **grad_tol(torch.float32))
