"""Edge-case battery, bad arguments (issue #8 item 13): every constructor argument of every
norm module is checked at construction, and the error names the class and the argument;
functional arguments (masks, lengths, running statistics, parameters, residuals) name
theirs. (tests/test_errors.py holds the input, shape and axis checks; this file adds the
rest.)"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import normlab
import normlab.functional as F

NAN = float("nan")

# (constructor, bad keyword arguments, error type, the argument the message must name)
BAD_CONSTRUCTOR_ARGUMENTS = [
    # LayerNorm / RMSNorm
    (normlab.LayerNorm, {"normalized_shape": 0}, ValueError, "normalized_shape"),
    (normlab.LayerNorm, {"normalized_shape": "4"}, TypeError, "normalized_shape"),
    (normlab.LayerNorm, {"eps": -1e-5}, ValueError, "eps"),
    (normlab.LayerNorm, {"eps": NAN}, ValueError, "eps"),
    (normlab.LayerNorm, {"eps": math.inf}, ValueError, "eps"),
    (normlab.LayerNorm, {"eps": "1e-5"}, TypeError, "eps"),
    (normlab.LayerNorm, {"eps": None}, TypeError, "eps"),
    (normlab.LayerNorm, {"elementwise_affine": "yes"}, TypeError, "elementwise_affine"),
    (normlab.LayerNorm, {"bias": None}, TypeError, "bias"),
    (normlab.LayerNorm, {"dtype": torch.int32}, TypeError, "dtype"),
    (normlab.LayerNorm, {"dtype": "float32"}, TypeError, "dtype"),
    (normlab.LayerNorm, {"dim": 1.0}, TypeError, "dim"),
    (normlab.LayerNorm, {"dim": (0, 1)}, ValueError, "dim"),
    (normlab.RMSNorm, {"normalized_shape": -3}, ValueError, "normalized_shape"),
    (normlab.RMSNorm, {"eps": -1.0}, ValueError, "eps"),
    (normlab.RMSNorm, {"eps": [1e-5]}, TypeError, "eps"),
    (normlab.RMSNorm, {"elementwise_affine": 1}, TypeError, "elementwise_affine"),
    (normlab.RMSNorm, {"dtype": torch.int64}, TypeError, "dtype"),
    # BatchNorm family (BatchNorm1d/2d/3d, BatchNorm, SyncBatchNorm, InstanceNorm share these)
    (normlab.BatchNorm1d, {"num_features": 0}, ValueError, "num_features"),
    (normlab.BatchNorm1d, {"num_features": 4.0}, TypeError, "num_features"),
    (normlab.BatchNorm1d, {"num_features": True}, TypeError, "num_features"),
    (normlab.BatchNorm2d, {"eps": -1.0}, ValueError, "eps"),
    (normlab.BatchNorm2d, {"momentum": 1.5}, ValueError, "momentum"),
    (normlab.BatchNorm2d, {"momentum": -0.1}, ValueError, "momentum"),
    (normlab.BatchNorm2d, {"momentum": "0.1"}, TypeError, "momentum"),
    (normlab.BatchNorm3d, {"affine": "no"}, TypeError, "affine"),
    (normlab.BatchNorm3d, {"track_running_stats": None}, TypeError, "track_running_stats"),
    (normlab.BatchNorm3d, {"bias": 0}, TypeError, "bias"),
    (normlab.BatchNorm1d, {"dtype": torch.bool}, TypeError, "dtype"),
    (normlab.BatchNorm, {"dim": "1"}, TypeError, "dim"),
    (normlab.BatchNorm, {"virtual_batch_size": 0}, ValueError, "virtual_batch_size"),
    (normlab.BatchNorm, {"virtual_batch_size": 2.0}, TypeError, "virtual_batch_size"),
    (normlab.SyncBatchNorm, {"momentum": 2.0}, ValueError, "momentum"),
    (normlab.SyncBatchNorm, {"num_features": -1}, ValueError, "num_features"),
    (normlab.InstanceNorm1d, {"num_features": 0}, ValueError, "num_features"),
    (normlab.InstanceNorm2d, {"eps": -1.0}, ValueError, "eps"),
    (normlab.InstanceNorm3d, {"momentum": 2.0}, ValueError, "momentum"),
    (normlab.InstanceNorm1d, {"affine": "True"}, TypeError, "affine"),
    (normlab.InstanceNorm1d, {"track_running_stats": 1}, TypeError, "track_running_stats"),
    # Batch Renormalization
    (normlab.BatchRenorm1d, {"r_max": 0.5}, ValueError, "r_max"),
    (normlab.BatchRenorm1d, {"r_max": NAN}, ValueError, "r_max"),
    (normlab.BatchRenorm1d, {"d_max": -1.0}, ValueError, "d_max"),
    (normlab.BatchRenorm2d, {"d_max": "5"}, TypeError, "d_max"),
    (normlab.BatchRenorm2d, {"warmup_steps": -1}, ValueError, "warmup_steps"),
    (normlab.BatchRenorm3d, {"ramp_steps": 1.5}, TypeError, "ramp_steps"),
    (normlab.BatchRenorm, {"momentum": 3.0}, ValueError, "momentum"),
    # GroupNorm
    (normlab.GroupNorm, {"num_groups": 0}, ValueError, "num_groups"),
    (normlab.GroupNorm, {"num_groups": 2.0}, TypeError, "num_groups"),
    (normlab.GroupNorm, {"num_channels": 0}, ValueError, "num_channels"),
    (normlab.GroupNorm, {"num_channels": 5}, ValueError, "num_channels"),  # not divisible
    (normlab.GroupNorm, {"eps": -1.0}, ValueError, "eps"),
    (normlab.GroupNorm, {"affine": None}, TypeError, "affine"),
    (normlab.GroupNorm, {"bias": "yes"}, TypeError, "bias"),
    (normlab.GroupNorm, {"dtype": torch.int8}, TypeError, "dtype"),
    # PowerNorm
    (normlab.PowerNorm, {"num_features": 0}, ValueError, "num_features"),
    (normlab.PowerNorm, {"eps": -1.0}, ValueError, "eps"),
    (normlab.PowerNorm, {"alpha_fwd": 1.5}, ValueError, "alpha_fwd"),
    (normlab.PowerNorm, {"alpha_bkw": -0.5}, ValueError, "alpha_bkw"),
    (normlab.PowerNorm, {"alpha_bkw": "0.9"}, TypeError, "alpha_bkw"),
    (normlab.PowerNorm, {"affine": "yes"}, TypeError, "affine"),
    (normlab.PowerNorm, {"warmup_iters": -1}, ValueError, "warmup_iters"),
    (normlab.PowerNorm, {"warmup_iters": 10.0}, TypeError, "warmup_iters"),
    (normlab.PowerNorm, {"dim": None}, TypeError, "dim"),
    (normlab.PowerNorm, {"bias": 1}, TypeError, "bias"),
    (normlab.PowerNorm, {"dtype": torch.int16}, TypeError, "dtype"),
]

# The positional arguments every constructor needs (replaced by the bad keyword if named).
REQUIRED = {
    normlab.LayerNorm: {"normalized_shape": 4},
    normlab.RMSNorm: {"normalized_shape": 4},
    normlab.GroupNorm: {"num_groups": 2, "num_channels": 4},
}


def _id(entry):
    cls, kwargs, _, _ = entry
    (key, value), *_ = kwargs.items()
    return f"{cls.__name__}-{key}={value!r}"


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "argument"),
    BAD_CONSTRUCTOR_ARGUMENTS,
    ids=[_id(e) for e in BAD_CONSTRUCTOR_ARGUMENTS],
)
def test_bad_constructor_argument_is_refused_naming_it(cls, kwargs, error, argument):
    arguments = {**REQUIRED.get(cls, {"num_features": 4}), **kwargs}
    with pytest.raises(error, match=rf"\b{argument}\b") as raised:
        cls(**arguments)
    message = str(raised.value)
    # the message also says what came (the value, or its type)
    value = kwargs[argument] if argument in kwargs else None
    assert value is None or repr(value) in message or type(value).__name__ in message, message


VALID_EDGES = [
    (normlab.LayerNorm, {"eps": 0.0}),
    (normlab.LayerNorm, {"eps": np.float32(1e-6)}),
    (normlab.LayerNorm, {"eps": torch.tensor(1e-5)}),  # torch.nn takes a one-element tensor
    (normlab.LayerNorm, {"dtype": torch.float16}),
    (normlab.RMSNorm, {"eps": None}),
    (normlab.BatchNorm1d, {"momentum": None}),
    (normlab.BatchNorm1d, {"momentum": 0.0}),
    (normlab.BatchNorm1d, {"momentum": 1}),
    (normlab.BatchNorm1d, {"num_features": np.int64(4)}),
    (normlab.BatchNorm1d, {"affine": np.bool_(True)}),
    (normlab.BatchRenorm1d, {"r_max": math.inf, "d_max": math.inf}),  # no clipping
    (normlab.BatchRenorm1d, {"r_max": 1, "d_max": 0}),
    (normlab.PowerNorm, {"alpha_fwd": 0.0, "alpha_bkw": 1.0, "warmup_iters": 0}),
    (normlab.GroupNorm, {"num_groups": 1, "num_channels": 1}),
]


@pytest.mark.parametrize(("cls", "kwargs"), VALID_EDGES, ids=[_id((*e, 0, 0)) for e in VALID_EDGES])
def test_edge_values_that_are_valid_are_accepted(cls, kwargs):
    cls(**{**REQUIRED.get(cls, {"num_features": 4}), **kwargs})


def test_constructor_errors_come_before_any_state_is_built():
    """The first bad argument fails the constructor: nothing half-built is returned."""
    with pytest.raises(ValueError, match=r"^BatchNorm1d: momentum"):
        normlab.BatchNorm1d(4, momentum=2.0)
    with pytest.raises(ValueError, match=r"^GroupNorm: num_groups"):
        normlab.GroupNorm(0, 4)  # was a ZeroDivisionError


# --- functional arguments ------------------------------------------------------------------

X = torch.randn(2, 4, 5)
BAD_FUNCTIONAL_ARGUMENTS = {
    "mask-float": (
        lambda: F.batch_norm(X, None, None, training=True, mask=torch.ones(2, 5)),
        TypeError,
        r"batch_norm: mask must have dtype torch.bool",
    ),
    "mask-shape": (
        lambda: F.group_norm(X, 2, mask=torch.ones(3, 5, dtype=torch.bool)),
        ValueError,
        r"group_norm: mask must have the input's shape without the channel axis",
    ),
    "mask-not-a-tensor": (
        lambda: F.instance_norm(X, mask=[[True] * 5] * 2),
        TypeError,
        r"instance_norm: mask must be a bool torch.Tensor",
    ),
    "mask-and-lengths": (
        lambda: F.batch_norm(
            X, None, None, training=True, mask=torch.ones(2, 5, dtype=torch.bool), lengths=[5, 5]
        ),
        ValueError,
        r"either mask or lengths",
    ),
    "lengths-float": (
        lambda: F.group_norm(X, 2, lengths=torch.tensor([1.0, 2.0])),
        TypeError,
        r"group_norm: lengths must be a 1-D integer tensor",
    ),
    "lengths-count": (
        lambda: F.instance_norm(X, lengths=torch.tensor([5, 5, 5])),
        ValueError,
        r"lengths must have one entry per sample",
    ),
    "lengths-range": (
        lambda: F.batch_norm(X, None, None, training=True, lengths=torch.tensor([6, 2])),
        ValueError,
        r"lengths must be in \[0, 5\]",
    ),
    "running_mean-size": (
        lambda: F.batch_norm(X, torch.zeros(3), torch.ones(4), training=True),
        ValueError,
        r"batch_norm: running_mean must have shape \(4,\), got \(3,\)",
    ),
    "running_var-size": (
        lambda: F.instance_norm(X, torch.zeros(4), torch.ones(5)),
        ValueError,
        r"instance_norm: running_var must have shape \(4,\), got \(5,\)",
    ),
    "running_phi-size": (
        lambda: F.power_norm(X, torch.ones(4), torch.zeros(5), training=True),
        ValueError,
        r"power_norm: running_phi must have shape \(5,\), got \(4,\)",
    ),
    "running_grad_stat-missing": (
        lambda: F.power_norm(X, torch.ones(5), None),
        ValueError,
        r"power_norm: running_grad_stat is required",
    ),
    "renorm-running-missing": (
        lambda: F.batch_renorm(X, None, None, training=True),
        ValueError,
        r"batch_renorm: running_mean and running_var are required",
    ),
    "renorm-r_max": (
        lambda: F.batch_renorm(X, torch.zeros(4), torch.ones(4), training=True, r_max=0.5),
        ValueError,
        r"batch_renorm: expected r_max >= 1",
    ),
    "eps-negative": (
        lambda: F.layer_norm(X, (5,), eps=-1e-5),
        ValueError,
        r"layer_norm: eps must be a finite number >= 0.0, got -1e-05",
    ),
    "eps-nan": (
        lambda: F.group_norm(X, 2, eps=float("nan")),
        ValueError,
        r"group_norm: eps must be a finite number >= 0.0, got nan",
    ),
    "eps-inf": (
        lambda: F.rms_norm(X, (5,), eps=float("inf")),
        ValueError,
        r"rms_norm: eps must be a finite number >= 0.0, got inf",
    ),
    "momentum-above-1": (
        lambda: F.batch_norm(X, torch.zeros(4), torch.ones(4), training=True, momentum=2.0),
        ValueError,
        r"batch_norm: momentum must be a finite number in \[0.0, 1.0\], got 2.0",
    ),
    "momentum-negative": (
        lambda: F.instance_norm(
            X, torch.zeros(4), torch.ones(4), use_input_stats=True, momentum=-0.1
        ),
        ValueError,
        r"instance_norm: momentum must be a finite number in \[0.0, 1.0\]",
    ),
    "alpha_bkw": (
        lambda: F.power_norm(X, torch.ones(5), torch.zeros(5), training=True, alpha_bkw=1.5),
        ValueError,
        r"power_norm: alpha_bkw must be a finite number in \[0.0, 1.0\]",
    ),
    "virtual_batch_size": (
        lambda: F.batch_norm(X, None, None, training=True, virtual_batch_size=0),
        ValueError,
        r"batch_norm: virtual_batch_size must be a positive int",
    ),
    "num_groups": (
        lambda: F.group_norm(X, 3),
        ValueError,
        r"group_norm: the channel count must be divisible by num_groups",
    ),
    "residual-shape": (
        lambda: F.add_layer_norm(X, torch.randn(2, 4, 4), (5,)),
        ValueError,
        r"add_layer_norm: residual must have the input's shape",
    ),
    "residual-type": (
        lambda: F.add_rms_norm(X, 1.0, (5,)),
        TypeError,
        r"add_rms_norm: residual must be a Tensor",
    ),
}


@pytest.mark.parametrize("name", list(BAD_FUNCTIONAL_ARGUMENTS))
def test_bad_functional_argument_is_refused_naming_it(name):
    call, error, pattern = BAD_FUNCTIONAL_ARGUMENTS[name]
    with pytest.raises(error, match=pattern):
        call()


@pytest.mark.parametrize("buffer", ["running_mean", "running_var"])
def test_module_with_running_stats_of_another_size_names_the_buffer(buffer):
    module = normlab.BatchNorm1d(4)
    setattr(module, buffer, torch.zeros(3))
    for training in (True, False):
        module.train(training)
        with pytest.raises(ValueError, match=rf"{buffer} must have shape \(4,\), got \(3,\)"):
            module(X)


def test_checkpoint_with_running_stats_of_another_size_is_refused_naming_them():
    source = normlab.BatchNorm1d(3).state_dict()
    with pytest.raises(RuntimeError, match=re.escape("size mismatch for running_mean")):
        normlab.BatchNorm1d(4).load_state_dict(source)
