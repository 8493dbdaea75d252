"""Edge-case battery, shapes (issue #8 items 3, 4, 5, 6, 8, 10), over every norm and backend.

3. Too few values: a training statistic of one value is a ValueError (BatchNorm, Batch
   Renorm, PowerNorm per channel, InstanceNorm per instance, GroupNorm per group, in eval
   too as it has no running statistics); two values work; eval with running statistics
   works on one value, as torch.nn.
4. Empty inputs (0 rows): empty outputs and input gradients, zero weight/bias gradients,
   running statistics unchanged.
5. Layouts: step-sliced, transposed, expanded (stride 0) and channels_last inputs give the
   contiguous input's outputs, gradients and running statistics.
6. Optional affine: no weight/bias (affine=False, elementwise_affine=False) is weight 1 and
   bias 0; bias=False is bias 0, bit for bit.
8. Rows are independent: norm(x)[:-1] == norm(x[:-1]) bit for bit for every norm whose
   samples do not share statistics (pytorch/pytorch#149301), forward and input gradient.
10. Large shapes: 2^20 features, 2^16 + 1 rows, 2^20 positions per statistic; opt-in (slow,
   NORMLAB_HUGE_TESTS=1 and the memory) above 2^31 elements.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from battery_cases import CASES, applicable, over_backends, over_cases, over_cheap_backends
from tolerances import grad_tol, tol


def _np(t):
    return t.detach().double().numpy().copy()


def _close(actual, expected, tolerance, what=""):
    if not isinstance(expected, torch.Tensor):
        expected = torch.from_numpy(np.ascontiguousarray(expected, dtype=np.float64))
    torch.testing.assert_close(
        actual.detach().double(),
        expected.detach().double(),
        **tolerance,
        msg=lambda m: f"{what}: {m}",
    )


def _run(module, x, dy):
    """(y, dx, parameter gradients) of module on a leaf copy of x."""
    leaf = x.detach().clone().requires_grad_(True)
    y = module(leaf)
    y.backward(dy)
    return y, leaf.grad, {n: p.grad for n, p in module.named_parameters()}


# --- 3. too few values ---------------------------------------------------------------------

# case -> (module factory, input with ONE value per training statistic, with TWO values)
ONE_VALUE = {
    "BatchNorm1d": (lambda: normlab.BatchNorm1d(4), (1, 4), (2, 4)),
    "BatchNorm1d-3d": (lambda: normlab.BatchNorm1d(4), (1, 4, 1), (1, 4, 2)),
    "BatchNorm2d": (lambda: normlab.BatchNorm2d(3), (1, 3, 1, 1), (1, 3, 1, 2)),
    "BatchNorm-dim-1": (lambda: normlab.BatchNorm(4, dim=-1), (1, 1, 4), (1, 2, 4)),
    "BatchRenorm1d": (lambda: normlab.BatchRenorm1d(4), (1, 4, 1), (2, 4, 1)),
    "PowerNorm": (lambda: normlab.PowerNorm(4), (1, 1, 4), (1, 2, 4)),
    "PowerNorm-after-warmup": (lambda: normlab.PowerNorm(4, warmup_iters=0), (1, 4), (2, 4)),
    "InstanceNorm1d": (lambda: normlab.InstanceNorm1d(4), (3, 4, 1), (3, 4, 2)),
    "InstanceNorm2d-tracked": (
        lambda: normlab.InstanceNorm2d(3, affine=True, track_running_stats=True),
        (2, 3, 1, 1),
        (2, 3, 1, 2),
    ),
    "GroupNorm-2d": (lambda: normlab.GroupNorm(4, 4), (2, 4), (2, 4, 2)),
    "GroupNorm-3d": (lambda: normlab.GroupNorm(2, 2), (3, 2, 1), (3, 2, 2)),
}


@over_backends
@pytest.mark.parametrize("name", list(ONE_VALUE))
def test_one_value_per_training_statistic_is_a_value_error(name, backend):
    factory, one, two = ONE_VALUE[name]
    module = factory().train()
    per = "group" if name.startswith("GroupNorm") else "(channel|instance)"
    with pytest.raises(ValueError, match=rf"more than 1 value per {per}.*{list(one)}"):
        module(torch.randn(one))
    y = module(torch.randn(two))  # two values are enough
    assert torch.isfinite(y).all()


@over_backends
@pytest.mark.parametrize("name", [n for n in ONE_VALUE if not n.startswith("GroupNorm")])
def test_one_value_in_eval_uses_the_running_statistics(name, backend):
    from normlab import reference as ref

    factory, one, _ = ONE_VALUE[name]
    module = factory().eval()
    x = torch.randn(one)
    if getattr(module, "track_running_stats", True) is False:
        # Without running statistics eval normalizes with the input's own: torch.nn raises.
        with pytest.raises(ValueError, match="more than 1 value"):
            module(x)
        return
    w, b = _np(module.weight), _np(module.bias)
    dim = getattr(module, "dim", 1)
    if hasattr(module, "running_phi"):
        want = ref.power_norm_forward(_np(x), _np(module.running_phi), w, b, module.eps, dim)
    else:
        stats = _np(module.running_mean), _np(module.running_var)
        want = ref.batch_norm_eval(_np(x), *stats, w, b, module.eps, dim)
    _close(module(x), want, tol(torch.float32))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_group_norm_with_one_value_per_group_is_refused_in_both_modes(training):
    """GroupNorm has no running statistics: eval normalizes with the input's statistics
    too, and one value per group (torch.nn returns the bias there) is refused; the message
    does not claim it is about training."""
    module = normlab.GroupNorm(4, 4).train(training)
    with pytest.raises(ValueError, match=r"more than 1 value per group") as error:
        module(torch.randn(2, 4, 1))
    assert "training" not in str(error.value)


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_feature_norms_of_one_feature_match_torch(cls):
    """LayerNorm/RMSNorm over one feature are well defined (LayerNorm gives its bias)."""
    ours = cls(1)
    theirs = getattr(nn, cls.__name__)(1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 1)
    _close(ours(x), theirs(x), tol(torch.float32))


# --- 4. empty inputs -----------------------------------------------------------------------


LAST_AXIS_IS_FEATURES = {
    "LayerNorm",
    "RMSNorm",
    "BatchNorm-dim-1",
    "PowerNorm-warmup",
    "PowerNorm-after-warmup",
}


@over_backends
@over_cases
@pytest.mark.parametrize("empty_axis", [0, -1], ids=["no-rows", "no-positions"])
def test_empty_input_gives_empty_outputs_zero_parameter_gradients_and_unchanged_buffers(
    case, empty_axis, backend
):
    if empty_axis == -1 and case.name in LAST_AXIS_IS_FEATURES:
        pytest.skip("the last axis is the normalized or the channel axis here")
    shape = list(case.shape)
    shape[empty_axis] = 0
    module = case.make()
    before = {name: b.clone() for name, b in module.named_buffers()}
    x = torch.randn(shape)
    y, dx, grads = _run(module, x, torch.randn(shape))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert dx.shape == x.shape
    for name, grad in grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)), name
    for name, buffer in module.named_buffers():
        if name == "num_batches_tracked":
            continue  # counts the call, as torch.nn.BatchNorm does
        assert torch.equal(buffer, before[name]), name


def test_empty_batch_counts_a_step_as_torch_batch_norm():
    ours, theirs = normlab.BatchNorm1d(4), nn.BatchNorm1d(4)
    ours(torch.randn(0, 4, 3))
    theirs(torch.randn(0, 4, 3))
    for name, buffer in theirs.named_buffers():
        assert torch.equal(getattr(ours, name), buffer), name


# --- 5. layouts ----------------------------------------------------------------------------

LAYOUTS = ["step-slice", "step-slice-batch", "transposed", "expanded", "channels_last"]


def _non_contiguous(kind, shape, dtype=torch.float32):
    """(x, base): a non-contiguous x of ``shape`` made as ``kind`` says, and the leaf its
    gradient lands in."""
    if kind == "step-slice":
        base = torch.randn(*shape[:-1], 2 * shape[-1] + 1, dtype=dtype)
        return base, lambda b: b[..., 1::2]
    if kind == "step-slice-batch":
        base = torch.randn(2 * shape[0], *shape[1:], dtype=dtype)
        return base, lambda b: b[::2]
    if kind == "transposed":
        base = torch.randn(shape[0], shape[2], shape[1], *shape[3:], dtype=dtype)
        return base, lambda b: b.transpose(1, 2)
    if kind == "expanded":  # stride 0 along the batch: every sample the same
        base = torch.randn(1, *shape[1:], dtype=dtype)
        return base, lambda b: b.expand(shape)
    if kind == "channels_last":
        base = torch.randn(shape, dtype=dtype)
        return base, lambda b: b.contiguous(memory_format=torch.channels_last)
    raise AssertionError(kind)


@over_backends
@over_cases
@pytest.mark.parametrize("kind", LAYOUTS)
def test_non_contiguous_inputs_give_the_contiguous_result(case, kind, backend):
    if kind == "channels_last" and len(case.shape) != 4:
        pytest.skip("channels_last is a 4-D layout")
    base, view = _non_contiguous(kind, case.shape)
    x = view(base)
    assert x.shape == case.shape and not x.is_contiguous()
    module = case.make()
    twin = copy.deepcopy(module)
    dy = torch.randn(case.shape).transpose(0, 1).contiguous().transpose(0, 1)  # strided dy

    leaf = base.clone().requires_grad_(True)
    y = module(view(leaf))
    y.backward(dy)
    contiguous_leaf = base.clone().requires_grad_(True)
    yc = twin(view(contiguous_leaf).contiguous())
    yc.backward(dy.contiguous())

    _close(y, yc, tol(torch.float32), "y")
    _close(leaf.grad, contiguous_leaf.grad, grad_tol(torch.float32), "dx")
    for (name, p), q in zip(module.named_parameters(), twin.parameters(), strict=True):
        _close(p.grad, q.grad, grad_tol(torch.float32), f"d{name}")
    for (name, b), c in zip(module.named_buffers(), twin.buffers(), strict=True):
        _close(b, c, tol(torch.float32), name)


# --- 6. optional affine --------------------------------------------------------------------


def _without_affine_options(case):
    """Constructor options that drop the weight and bias, and those that drop the bias."""
    cls = case.build.cls
    if cls in (normlab.LayerNorm, normlab.RMSNorm):
        none = {"elementwise_affine": False}
    else:
        none = {"affine": False}
    no_bias = None if cls is normlab.RMSNorm else {"bias": False}
    return none, no_bias


def _identity_affine(module):
    with torch.no_grad():
        if module.weight is not None:
            module.weight.fill_(1.0)
        if module.bias is not None:
            module.bias.zero_()
    return module


@over_backends
@over_cases
def test_no_affine_is_weight_one_and_bias_zero_bit_for_bit(case, backend):
    none, _ = _without_affine_options(case)
    plain = case.make(**none)
    assert plain.weight is None and plain.bias is None
    affine = _identity_affine(case.make())
    affine.load_state_dict({**plain.state_dict(), **_affine_state(affine)})
    x, dy = torch.randn(case.shape), torch.randn(case.shape)
    y, dx, _ = _run(plain, x, dy)
    y1, dx1, _ = _run(affine, x, dy)
    if case.name.startswith(REGROUPED):
        # Without parameters the groups are normalized as rows (the rows kernel, float32
        # arithmetic from a pivot), with them by the groups kernel: equal to rounding.
        torch.testing.assert_close(y, y1, **tol(y.dtype))
        torch.testing.assert_close(dx, dx1, **grad_tol(dx.dtype))
    else:
        assert torch.equal(y, y1)
        assert torch.equal(dx, dx1)
    for (name, b), c in zip(plain.named_buffers(), affine.buffers(), strict=True):
        if case.name.startswith(REGROUPED) and b.is_floating_point():
            torch.testing.assert_close(b, c, **tol(b.dtype), msg=name)
        else:
            assert torch.equal(b, c), name


# Norms whose parameterless form runs another layout (rows) than their affine form (groups).
REGROUPED = ("GroupNorm", "InstanceNorm")


def _affine_state(module):
    return {n: p for n, p in module.state_dict().items() if n in ("weight", "bias")}


@over_backends
@over_cases
def test_no_bias_is_bias_zero_bit_for_bit(case, backend):
    _, no_bias = _without_affine_options(case)
    if no_bias is None:
        pytest.skip("RMSNorm has no bias")
    plain = case.make(**no_bias)
    assert plain.weight is not None and plain.bias is None
    zero_bias = case.make()
    with torch.no_grad():
        zero_bias.bias.zero_()
    zero_bias.load_state_dict({**plain.state_dict(), "bias": zero_bias.bias})
    x, dy = torch.randn(case.shape), torch.randn(case.shape)
    y, dx, grads = _run(plain, x, dy)
    y1, dx1, grads1 = _run(zero_bias, x, dy)
    assert torch.equal(y, y1)
    assert torch.equal(dx, dx1)
    assert torch.equal(grads["weight"], grads1["weight"])


def test_functional_none_weight_and_bias_equal_ones_and_zeros():
    from normlab import functional as F

    x = torch.randn(4, 3, 5)
    ones, zeros = torch.ones(3), torch.zeros(3)
    pairs = [
        (F.layer_norm(x, (5,)), F.layer_norm(x, (5,), torch.ones(5), torch.zeros(5))),
        (F.rms_norm(x, (5,)), F.rms_norm(x, (5,), torch.ones(5))),
        (
            F.batch_norm(x, None, None, training=True),
            F.batch_norm(x, None, None, ones, zeros, training=True),
        ),
    ]
    for plain, affine in pairs:
        assert torch.equal(plain, affine)
    regrouped = [  # rows without parameters, groups with them: equal to rounding
        (F.group_norm(x, 3), F.group_norm(x, 3, ones, zeros)),
        (F.instance_norm(x), F.instance_norm(x, weight=ones, bias=zeros)),
    ]
    for plain, affine in regrouped:
        torch.testing.assert_close(plain, affine, **tol(x.dtype))


# --- 8. row independence -------------------------------------------------------------------

INDEPENDENT = [c for c in CASES.values() if 0 not in c.shared]


@over_cheap_backends
@pytest.mark.parametrize("case", INDEPENDENT, ids=[c.name for c in INDEPENDENT])
@pytest.mark.parametrize("rows", [37, 4097])
def test_rows_are_independent_bit_for_bit(case, rows, backend):
    """4097 rows run the kernels on several threads (and blocks), 36 on one."""
    if rows == 4097 and (
        case.name not in ("LayerNorm", "RMSNorm", "GroupNorm") or backend == "triton"
    ):
        pytest.skip("one large case per kernel family is enough (none in the interpreter)")
    module = case.make()
    twin, tail_twin = copy.deepcopy(module), copy.deepcopy(module)
    x = torch.randn(case.with_batch(rows))
    dy = torch.randn(x.shape)
    with applicable(backend):
        y, dx, _ = _run(module, x, dy)
    y_part, dx_part, _ = _run(twin, x[:-1], dy[:-1])
    assert torch.equal(y[:-1], y_part)
    assert torch.equal(dx[:-1], dx_part)
    y_tail, _, _ = _run(tail_twin, x[1:], dy[1:])
    assert torch.equal(y[1:], y_tail)


# --- 10. large shapes ----------------------------------------------------------------------

LARGE = {
    "LayerNorm-2^20-features": (lambda: normlab.LayerNorm(1 << 20), (2, 1 << 20), "layer"),
    "RMSNorm-2^20-features": (lambda: normlab.RMSNorm(1 << 20), (2, 1 << 20), "rms"),
    "LayerNorm-2^16+1-rows": (lambda: normlab.LayerNorm(8), ((1 << 16) + 1, 8), "layer"),
    "BatchNorm-2^16+1-rows": (lambda: normlab.BatchNorm1d(3), ((1 << 16) + 1, 3), "batch"),
    "GroupNorm-2^16+1-rows": (lambda: normlab.GroupNorm(2, 4), ((1 << 16) + 1, 4, 2), "group"),
    "GroupNorm-2^20-positions": (lambda: normlab.GroupNorm(1, 2), (1, 2, 1 << 19), "group"),
    "InstanceNorm-2^20-positions": (
        lambda: normlab.InstanceNorm1d(2, affine=True),
        (2, 2, 1 << 20),
        "instance",
    ),
    "BatchNorm-2^20-positions": (lambda: normlab.BatchNorm1d(2), (1, 2, 1 << 20), "batch"),
}


def _reference(kind, module, x, dy):
    from normlab import reference as ref

    w = None if module.weight is None else _np(module.weight)
    b = None if getattr(module, "bias", None) is None else _np(module.bias)
    if kind == "layer":
        return ref.layer_norm(x, x.shape[-1:], w, b), ref.layer_norm_backward(
            dy, x, x.shape[-1:], w, b
        )[0]
    if kind == "rms":
        return ref.rms_norm(x, x.shape[-1:], w, module.eps), ref.rms_norm_backward(
            dy, x, x.shape[-1:], w, module.eps
        )[0]
    if kind == "batch":
        return ref.batch_norm_train(x, w, b), ref.batch_norm_train_backward(dy, x, w, b)[0]
    if kind == "group":
        g = module.num_groups
        return ref.group_norm(x, g, w, b), ref.group_norm_backward(dy, x, g, w, b)[0]
    return ref.instance_norm(x, w, b), ref.instance_norm_backward(dy, x, w, b)[0]


@over_backends
@pytest.mark.parametrize("name", list(LARGE))
def test_large_shapes_match_the_reference(name, backend):
    factory, shape, kind = LARGE[name]
    module = factory().train()
    x = torch.randn(shape) * 2 + 1
    dy = torch.randn(shape)
    y, dx, _ = _run(module, x, dy)
    want_y, want_dx = _reference(kind, module, _np(x), _np(dy))
    _close(y, want_y, tol(torch.float32), "y")
    _close(dx, want_dx, grad_tol(torch.float32), "dx")


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("NORMLAB_HUGE_TESTS") != "1", reason="opt-in: NORMLAB_HUGE_TESTS=1"
)
@pytest.mark.parametrize("kind", ["layer", "batch"])
def test_more_than_2_to_the_31_elements(kind):
    """Index arithmetic past int32: 2^31 + 2^10 float32 elements (8 GiB, 17 GiB in all with
    the output). Rows far apart are checked against the reference."""
    features = 1 << 10
    from normlab import reference as ref

    rows = (1 << 21) + 1
    if _available_bytes() < 3 * rows * features * 4:
        pytest.skip("needs about 25 GiB of free memory")
    with torch.no_grad():
        if kind == "layer":
            x = torch.randn(rows, features)
            y = normlab.functional.layer_norm(x, (features,))
            for r in (0, rows // 2, rows - 1):
                _close(y[r], ref.layer_norm(_np(x[r]), (features,)), tol(x.dtype))
        else:
            x = torch.randn(rows, 2, features // 2)
            y = normlab.functional.batch_norm(x, None, None, training=True)
            mean = x.double().mean(dim=(0, 2), keepdim=True)
            std = (x.double().var(dim=(0, 2), unbiased=False, keepdim=True) + 1e-5).sqrt()
            for r in (0, rows // 2, rows - 1):
                _close(y[r], ((x[r].double() - mean[0]) / std[0]), tol(x.dtype))
    assert y.shape == x.shape
