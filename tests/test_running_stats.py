"""Running statistics (running_mean, running_var, num_batches_tracked) behave exactly as in
torch.nn: checked against the torch.nn modules fed the same batches and against explicit
float64 arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab
from tolerances import tol

# ----------------------------------------------------------------------------------------------
# Pairs (normlab module, torch module, how to feed torch the same batch), channel count C = 3.

C = 3


def _identity(x):
    return x


def _channels_last_to_first(x):
    """(N, *, C) -> (N, C, *): torch's layout for normlab.BatchNorm(dim=-1)'s input."""
    return x.movedim(-1, 1)


# id: (normlab factory, torch factory, input shape, torch input transform, output back)
PAIRS = {
    "BatchNorm1d-2D": (normlab.BatchNorm1d, nn.BatchNorm1d, (8, C), _identity),
    "BatchNorm1d-3D": (normlab.BatchNorm1d, nn.BatchNorm1d, (6, C, 5), _identity),
    "BatchNorm2d": (normlab.BatchNorm2d, nn.BatchNorm2d, (4, C, 5, 6), _identity),
    "BatchNorm3d": (normlab.BatchNorm3d, nn.BatchNorm3d, (2, C, 4, 3, 5), _identity),
    "BatchNorm-dim-1-on-NLC": (
        lambda c, **kw: normlab.BatchNorm(c, dim=-1, **kw),
        nn.BatchNorm1d,
        (4, 7, C),
        _channels_last_to_first,
    ),
    "BatchNorm-dim-1-on-NHWC": (
        lambda c, **kw: normlab.BatchNorm(c, dim=-1, **kw),
        nn.BatchNorm2d,
        (3, 4, 5, C),
        _channels_last_to_first,
    ),
    "InstanceNorm1d-tracked": (
        lambda c, **kw: normlab.InstanceNorm1d(c, track_running_stats=True, **kw),
        lambda c, **kw: nn.InstanceNorm1d(c, track_running_stats=True, **kw),
        (4, C, 7),
        _identity,
    ),
    "InstanceNorm2d-tracked": (
        lambda c, **kw: normlab.InstanceNorm2d(c, track_running_stats=True, **kw),
        lambda c, **kw: nn.InstanceNorm2d(c, track_running_stats=True, **kw),
        (3, C, 5, 6),
        _identity,
    ),
}


def _batch(shape, dtype, channel_dim=1, scale=2.0):
    """Random batch whose channels have distinct, non-trivial means and spreads."""
    x = torch.randn(shape, dtype=torch.float64)
    view = [1] * len(shape)
    view[channel_dim] = shape[channel_dim]
    offset = torch.arange(1, shape[channel_dim] + 1, dtype=torch.float64).reshape(view)
    return (x * scale * offset + 3.0 * offset - 4.0).to(dtype)


def _channel_dim(torch_in):
    return -1 if torch_in is _channels_last_to_first else 1


def _assert_stats_equal(ours, theirs, dtype):
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol(dtype))
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol(dtype))
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


# ----------------------------------------------------------------------------------------------
# Against torch.nn, momentum 0.1 and 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.5])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_running_stats_after_k_training_steps_equal_torch(pair, momentum, dtype):
    make_ours, make_theirs, shape, torch_in = PAIRS[pair]
    ours = make_ours(C, momentum=momentum, dtype=dtype)
    theirs = make_theirs(C, momentum=momentum, dtype=dtype)
    for step in range(5):
        x = _batch(shape, dtype, _channel_dim(torch_in), scale=1.0 + step)
        y = ours(x)
        y_ref = theirs(torch_in(x))
        torch.testing.assert_close(torch_in(y), y_ref, **tol(dtype))
        _assert_stats_equal(ours, theirs, dtype)
    # The statistics really moved away from their initial values (the test is not vacuous).
    assert not torch.allclose(ours.running_mean, torch.zeros(C, dtype=dtype))
    assert not torch.allclose(ours.running_var, torch.ones(C, dtype=dtype))
    # ... and eval normalizes with them exactly as torch.
    ours.eval()
    theirs.eval()
    x = _batch(shape, dtype, _channel_dim(torch_in))
    torch.testing.assert_close(torch_in(ours(x)), theirs(torch_in(x)), **tol(dtype))


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_batchnorm_running_stats_follow_the_explicit_exponential_average(momentum):
    ours = normlab.BatchNorm2d(C, momentum=momentum, dtype=torch.float64)
    mean = torch.zeros(C, dtype=torch.float64)
    var = torch.ones(C, dtype=torch.float64)
    for _ in range(4):
        x = _batch((3, C, 4, 5), torch.float64)
        ours(x)
        per_channel = x.transpose(0, 1).reshape(C, -1)
        mean = (1 - momentum) * mean + momentum * per_channel.mean(1)
        var = (1 - momentum) * var + momentum * per_channel.var(1, correction=1)
    torch.testing.assert_close(ours.running_mean, mean, **tol(torch.float64))
    torch.testing.assert_close(ours.running_var, var, **tol(torch.float64))


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_instancenorm_running_stats_average_the_per_instance_statistics(momentum):
    ours = normlab.InstanceNorm1d(
        C, momentum=momentum, track_running_stats=True, dtype=torch.float64
    )
    mean = torch.zeros(C, dtype=torch.float64)
    var = torch.ones(C, dtype=torch.float64)
    for _ in range(3):
        x = _batch((4, C, 6), torch.float64)
        ours(x)
        mean = (1 - momentum) * mean + momentum * x.mean(2).mean(0)
        var = (1 - momentum) * var + momentum * x.var(2, correction=1).mean(0)
    torch.testing.assert_close(ours.running_mean, mean, **tol(torch.float64))
    torch.testing.assert_close(ours.running_var, var, **tol(torch.float64))


# ----------------------------------------------------------------------------------------------
# momentum=None: cumulative moving average


BATCHNORM_PAIRS = [p for p in PAIRS if p.startswith("BatchNorm")]


@pytest.mark.parametrize("pair", BATCHNORM_PAIRS)
def test_momentum_none_gives_plain_mean_of_batch_statistics(pair):
    make_ours, make_theirs, shape, torch_in = PAIRS[pair]
    ch = _channel_dim(torch_in)
    ours = make_ours(C, momentum=None, dtype=torch.float64)
    theirs = make_theirs(C, momentum=None, dtype=torch.float64)
    batch_means, batch_vars = [], []
    for step in range(4):
        # Batches of different sizes: the mean of batch means differs from the pooled mean.
        x = _batch((shape[0] + 3 * step, *shape[1:]), torch.float64, ch, scale=1.0 + step)
        x = x + 5.0 * step
        ours(x)
        theirs(torch_in(x))
        per_channel = x.movedim(ch, 0).reshape(C, -1)
        batch_means.append(per_channel.mean(1))
        batch_vars.append(per_channel.var(1, correction=1))
    expected_mean = torch.stack(batch_means).mean(0)
    expected_var = torch.stack(batch_vars).mean(0)
    torch.testing.assert_close(ours.running_mean, expected_mean, **tol(torch.float64))
    torch.testing.assert_close(ours.running_var, expected_var, **tol(torch.float64))
    assert int(ours.num_batches_tracked) == 4
    _assert_stats_equal(ours, theirs, torch.float64)


@pytest.mark.parametrize("pair", ["InstanceNorm1d-tracked", "InstanceNorm2d-tracked"])
def test_instancenorm_momentum_none_matches_torch(pair):
    # torch passes momentum 0.0 to instance_norm when momentum is None: the stats stay put.
    make_ours, make_theirs, shape, _ = PAIRS[pair]
    ours = make_ours(C, momentum=None, dtype=torch.float64)
    theirs = make_theirs(C, momentum=None, dtype=torch.float64)
    for _ in range(3):
        x = _batch(shape, torch.float64)
        torch.testing.assert_close(ours(x), theirs(x), **tol(torch.float64))
    _assert_stats_equal(ours, theirs, torch.float64)


# ----------------------------------------------------------------------------------------------
# num_batches_tracked


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("pair", BATCHNORM_PAIRS)
def test_num_batches_tracked_counts_training_forwards_only(pair, momentum):
    make_ours, _, shape, torch_in = PAIRS[pair]
    m = make_ours(C, momentum=momentum)
    assert m.num_batches_tracked.dtype == torch.long
    assert int(m.num_batches_tracked) == 0
    ch = _channel_dim(torch_in)
    for expected in (1, 2, 3):
        m(_batch(shape, torch.float32, ch))
        assert int(m.num_batches_tracked) == expected
    m.eval()
    for _ in range(2):
        m(_batch(shape, torch.float32, ch))
    assert int(m.num_batches_tracked) == 3
    m.train()
    m(_batch(shape, torch.float32, ch))
    assert int(m.num_batches_tracked) == 4


@pytest.mark.parametrize("pair", ["InstanceNorm1d-tracked", "InstanceNorm2d-tracked"])
def test_instancenorm_num_batches_tracked_matches_torch(pair):
    make_ours, make_theirs, shape, _ = PAIRS[pair]
    ours, theirs = make_ours(C), make_theirs(C)
    for _ in range(3):
        x = _batch(shape, torch.float32)
        ours(x)
        theirs(x)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


# ----------------------------------------------------------------------------------------------
# track_running_stats=False


UNTRACKED = {
    "BatchNorm1d": (lambda: normlab.BatchNorm1d(C, track_running_stats=False), (8, C), 1),
    "BatchNorm2d": (lambda: normlab.BatchNorm2d(C, track_running_stats=False), (4, C, 3, 5), 1),
    "BatchNorm3d": (lambda: normlab.BatchNorm3d(C, track_running_stats=False), (2, C, 2, 3, 4), 1),
    "BatchNorm-dim-1": (
        lambda: normlab.BatchNorm(C, dim=-1, track_running_stats=False),
        (4, 6, C),
        -1,
    ),
    "InstanceNorm1d": (lambda: normlab.InstanceNorm1d(C), (4, C, 7), 1),
    "InstanceNorm2d-affine": (lambda: normlab.InstanceNorm2d(C, affine=True), (2, C, 4, 5), 1),
}


@pytest.mark.parametrize("case", list(UNTRACKED))
def test_untracked_module_has_no_running_buffers(case):
    make, _, _ = UNTRACKED[case]
    m = make()
    assert m.running_mean is None
    assert m.running_var is None
    assert m.num_batches_tracked is None
    assert not any("running" in k or "num_batches" in k for k in m.state_dict())
    assert list(dict(m.named_buffers())) == []


@pytest.mark.parametrize("case", list(UNTRACKED))
def test_untracked_module_uses_batch_statistics_in_train_and_eval(case):
    make, shape, ch = UNTRACKED[case]
    m = make().double()
    if m.affine:
        with torch.no_grad():
            m.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
            m.bias.copy_(torch.tensor([1.0, 0.0, 3.0]))
    x = _batch(shape, torch.float64, ch)
    y_train = m.train()(x)
    y_eval = m.eval()(x)
    torch.testing.assert_close(y_eval, y_train, **tol(torch.float64))
    # ... and those are the batch statistics, computed here explicitly.
    if case.startswith("Instance"):
        reduce = tuple(range(2, x.dim()))
    else:
        reduce = tuple(a for a in range(x.dim()) if a != ch % x.dim())
    mean = x.mean(reduce, keepdim=True)
    var = x.var(reduce, keepdim=True, correction=0)
    expected = (x - mean) / torch.sqrt(var + m.eps)
    if m.affine:
        view = [1] * x.dim()
        view[ch] = C
        expected = expected * m.weight.detach().reshape(view) + m.bias.detach().reshape(view)
    torch.testing.assert_close(y_eval, expected, **tol(torch.float64))


# ----------------------------------------------------------------------------------------------
# eval uses the running statistics


TRACKED = {
    "BatchNorm1d": (lambda: normlab.BatchNorm1d(C), (8, C, 4), 1, (0, 2)),
    "BatchNorm2d": (lambda: normlab.BatchNorm2d(C), (4, C, 3, 5), 1, (0, 2, 3)),
    "BatchNorm-dim-1": (lambda: normlab.BatchNorm(C, dim=-1), (4, 6, C), -1, (0, 1)),
    "InstanceNorm2d": (
        lambda: normlab.InstanceNorm2d(C, affine=True, track_running_stats=True),
        (2, C, 4, 5),
        1,
        (2, 3),
    ),
}


@pytest.mark.parametrize("case", list(TRACKED))
def test_eval_normalizes_with_running_stats_and_is_repeatable(case):
    make, shape, ch, _ = TRACKED[case]
    m = make().double()
    running_mean = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64)
    running_var = torch.tensor([4.0, 0.5, 9.0], dtype=torch.float64)
    weight = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    bias = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)
    with torch.no_grad():
        m.running_mean.copy_(running_mean)
        m.running_var.copy_(running_var)
        m.num_batches_tracked.fill_(7)
        m.weight.copy_(weight)
        m.bias.copy_(bias)
    m.eval()
    x = _batch(shape, torch.float64, ch)
    y1 = m(x)
    y2 = m(x)
    assert torch.equal(y1, y2)
    view = [1] * x.dim()
    view[ch] = C
    expected = (x - running_mean.reshape(view)) / torch.sqrt(
        running_var.reshape(view) + m.eps
    ) * weight.reshape(view) + bias.reshape(view)
    torch.testing.assert_close(y1, expected, **tol(torch.float64))
    # Buffers untouched by eval forwards.
    assert torch.equal(m.running_mean, running_mean)
    assert torch.equal(m.running_var, running_var)
    assert int(m.num_batches_tracked) == 7
    # Per-sample: the output for one sample does not depend on the rest of the batch.
    first = x.narrow(0, 0, 1)
    torch.testing.assert_close(m(first), y1.narrow(0, 0, 1), **tol(torch.float64))


@pytest.mark.parametrize("case", list(TRACKED))
def test_training_normalizes_with_batch_stats_not_running_stats(case):
    make, shape, ch, reduce = TRACKED[case]
    m = make().double()
    with torch.no_grad():
        m.running_mean.fill_(100.0)
        m.running_var.fill_(1e4)
    x = _batch(shape, torch.float64, ch)
    y = m(x)
    expected = (x - x.mean(reduce, keepdim=True)) / torch.sqrt(
        x.var(reduce, keepdim=True, correction=0) + m.eps
    )
    torch.testing.assert_close(y, expected, **tol(torch.float64))


# ----------------------------------------------------------------------------------------------
# Unbiased running variance


@pytest.mark.parametrize("n", [2, 3, 10])
def test_running_var_is_unbiased_batch_variance(n):
    m = normlab.BatchNorm1d(1, momentum=1.0, dtype=torch.float64)
    x = torch.linspace(-1.0, 2.0, n, dtype=torch.float64).reshape(n, 1) ** 2
    y = m(x)
    biased = x.var(correction=0)
    torch.testing.assert_close(
        m.running_var, (biased * n / (n - 1)).reshape(1), **tol(torch.float64)
    )
    torch.testing.assert_close(m.running_mean, x.mean().reshape(1), **tol(torch.float64))
    # The output itself uses the biased variance.
    torch.testing.assert_close(y, (x - x.mean()) / torch.sqrt(biased + m.eps), **tol(torch.float64))


def test_running_var_of_two_values_by_hand():
    # Values 1 and 3: mean 2, biased variance 1, unbiased variance 2.
    m = normlab.BatchNorm1d(1, momentum=0.1, dtype=torch.float64)
    m(torch.tensor([[1.0], [3.0]], dtype=torch.float64))
    torch.testing.assert_close(
        m.running_mean, torch.tensor([0.9 * 0 + 0.1 * 2], dtype=torch.float64)
    )
    torch.testing.assert_close(
        m.running_var, torch.tensor([0.9 * 1 + 0.1 * 2], dtype=torch.float64)
    )


def test_instancenorm_running_var_is_unbiased_over_positions():
    m = normlab.InstanceNorm1d(1, momentum=1.0, track_running_stats=True, dtype=torch.float64)
    # Two instances: [1, 3] (unbiased var 2) and [0, 4] (unbiased var 8): average 5.
    m(torch.tensor([[[1.0, 3.0]], [[0.0, 4.0]]], dtype=torch.float64))
    torch.testing.assert_close(m.running_mean, torch.tensor([2.0], dtype=torch.float64))
    torch.testing.assert_close(m.running_var, torch.tensor([5.0], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# reset_running_stats / reset_parameters


RESETTABLE = {
    "BatchNorm1d": (lambda: normlab.BatchNorm1d(C), lambda: nn.BatchNorm1d(C), (8, C)),
    "BatchNorm2d": (lambda: normlab.BatchNorm2d(C), lambda: nn.BatchNorm2d(C), (4, C, 3, 3)),
    "InstanceNorm1d": (
        lambda: normlab.InstanceNorm1d(C, affine=True, track_running_stats=True),
        lambda: nn.InstanceNorm1d(C, affine=True, track_running_stats=True),
        (4, C, 5),
    ),
}


def _train_and_perturb(m, shape):
    for _ in range(3):
        m(_batch(shape, torch.float32))
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        m.bias.copy_(torch.tensor([1.0, 0.0, 3.0]))


@pytest.mark.parametrize("case", list(RESETTABLE))
def test_reset_running_stats_resets_buffers_and_keeps_parameters(case):
    make_ours, make_theirs, shape = RESETTABLE[case]
    m = make_ours()
    _train_and_perturb(m, shape)
    assert not torch.equal(m.running_mean, torch.zeros(C))
    m.reset_running_stats()
    assert torch.equal(m.running_mean, torch.zeros(C))
    assert torch.equal(m.running_var, torch.ones(C))
    assert int(m.num_batches_tracked) == 0
    assert torch.equal(m.weight.detach(), torch.tensor([0.5, 2.0, -1.0]))
    assert torch.equal(m.bias.detach(), torch.tensor([1.0, 0.0, 3.0]))
    # Same as torch.
    t = make_theirs()
    _train_and_perturb(t, shape)
    t.reset_running_stats()
    for name, value in t.state_dict().items():
        assert torch.equal(m.state_dict()[name], value), name


@pytest.mark.parametrize("case", list(RESETTABLE))
def test_reset_parameters_resets_buffers_and_affine(case):
    make_ours, _, shape = RESETTABLE[case]
    m = make_ours()
    _train_and_perturb(m, shape)
    buffers_before = {k: id(v) for k, v in m.named_buffers()}
    m.reset_parameters()
    assert torch.equal(m.running_mean, torch.zeros(C))
    assert torch.equal(m.running_var, torch.ones(C))
    assert int(m.num_batches_tracked) == 0
    assert torch.equal(m.weight.detach(), torch.ones(C))
    assert torch.equal(m.bias.detach(), torch.zeros(C))
    # In place: the same buffer objects (an optimizer or a hook holding them stays valid).
    assert {k: id(v) for k, v in m.named_buffers()} == buffers_before


def test_reset_running_stats_without_tracking_is_a_no_op():
    m = normlab.BatchNorm1d(C, track_running_stats=False)
    m.reset_running_stats()
    m.reset_parameters()
    assert m.running_mean is None
    assert m.running_var is None
    assert torch.equal(m.weight.detach(), torch.ones(C))


def test_training_after_reset_matches_a_fresh_module():
    fresh = normlab.BatchNorm2d(C)
    used = normlab.BatchNorm2d(C)
    for _ in range(3):
        used(_batch((2, C, 3, 3), torch.float32))
    used.reset_running_stats()
    x = _batch((4, C, 3, 3), torch.float32)
    fresh(x)
    used(x)
    for name, value in fresh.state_dict().items():
        assert torch.equal(used.state_dict()[name], value), name
