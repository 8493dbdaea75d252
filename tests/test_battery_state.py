"""Edge-case battery, state and autograd modes (issue #8 items 11, 12, 14), over every norm
and backend.

11. Determinism: two runs give identical bits (outputs, gradients, running statistics) at a
    fixed thread count; the Numba kernels give identical bits for any thread count, the
    composite backend the same numbers to rounding (torch's reductions).
12. state_dict: torch.nn checkpoints with and without ``num_batches_tracked``,
    ``strict=False`` reports what it skipped, meta-device modules load with ``assign=True``,
    and ``torch.save``/``torch.load(weights_only=True)`` round trips (PowerNorm and
    BatchRenorm too; tests/test_state_dict.py has the torch.nn classes).
14. Autograd modes: ``torch.no_grad`` and ``inference_mode`` give the grad-mode outputs and
    running statistics without a graph; inputs with ``requires_grad=False`` give the same
    parameter gradients; double backward equals torch.nn's (or gradgradcheck where torch has
    no such norm), and PowerNorm's approximate backward refuses it with a clear error.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

import normlab
from battery_cases import CASES, over_backends, over_cases
from normlab import backends
from tolerances import grad_tol, tol


def _run(module, x, dy, *, x_requires_grad=True):
    leaf = x.detach().clone().requires_grad_(x_requires_grad)
    y = module(leaf)
    y.backward(dy)
    grads = [p.grad.clone() for p in module.parameters()]
    return [y.detach(), *([leaf.grad] if x_requires_grad else []), *grads, *module.buffers()]


def _assert_same(first, second, what):
    assert len(first) == len(second), what
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(a, b), f"{what}: tensor {i} differs"


def _big(case):
    """The case's input with enough rows for every backend to use several threads."""
    rows = max(2, (1 << 17) // max(1, torch.Size(case.shape[1:]).numel()))
    return case.with_batch(rows)


# --- 11. determinism -----------------------------------------------------------------------


@over_backends
@over_cases
def test_two_runs_give_identical_bits(case, backend):
    shape = _big(case)
    module = case.make()
    x, dy = torch.randn(shape), torch.randn(shape)
    first = _run(copy.deepcopy(module), x, dy)
    second = _run(copy.deepcopy(module), x, dy)
    _assert_same(first, second, "second run")


@over_backends
@over_cases
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_thread_count_changes_no_bit_on_numba_and_only_rounding_on_composite(case, dtype, backend):
    """float64 too: the kernels' float64 sums of float32 data mostly round to the same
    float32 whatever their order, float64 outputs show any change of order."""
    shape = _big(case)
    module = case.make(dtype)
    x, dy = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(copy.deepcopy(module), x, dy)
        used = backends.last_used()
        torch.set_num_threads(max(2, threads))
        many = _run(copy.deepcopy(module), x, dy)
    finally:
        torch.set_num_threads(threads)
    if used == "numba":  # fixed blocks, summed in order: the documented guarantee
        _assert_same(one, many, "thread count")
    else:
        for a, b in zip(one, many, strict=True):
            torch.testing.assert_close(a, b, **grad_tol(dtype))


# --- 12. state_dict ------------------------------------------------------------------------

# Every norm module class, constructed with its non-default state (trained buffers).
CLASSES = {
    "LayerNorm": lambda **f: normlab.LayerNorm(6, **f),
    "RMSNorm": lambda **f: normlab.RMSNorm(6, **f),
    "BatchNorm1d": lambda **f: normlab.BatchNorm1d(6, **f),
    "BatchNorm-dim-1": lambda **f: normlab.BatchNorm(6, dim=-1, **f),
    "SyncBatchNorm": lambda **f: normlab.SyncBatchNorm(6, **f),
    "BatchRenorm1d": lambda **f: normlab.BatchRenorm1d(6, **f),
    "GroupNorm": lambda **f: normlab.GroupNorm(3, 6, **f),
    "InstanceNorm1d": lambda **f: normlab.InstanceNorm1d(
        6, affine=True, track_running_stats=True, **f
    ),
    "PowerNorm": lambda **f: normlab.PowerNorm(6, warmup_iters=1, **f),
}
SHAPE = {name: (4, 5, 6) for name in ("LayerNorm", "RMSNorm", "BatchNorm-dim-1", "PowerNorm")}


def _trained(name, steps=3):
    module = CLASSES[name]()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    module.train()
    for _ in range(steps):
        x = torch.randn(SHAPE.get(name, (4, 6, 5))) * 2 + 0.5
        module(x).square().sum().backward()  # PowerNorm's backward updates a buffer
    return module


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _same_outputs(a, b, name):
    for training in (False, True):
        a.train(training)
        b.train(training)
        x = torch.randn(SHAPE.get(name, (4, 6, 5)))
        torch.testing.assert_close(a(x), b(x), **tol(torch.float32))


@pytest.mark.parametrize("name", list(CLASSES))
def test_save_load_weights_only_round_trip(name, tmp_path):
    trained = _trained(name)
    path = tmp_path / "norm.pt"
    torch.save(trained.state_dict(), path)
    fresh = CLASSES[name]()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    _same_state(fresh, trained)
    _same_outputs(fresh, trained, name)


@pytest.mark.parametrize("name", list(CLASSES))
def test_meta_device_module_loads_with_assign(name):
    trained = _trained(name)
    with torch.device("meta"):
        empty = CLASSES[name]()
    assert all(t.is_meta for t in empty.state_dict().values())
    # assign=True takes the tensors themselves: a copy, so trained keeps its own
    empty.load_state_dict(copy.deepcopy(trained.state_dict()), strict=True, assign=True)
    assert not any(t.is_meta for t in empty.state_dict().values())
    _same_state(empty, trained)
    for p in empty.parameters():
        assert isinstance(p, nn.Parameter) and p.requires_grad
    _same_outputs(empty, trained, name)


@pytest.mark.parametrize("name", ["BatchNorm1d", "InstanceNorm1d", "BatchRenorm1d"])
def test_meta_device_module_loads_an_old_checkpoint_without_num_batches_tracked(name):
    """A version-1 checkpoint (before num_batches_tracked) into a meta module with assign:
    the count starts at 0 on the CPU, not as a meta tensor."""
    trained = _trained(name)
    old = OrderedDict((k, v) for k, v in trained.state_dict().items() if "num_batches" not in k)
    old._metadata = OrderedDict({"": {"version": 1}})
    with torch.device("meta"):
        empty = CLASSES[name]()
    empty.load_state_dict(old, strict=True, assign=True)
    assert empty.num_batches_tracked.device.type == "cpu"
    assert int(empty.num_batches_tracked) == 0


@pytest.mark.parametrize("name", ["BatchNorm1d", "InstanceNorm1d", "PowerNorm"])
def test_strict_false_loads_what_is_there_and_reports_the_rest(name):
    trained = _trained(name)
    state = trained.state_dict()
    dropped = next(k for k in state if k.startswith("running"))
    partial = OrderedDict((k, v) for k, v in state.items() if k != dropped)
    partial["unknown.extra"] = torch.zeros(1)
    fresh = CLASSES[name]()
    before = fresh.state_dict()[dropped].clone()
    result = fresh.load_state_dict(partial, strict=False)
    assert result.missing_keys == [dropped]
    assert result.unexpected_keys == ["unknown.extra"]
    assert torch.equal(fresh.state_dict()[dropped], before)  # left as it was
    for key, value in partial.items():
        if key != "unknown.extra":
            assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match=dropped):
        CLASSES[name]().load_state_dict(partial, strict=True)


