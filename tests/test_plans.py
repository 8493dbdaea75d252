"""Per-call plans (``normlab.backends.plans``): a LayerNorm/RMSNorm signature is decided once;
later calls run the runner that decision left, with the same result, and every change the
checks or the decision would see (shape, dtype, contiguity, parameters, eps, backend,
thresholds, a half-precision gradient, tracing) takes the full path again."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab import backends
from normlab import functional as F
from normlab.backends import plans, registry
from normlab.checks import InputError


@pytest.fixture
def decisions(monkeypatch):
    """The list of calls ``registry.decide`` saw (each a full-path call)."""
    seen = []
    decide = registry.decide

    def counting(call):
        seen.append(call)
        return decide(call)

    monkeypatch.setattr(registry, "decide", counting)
    return seen


def _unplanned(fn, *args, **kwargs):
    plans.clear()
    try:
        return fn(*args, **kwargs)
    finally:
        plans.clear()


@pytest.mark.parametrize("backend", ["auto", "torch", "numba", "triton", "composite"])
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_a_signature_is_decided_once_and_its_plan_gives_the_full_paths_result(
    name, backend, decisions
):
    if backend == "numba" and not backends.numba_available():
        pytest.skip("numba is not installed")
    if backend == "triton" and not backends.triton_available():
        pytest.skip("triton is not installed")
    fn = getattr(F, name)
    x = torch.randn(6, 33) * 3 + 2
    w = torch.randn(33, requires_grad=True)
    with backends.use(backend):
        first = fn(x, (33,), w)
        ran = backends.last_used()
        again = [fn(x, (33,), w) for _ in range(3)]
        backends.record(None)
        fn(x, (33,), w)
        assert backends.last_used() == ran  # a planned call records its family too
    planned = backend != "composite"  # the composite leaves no runner: full path each time
    assert len(decisions) == (1 if planned else 5)
    for y in again:
        torch.testing.assert_close(y, first, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_planned_gradients_equal_the_full_paths(name, backend):
    fn = getattr(F, name)
    x0 = torch.randn(4, 40, dtype=torch.float64) + 5
    w0 = torch.randn(40, dtype=torch.float64)
    grads = []
    with backends.use(backend):
        for _ in range(3):  # first: full path; then the plan, under grad and under no_grad
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            y = fn(x, (40,), w)
            (y * torch.arange(40.0, dtype=torch.float64)).sum().backward()
            grads.append((y.detach(), x.grad, w.grad))
        with torch.no_grad():
            torch.testing.assert_close(fn(x0, (40,), w0), grads[0][0], rtol=0, atol=0)
    for got in grads[1:]:
        for a, b in zip(got, grads[0], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.autograd.gradcheck(lambda x, w: fn(x, (40,), w), (x, w))  # through the plan


def test_every_input_change_the_checks_read_takes_the_full_path(decisions):
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    F.layer_norm(x, (8,), w, b)
    variants = [
        lambda: F.layer_norm(torch.randn(5, 8), (8,), w, b),  # shape
        lambda: F.layer_norm(x.double(), (8,), w.double(), b.double()),  # dtype
        lambda: F.layer_norm(torch.randn(8, 4).t(), (8,), w, b),  # strides
        lambda: F.layer_norm(x, (8,), w, None),  # parameters
        lambda: F.layer_norm(x, (8,), w, b, eps=1e-3),  # eps
        lambda: F.layer_norm(x, (8,), w, b, dim=-1),  # dim
        lambda: F.rms_norm(x, (8,), w),  # the norm
    ]
    for n, variant in enumerate(variants, start=2):
        variant()
        assert len(decisions) == n
        variant()
        assert len(decisions) == n  # and is planned in turn


def test_bad_arguments_after_a_planned_call_still_raise():
    x, w = torch.randn(4, 8), torch.randn(8)
    F.layer_norm(x, (8,), w)
    F.layer_norm(x, (8,), w)
    with pytest.raises(InputError, match="weight must have shape"):
        F.layer_norm(x, (8,), torch.randn(7))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        F.layer_norm(x, (8,), w, eps=-1.0)
    with pytest.raises(InputError, match="trailing shape"):
        F.layer_norm(torch.randn(4, 9), (8,), w)
    with pytest.raises(TypeError, match=r"weight must be a torch\.Tensor or None"):
        F.layer_norm(x, (8,), [1.0] * 8)


def test_the_backend_and_the_thresholds_are_part_of_the_decision(monkeypatch):
    x = torch.randn(16, 64, requires_grad=True)  # with a gradient: the training bounds
    with backends.use("auto"):
        F.layer_norm(x, (64,))
        assert backends.last_used() == "numba"  # conftest: the kernels from 0 elements
        monkeypatch.setattr(backends, "AUTO_TORCH_TRAINING_ELEMENTS", (1 << 20, 1 << 18, 1 << 20))
        F.layer_norm(x, (64,))
        assert backends.last_used() == "torch"
    with backends.use("composite"):
        F.layer_norm(x, (64,))
        assert backends.last_used() == "composite"


def test_a_gradient_is_part_of_the_decision(monkeypatch):
    """The same shapes with and without a gradient are two decisions: without one the
    rows kernel at any size (by address), with one torch's op below
    AUTO_TORCH_TRAINING_ELEMENTS; torch's half-precision LayerNorm is refused a gradient
    (normlab's tolerance), so a bfloat16 one runs the kernel."""
    monkeypatch.setattr(backends, "AUTO_TORCH_TRAINING_ELEMENTS", (1 << 20, 1 << 18, 1 << 20))
    with backends.use("auto"):
        for dtype, trained in ((torch.float32, "torch"), (torch.bfloat16, "numba")):
            x = torch.randn(4, 16, dtype=dtype)
            F.layer_norm(x, (16,))
            assert backends.last_used() == "numba"
            xg = x.clone().requires_grad_()
            F.layer_norm(xg, (16,)).float().sum().backward()
            assert backends.last_used() == trained
            assert xg.grad is not None and xg.grad.dtype == dtype
            F.layer_norm(xg, (16,)).float().sum().backward()  # planned
            assert backends.last_used() == trained
            with torch.no_grad():
                F.layer_norm(xg, (16,))
            assert backends.last_used() == "numba"


def test_tracing_and_unhashable_arguments_take_the_full_path(decisions):
    m = normlab.LayerNorm(8)
    x = torch.randn(3, 8)
    m(x)
    m(x)
    assert len(decisions) == 1
    traced = torch.jit.trace(m, x, check_trace=False)
    assert len(decisions) == 2  # tracing decides anew (the exporters read the decision)
    torch.testing.assert_close(traced(x), m(x))
    F.layer_norm(x, [8])  # a list (as tuple in the key): planned like the tuple
    F.layer_norm(x, [8], dim=[-1])
    F.layer_norm(x, [8])
    F.layer_norm(x, [8], dim=[-1])
    assert len(decisions) == 4
    F.layer_norm(x, (8,), eps=torch.tensor(1e-5))  # a tensor eps: no key
    F.layer_norm(x, (8,), eps=torch.tensor(1e-5))
    assert len(decisions) == 6


def test_compiled_calls_do_not_use_plans():
    m = normlab.RMSNorm(16)
    x = torch.randn(4, 16)
    eager = m(x)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    torch.testing.assert_close(compiled(x), eager)


def test_the_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(plans, "MAX_PLANS", 4)
    for n in range(1, 12):
        F.layer_norm(torch.randn(n, 8), (8,))
    assert 0 < len(plans._plans) <= 4
    assert _unplanned(F.layer_norm, torch.ones(2, 8), (8,)).abs().max() == 0


@pytest.mark.parametrize("shape", [(4, 6, 50), (4, 6), (2, 6, 5, 5)])
@pytest.mark.parametrize("backend", ["auto", "torch", "numba", "composite"])
def test_batch_norm_eval_is_planned_exact_and_differentiable(backend, shape, decisions):
    """BatchNorm with running statistics: decided once per signature, and exact on data far
    from zero in float32 (torch's own eval op loses 0.1 there; normlab hands it x - mean)."""
    x0 = (1e4 + 1e-3 * torch.randn(*shape, dtype=torch.float64)).float()
    axes = tuple(d for d in range(x0.dim()) if d != 1)
    mean = x0.double().mean(axes).float()
    var = x0.double().var(axes, unbiased=False).float()
    w, b = torch.randn(6), torch.randn(6)
    want = torch.nn.functional.batch_norm(
        x0.double(), mean.double(), var.double(), w.double(), b.double()
    )
    outs, grads = [], []
    with backends.use(backend):
        for _ in range(3):
            x, wg = x0.clone().requires_grad_(), w.clone().requires_grad_()
            y = F.batch_norm(x, mean, var, wg, b)
            y.sum().backward()
            outs.append(y.detach())
            grads.append((x.grad, wg.grad))
        with torch.no_grad():
            outs.append(F.batch_norm(x0, mean, var, w, b))
    # one decision with a gradient, one without (the gradient is part of the signature)
    assert len(decisions) == (4 if backend == "composite" else 2)
    for y in outs:
        torch.testing.assert_close(y.double(), want, rtol=0, atol=2e-6)
    for got in grads[1:]:
        for a, c in zip(got, grads[0], strict=True):
            torch.testing.assert_close(a, c, rtol=0, atol=0)
    scale = (w / (var + 1e-5).sqrt()).view((6,) + (1,) * (x0.dim() - 2))
    torch.testing.assert_close(grads[0][0], scale.expand(shape))


def test_batch_norm_module_in_eval_uses_its_plan_after_a_training_step(decisions):
    m = normlab.BatchNorm1d(6)
    x = torch.randn(8, 6, 5)
    m(x)  # training: batch statistics, not planned
    m.eval()
    first = m(x)
    n = len(decisions)
    torch.testing.assert_close(m(x), first, rtol=0, atol=0)
    assert len(decisions) == n
    with torch.no_grad():
        m.running_mean.add_(1.0)  # new values, same signature: the plan reads them
    torch.testing.assert_close(m(x), first - 1.0 / (m.running_var + m.eps).sqrt()[:, None])


@pytest.mark.parametrize("backend", ["auto", "torch", "numba"])
@pytest.mark.parametrize("norm", ["group", "instance"])
def test_group_and_instance_norm_are_planned_and_exact(norm, backend, decisions):
    """GroupNorm/InstanceNorm without a mask: decided once per signature; torch's op is
    handed each group shifted by its first element (its own float32 op loses 0.16 on
    1e4 + 1e-3 noise)."""
    x0 = (1e4 + 1e-3 * torch.randn(2, 6, 5, 7, dtype=torch.float64)).float()
    w, b = torch.randn(6), torch.randn(6)
    if norm == "group":

        def run(x, w):
            return F.group_norm(x, 3, w, b.to(x.dtype))

        want = torch.nn.functional.group_norm(x0.double(), 3, w.double(), b.double())
    else:

        def run(x, w):
            return F.instance_norm(x, weight=w, bias=b.to(x.dtype))

        want = torch.nn.functional.instance_norm(x0.double(), weight=w.double(), bias=b.double())
    outs, grads = [], []
    with backends.use(backend):
        for _ in range(3):
            x, wg = x0.clone().requires_grad_(), w.clone().requires_grad_()
            y = run(x, wg)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            outs.append(y.detach())
            grads.append((x.grad, wg.grad))
        with torch.no_grad():
            outs.append(run(x0, w))
        ran = backends.last_used()
    assert ran == ("numba" if backend == "auto" else backend)  # conftest: kernels from 0
    assert len(decisions) == 2  # with a gradient, then without
    for y in outs:
        torch.testing.assert_close(y.double(), want, rtol=0, atol=2e-5)
    for got in grads[1:]:
        for a, c in zip(got, grads[0], strict=True):
            torch.testing.assert_close(a, c, rtol=0, atol=0)
    x = x0[:1, :, :2, :3].double().requires_grad_()
    with backends.use(backend if backend != "numba" else "torch"):
        torch.autograd.gradgradcheck(lambda x: run(x, w.double()), (x,))


def test_group_norm_keeps_channels_last_on_a_planned_call():
    m = normlab.GroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    first, again = m(x), m(x)
    for y in (first, again):
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["numba", "torch", "auto"])
def test_planned_calls_on_non_contiguous_inputs(backend):
    """The kernels read a contiguous copy of a strided input (GroupNorm's grouped view makes
    one; LayerNorm's rows one copy): the planned call does the same."""
    x = torch.randn(2, 3, 4, 8).transpose(1, 3)  # (2, 8, 4, 3), not contiguous
    weight = torch.randn(8)
    for w in (None, weight):  # (with a weight the kernel runs by address on the copy)
        with backends.use(backend), torch.no_grad():
            first = F.group_norm(x, 4, w)
            again = [F.group_norm(x, 4, w) for _ in range(2)]
            rows = [F.layer_norm(x, (3,)) for _ in range(2)]
            torch.testing.assert_close(rows[1], rows[0], rtol=0, atol=0)
        for y in again:
            torch.testing.assert_close(y, first, rtol=0, atol=0)
        want = torch.nn.functional.group_norm(x.double(), 4, None if w is None else w.double())
        torch.testing.assert_close(first, want.float())


