"""normlab against torch.nn on PyTorch's own test samples: the ModuleInfo entries of its norm
modules (torch.testing._internal.common_modules.module_db) and the OpInfo entries of its norm
functionals (common_methods_invocations.op_db). Every sample runs on both sides: forward,
backward (input and parameter gradients), running statistics, and, for torch's error inputs,
whether normlab raises too and an exception torch's callers would catch (an instance of
torch's error type). Where normlab differs on purpose, the difference is listed once, in
``DIFFERENCES``, with the reason; any other difference fails."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("expecttest")  # torch's test-sample modules import it

from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import normlab
import normlab.functional as NF
from tolerances import grad_tol, tol

MODULES = {
    name: getattr(normlab, name)
    for name in (
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "GroupNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "LayerNorm",
        "RMSNorm",
    )
}
OPS = {
    "nn.functional.layer_norm": NF.layer_norm,
    "nn.functional.rms_norm": NF.rms_norm,
    "nn.functional.batch_norm": NF.batch_norm,
    "nn.functional.group_norm": NF.group_norm,
    "nn.functional.instance_norm": NF.instance_norm,
}
DTYPES = [torch.float32, torch.float64]

DIFFERENCES = {
    # What normlab's error says: why normlab refuses where torch computes something.
    "eps must be a finite number >= 0.0": (
        "normlab refuses a negative eps (ValueError naming it): torch computes with it, NaN "
        "where a variance is below -eps and a number no norm defines elsewhere"
    ),
    "momentum must be a finite number in [0.0, 1.0]": (
        "normlab refuses a momentum outside [0, 1] where it updates running statistics "
        "(torch extrapolates them); where momentum is unused it accepts any value, as torch"
    ),
    "axis out of range for an input of 1 dimensions": (
        "BatchNorm of a 1-D input: normlab needs the channel axis (dim=1 by default) and "
        "raises IndexError, as torch does for an axis out of range; torch's batch_norm takes "
        "the one sample it has, an empty (0,) input with zero channels"
    ),
}


def _module_infos():
    return [info for info in module_db if info.module_cls.__name__ in MODULES]


def _op_infos():
    return [info for info in op_db if info.name in OPS]


def _clone(value):
    if isinstance(value, torch.Tensor):
        clone = value.detach().clone()
        return clone.requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _same(actual, expected, tolerance, what):
    torch.testing.assert_close(
        actual, expected, **tolerance, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def _compare_calls(torch_call, normlab_call, args, kwargs, dtype, what):
    """Run both calls on clones of the same arguments; compare outputs, gradients of every
    tensor that requires one, and the tensors the calls mutate (running statistics)."""
    sides = []
    for call in (torch_call, normlab_call):
        a, k = _clone(args), _clone(kwargs)
        try:
            out = call(*a, **k)
        except (ValueError, IndexError) as error:
            if call is normlab_call and _documented(str(error)):
                return "documented"
            raise
        sides.append((out, a, k))
    (t_out, t_args, t_kwargs), (n_out, n_args, n_kwargs) = sides
    _same(n_out, t_out, tol(dtype), f"{what}: output")
    t_inputs = [t for t in _tensors((t_args, t_kwargs)) if t.requires_grad]
    n_inputs = [t for t in _tensors((n_args, n_kwargs)) if t.requires_grad]
    if t_inputs and t_out.requires_grad:
        grad = torch.randn_like(t_out, generator=torch.Generator().manual_seed(1))
        t_grads = torch.autograd.grad(t_out, t_inputs, grad, allow_unused=True)
        n_grads = torch.autograd.grad(n_out, n_inputs, grad, allow_unused=True)
        for i, (n_g, t_g) in enumerate(zip(n_grads, t_grads, strict=True)):
            if t_g is None:
                assert n_g is None or not n_g.abs().any(), f"{what}: gradient {i}"
            else:
                _same(n_g, t_g, grad_tol(dtype), f"{what}: gradient {i}")
    for i, (n_t, t_t) in enumerate(
        zip(_tensors((n_args, n_kwargs)), _tensors((t_args, t_kwargs)), strict=True)
    ):
        if not t_t.requires_grad:  # running statistics, updated in place
            _same(n_t, t_t, tol(dtype), f"{what}: mutated argument {i}")


def _documented(message: str) -> str | None:
    for text, reason in DIFFERENCES.items():
        if text in message:
            return reason
    return None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", _module_infos(), ids=lambda i: i.module_cls.__name__)
def test_module_samples_agree_with_torch(info, dtype):
    name = info.module_cls.__name__
    checked = 0
    for training in (True, False):
        samples = info.module_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=True, training=training
        )
        for sample in samples:
            c_args, c_kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
            theirs = info.module_cls(*c_args, **c_kwargs).to(dtype).train(training)
            ours = MODULES[name](*c_args, **c_kwargs).to(dtype).train(training)
            ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
            f_args, f_kwargs = sample.forward_input.args, sample.forward_input.kwargs
            what = f"{name}{c_args}{c_kwargs} training={training} {sample.desc}"
            _compare_calls(theirs, ours, f_args, f_kwargs, dtype, what)
            for key, value in theirs.state_dict().items():
                _same(ours.state_dict()[key], value, tol(dtype), f"{what}: {key}")
            checked += 1
    assert checked > 0


@pytest.mark.parametrize(
    "info",
    [i for i in _module_infos() if i.module_error_inputs_func is not None],
    ids=lambda i: i.module_cls.__name__,
)
def test_module_error_inputs_raise_what_torch_raises(info):
    name = info.module_cls.__name__
    errors = info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
    )
    for error in errors:
        sample = error.module_error_input
        c_args, c_kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        what = f"{name}{c_args}{c_kwargs}: torch raises {error.error_type.__name__}"
        try:
            module = MODULES[name](*c_args, **c_kwargs)
            if error.error_on == ModuleErrorEnum.FORWARD_ERROR:
                module(*sample.forward_input.args, **sample.forward_input.kwargs)
        except Exception as raised:
            if _documented(str(raised)) is None:
                assert isinstance(raised, error.error_type), f"{what}, normlab {raised!r}"
            continue
        pytest.fail(f"{what} ({error.error_regex}), normlab raises nothing")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", _op_infos(), ids=lambda i: f"{i.name}.{i.variant_test_name}")
def test_op_samples_agree_with_torch(info, dtype):
    samples = list(info.sample_inputs("cpu", dtype, requires_grad=True))
    for sample in samples:
        what = f"{info.name} {sample.summary() if hasattr(sample, 'summary') else sample}"
        _compare_calls(
            info.op, OPS[info.name], (sample.input, *sample.args), sample.kwargs, dtype, what
        )
    assert samples


@pytest.mark.parametrize(
    "info",
    [i for i in _op_infos() if i.error_inputs_func is not None],
    ids=lambda i: i.name,
)
def test_op_error_inputs_raise_what_torch_raises(info):
    for error in info.error_inputs("cpu"):
        sample = error.sample_input
        what = f"{info.name}: torch raises {error.error_type.__name__} ({error.error_regex})"
        try:
            OPS[info.name](sample.input, *sample.args, **sample.kwargs)
        except Exception as raised:
            if _documented(str(raised)) is None:
                assert isinstance(raised, error.error_type), f"{what}, normlab {raised!r}"
            continue
        pytest.fail(f"{what}, normlab raises nothing")