@pytest.mark.parametrize("cls", ["BatchNorm1d", "InstanceNorm1d"])
def test_current_torch_checkpoint_without_num_batches_tracked_loads_non_strictly(cls):
    """A current (version 2) torch checkpoint stripped of num_batches_tracked: strict loading
    refuses it as torch does; strict=False keeps the module's own count."""
    source = getattr(nn, cls)(6, affine=True, track_running_stats=True)
    source.train()
    source(torch.randn(4, 6, 5))
    state = OrderedDict((k, v) for k, v in source.state_dict().items() if "num_batches" not in k)
    state._metadata = source.state_dict()._metadata
    ours = getattr(normlab, cls)(6, affine=True, track_running_stats=True)
    theirs = getattr(nn, cls)(6, affine=True, track_running_stats=True)
    for module in (ours, theirs):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            module.load_state_dict(state, strict=True)
        result = module.load_state_dict(state, strict=False)
        assert result.missing_keys == ["num_batches_tracked"]
    assert torch.equal(ours.running_var, source.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 0


# --- 14. autograd modes --------------------------------------------------------------------


def _outputs_and_buffers(module, x):
    y = module(x)
    return [y, *[b.clone() for b in module.buffers()]]


@over_backends
@over_cases
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode_give_the_grad_mode_numbers(case, mode, backend):
    module = case.make()
    x = torch.randn(case.shape)
    with_grad = _outputs_and_buffers(copy.deepcopy(module), x)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        without = _outputs_and_buffers(module, x)
    y = without[0]
    assert not y.requires_grad and y.grad_fn is None
    assert y.is_inference() == (mode == "inference_mode")
    _assert_same([with_grad[0].detach(), *with_grad[1:]], without, mode)
    # the module still trains afterwards (inference mode left no inference-only buffers)
    module(torch.randn(case.shape).requires_grad_()).sum().backward()


@over_backends
@over_cases
def test_input_without_requires_grad_gives_the_same_parameter_gradients(case, backend):
    module = case.make()
    x, dy = torch.randn(case.shape), torch.randn(case.shape)
    with_x = _run(copy.deepcopy(module), x, dy)
    without_x = _run(copy.deepcopy(module), x, dy, x_requires_grad=False)
    # drop dx from the first list: outputs, parameter gradients and buffers must agree
    _assert_same([with_x[0], *with_x[2:]], without_x, "requires_grad=False input")


@over_backends
@over_cases
def test_frozen_parameters_give_the_same_input_gradient(case, backend):
    module = case.make()
    x, dy = torch.randn(case.shape), torch.randn(case.shape)
    frozen = copy.deepcopy(module).requires_grad_(False)
    leaf, frozen_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    module(leaf).backward(dy)
    frozen(frozen_leaf).backward(dy)
    torch.testing.assert_close(frozen_leaf.grad, leaf.grad, **grad_tol(torch.float32))
    assert all(p.grad is None for p in frozen.parameters())


def _penalty_gradients(module, x):
    """Gradients of a gradient penalty: |d(sum y * v)/d(x, params)|^2 differentiated again."""
    inputs = [x, *module.parameters()]
    y = module(x)
    v = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    first = torch.autograd.grad((y * v).sum(), inputs, create_graph=True)
    penalty = sum(g.square().sum() for g in first if g.requires_grad)
    return torch.autograd.grad(penalty, inputs, allow_unused=True)


@over_backends
@pytest.mark.parametrize("case", [c for c in CASES.values() if c.torch_twin], ids=lambda c: c.name)
def test_double_backward_equals_torch(case, backend):
    module = case.make(torch.float64)
    twin = case.twin(module)
    x = torch.randn(case.shape, dtype=torch.float64)
    ours = _penalty_gradients(module, x.clone().requires_grad_())
    theirs = _penalty_gradients(twin, x.clone().requires_grad_())
    for a, b in zip(ours, theirs, strict=True):
        if a is None or b is None:
            assert a is None or not a.any()
            assert b is None or not b.any()
            continue
        torch.testing.assert_close(a, b, **grad_tol(torch.float64))


@over_backends
@pytest.mark.parametrize("name", ["BatchRenorm1d", "PowerNorm-warmup", "RMSNorm"])
def test_double_backward_where_torch_has_no_twin_passes_gradgradcheck(name, backend):
    case = CASES[name]
    # Batch Renorm's r and d are constants of the gradient by design, so its gradient is
    # the derivative only where they clip: r_max=1, d_max=0 clips always.
    options = {"r_max": 1.0, "d_max": 0.0} if name == "BatchRenorm1d" else {}
    module = case.make(torch.float64, **options)
    shape = case.with_batch(3)

    def fn(x):
        return copy.deepcopy(module)(x)  # the same running statistics at every call

    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-5)


@over_backends
def test_power_norm_after_warmup_refuses_double_backward_clearly(backend):
    """Its backward is the paper's approximation, not the gradient of the forward: there is
    no second derivative to take, and create_graph=True must not silently give a gradient
    without a graph (a gradient penalty would then quietly be left out)."""
    module = CASES["PowerNorm-after-warmup"].make(torch.float64)
    x = torch.randn(6, 5, 4, dtype=torch.float64, requires_grad=True)
    y = module(x)
    with pytest.raises(RuntimeError, match=r"PowerNorm.*first-order.*create_graph"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    # first order still works
    module(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