_HALF = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape, normalized",
    [((1, 4096), (4096,)), ((3, 5, 6, 7), (6, 7)), ((24, 4096), (4096,)), ((5, 1), (1,))],
)
@pytest.mark.parametrize("backend", ["numba", "auto"])
def test_inference_runs_the_rows_kernel_by_address_with_the_full_paths_bits(
    dtype, shape, normalized, backend
):
    """A LayerNorm/RMSNorm call without gradient runs the rows kernel by address once
    planned (``launchers.row_norm_inference``; serial below 64K elements, on the pool
    above: (24, 4096) is 98K): the same bits as the full path's first call, for inputs at
    an offset in their storage, strided and absent parameters, and parameters that change
    between calls of one plan."""
    if not backends.numba_available():
        pytest.skip("numba is not installed")
    torch.manual_seed(0)
    storage = torch.randn(2 * torch.Size(shape).numel(), dtype=torch.float64) * 3 + 100
    x = storage[1 : 1 + torch.Size(shape).numel()].view(shape).to(dtype)  # offset if float64
    params = [
        (torch.randn(normalized, dtype=dtype), torch.randn(normalized, dtype=dtype)),
        (None, None),
        (torch.randn(normalized, dtype=dtype), None),
        # strided: every other element of a longer tensor
        (
            torch.randn(2 * torch.Size(normalized).numel(), dtype=dtype)[::2].view(normalized),
            torch.randn(normalized, dtype=dtype),
        ),
    ]
    with backends.use(backend), torch.inference_mode():
        for weight, bias in params:
            for name, args in (
                ("layer_norm", (x, normalized, weight, bias)),
                ("rms_norm", (x, normalized, weight, 1e-6)),
            ):
                fn = getattr(F, name)
                first = _unplanned(fn, *args)
                planned = [fn(*args) for _ in range(2)]
                assert backends.last_used() == "numba"
                for y in planned:
                    assert y.dtype == dtype and y.shape == x.shape
                    torch.testing.assert_close(y, first, rtol=0, atol=0)
                # and the plan's runner with other parameters of the same signature
                if weight is not None:
                    other = torch.randn(normalized, dtype=dtype)
                    swapped = (x, normalized, other, *args[3:])
                    torch.testing.assert_close(
                        fn(*swapped), _unplanned(fn, *swapped), rtol=0, atol=0
                    )
    want = torch.nn.functional.layer_norm(x.double(), normalized)
    with backends.use(backend), torch.no_grad():
        got = F.layer_norm(x, normalized)
        got = F.layer_norm(x, normalized)  # planned
    atol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 0.05 if dtype in _HALF else 0)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)


def _strided_rows(kind, dtype):
    """(x, normalized_shape): a view whose rows of contiguous features are evenly spaced
    in a larger storage, as a split of a fused projection gives."""
    torch.manual_seed(0)

    def data(*shape):
        return (torch.randn(shape, dtype=torch.float64) * 3 + 100).to(dtype)

    if kind == "first-half":  # 64K elements: the pool
        return data(64, 2048)[:, :1024], (1024,)
    if kind == "middle-third":  # at an offset, two leading axes
        return data(2, 5, 24)[..., 8:16], (8,)
    if kind == "every-other-row":
        return data(6, 16)[::2], (16,)
    if kind == "expanded":  # one row read four times (step 0)
        return data(16).expand(4, 16), (16,)
    if kind == "every-other-element":  # not rows of contiguous features: one copy
        return data(6, 32)[:, ::2], (16,)
    if kind == "transposed":
        return data(16, 6).t(), (16,)
    return data(4, 2, 5, 6)[:, 0], (5, 6)  # two normalized axes, rows of 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "kind",
    [
        "first-half",
        "middle-third",
        "every-other-row",
        "expanded",
        "two-axes",
        "every-other-element",
        "transposed",
    ],
)
@pytest.mark.parametrize("backend", ["numba", "auto"])
def test_strided_rows_without_gradient_run_the_rows_kernel_by_address(dtype, kind, backend):
    """LayerNorm/RMSNorm without gradient of a strided view runs the rows kernel by address
    once planned: on the view itself where its rows (the normalized features, contiguous)
    are evenly spaced, else on one contiguous copy. The full path's bits (which normalize a
    contiguous copy), a C-contiguous output as torch's ops give, and the float64
    reference's values."""
    if not backends.numba_available():
        pytest.skip("numba is not installed")
    x, normalized = _strided_rows(kind, dtype)
    assert not x.is_contiguous()
    weight, bias = torch.randn(normalized, dtype=dtype), torch.randn(normalized, dtype=dtype)
    with backends.use(backend), torch.inference_mode():
        for name, args in (
            ("layer_norm", (x, normalized, weight, bias)),
            ("layer_norm", (x, normalized)),
            ("rms_norm", (x, normalized, weight, 1e-6)),
        ):
            fn = getattr(F, name)
            first = _unplanned(fn, *args)
            for _ in range(2):
                y = fn(*args)
                assert backends.last_used() == "numba"
                assert y.is_contiguous() and y.shape == x.shape and y.dtype == dtype
                torch.testing.assert_close(y, first, rtol=0, atol=0)
            # the plan is the by-address launch, not a copy and the kernel's op
            assert [r.__name__ for r in plans._plans.values()] == ["inference"]
            plans.clear()
        got = F.layer_norm(x, normalized, weight, bias)
    want = torch.nn.functional.layer_norm(x.double(), normalized, weight.double(), bias.double())
    atol = {torch.float32: 2e-5, torch.float64: 1e-12}.get(dtype, 0.1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)


@pytest.mark.parametrize("kind", ["first-half", "every-other-row", "two-axes"])
def test_strided_rows_with_a_gradient_run_the_kernel_on_one_copy(kind):
    """With a gradient the rows kernel normalizes a contiguous copy of the strided view (the
    copy is part of the graph): the gradients of the view's parent equal the float64
    reference's, and are zero where the view does not reach."""
    if not backends.numba_available():
        pytest.skip("numba is not installed")
    view, normalized = _strided_rows(kind, torch.float64)
    parent = view._base.detach().clone().requires_grad_()
    x = parent.as_strided(view.shape, view.stride(), view.storage_offset())
    weight = torch.randn(normalized, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(view.shape, dtype=torch.float64)
    with backends.use("numba"):
        y = F.layer_norm(x, normalized, weight)
        assert backends.last_used() == "numba"
    got = torch.autograd.grad(y, (parent, weight), grad)
    x_ref = parent.as_strided(view.shape, view.stride(), view.storage_offset())
    want = torch.autograd.grad(
        torch.nn.functional.layer_norm(x_ref, normalized, weight), (parent, weight), grad
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 96, 16, 16), (2, 5, 3), (4, 96, 32, 32)])
@pytest.mark.parametrize("backend", ["numba", "auto"])
def test_channels_first_inference_runs_the_column_kernel_by_address(dtype, shape, backend):
    """LayerNorm/RMSNorm over axis 1 (ConvNeXt's channels-first LayerNorm) without gradient
    runs the column kernel by address once planned (serial, and on the pool for (4, 96, 32,
    32)): the full path's bits, and the float64 reference's values within tolerance."""
    if not backends.numba_available():
        pytest.skip("numba is not installed")
    torch.manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 100).to(dtype)
    weight, bias = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    with backends.use(backend), torch.no_grad():
        for name, args in (
            ("layer_norm", (x, (c,), weight, bias)),
            ("layer_norm", (x, (c,))),
            ("rms_norm", (x, (c,), weight, 1e-6)),
        ):
            fn = getattr(F, name)
            first = _unplanned(fn, *args, dim=1)
            for _ in range(2):
                y = fn(*args, dim=1)
                assert backends.last_used() == "numba"
                torch.testing.assert_close(y, first, rtol=0, atol=0)
        got = F.layer_norm(x, (c,), weight, bias, dim=1)
    moved = x.double().movedim(1, -1)
    want = torch.nn.functional.layer_norm(moved, (c,), weight.double(), bias.double())
    atol = 2e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), want.movedim(-1, 1), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape, dim", [((1, 64, 7, 7), 1), ((2, 5, 3), 1), ((8, 64, 32, 32), 1), ((3, 4, 64), -1)]
)
@pytest.mark.parametrize("backend", ["numba", "auto"])
def test_batch_norm_eval_without_gradient_runs_the_channels_kernel_by_address(
    dtype, shape, dim, backend
):
    """BatchNorm with given statistics and no gradient runs the channels kernel by address
    once planned (serial; on the pool for (8, 64, 32, 32); channels last for dim=-1): the
    full path's bits, with and without parameters, and exact on data far from zero
    (float64 arithmetic: (x - mean) * rstd * weight + bias)."""
    if not backends.numba_available():
        pytest.skip("numba is not installed")
    torch.manual_seed(0)
    c = shape[dim]
    x = (1e4 + 1e-3 * torch.randn(shape, dtype=torch.float64)).to(dtype)
    axes = tuple(d for d in range(x.dim()) if d != dim % x.dim())
    mean = x.double().mean(axes).to(dtype)
    var = x.double().var(axes, unbiased=False).to(dtype)
    weight, bias = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    with backends.use(backend), torch.no_grad():
        for params in ((weight, bias), (None, None)):
            args = (x, mean, var, *params)
            first = _unplanned(F.batch_norm, *args, dim=dim)
            for _ in range(2):
                y = F.batch_norm(*args, dim=dim)
                assert backends.last_used() == "numba"
                torch.testing.assert_close(y, first, rtol=0, atol=0)
        got = F.batch_norm(x, mean, var, weight, bias, dim=dim)
    keep = tuple(c if d == dim % x.dim() else 1 for d in range(x.dim()))
    want = (x.double() - mean.double().view(keep)) / (var.double().view(keep) + 1e-5).sqrt()
    want = want * weight.double().view(keep) + bias.double().view(keep)
    atol = 2e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape, groups", [((1, 64, 7, 7), 32), ((2, 6, 5), 3), ((4, 64, 32, 32), 8), ((3, 8), 4)]
)
@pytest.mark.parametrize("backend", ["numba", "auto"])
def test_group_norm_without_gradient_runs_the_groups_kernel_by_address(
    dtype, shape, groups, backend
):
    """GroupNorm/InstanceNorm with parameters, no mask and no gradient run the groups kernel
    by address once planned (serial; on the pool for (4, 64, 32, 32); one position per
    channel for (3, 8)): the full path's bits, and exact on data far from zero."""
    if not backends.numba_available():
        pytest.skip("numba is not installed")
    torch.manual_seed(0)
    c = shape[1]
    x = (1e4 + 1e-3 * torch.randn(shape, dtype=torch.float64)).to(dtype)
    weight, bias = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    with backends.use(backend), torch.no_grad():
        calls = [("group_norm", (x, groups, weight, bias))]
        if x.dim() > 2:  # InstanceNorm needs positions
            calls.append(("instance_norm", (x, None, None, weight, bias)))
        for name, args in calls:
            fn = getattr(F, name)
            first = _unplanned(fn, *args)
            for _ in range(2):
                y = fn(*args)
                assert backends.last_used() == "numba"
                torch.testing.assert_close(y, first, rtol=0, atol=0)
        got = F.group_norm(x, groups, weight, bias)
    want = torch.nn.functional.group_norm(x.double() - 1e4, groups, weight.double(), bias.double())
    # float64: the data's condition (spread 1e-3 on 1e4) times float64's 1e-16
    atol = 1e-5 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)
