"""Bad input raises the documented error, before any computation, with a message that names
the argument, what was expected and what came."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab import functional as F


def _shape(shape):
    """A shape as the messages print it, escaped for ``match``."""
    return re.escape(str(list(shape)))


# ----------------------------------------------------------------------------------------------
# layer_norm / rms_norm: normalized_shape and weight


@pytest.mark.parametrize("fn", [F.layer_norm, F.rms_norm])
def test_functional_trailing_shape_mismatch_names_normalized_shape_and_input_shape(fn):
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"normalized_shape") as info:
        fn(x, (4,))
    message = str(info.value)
    assert "[4]" in message  # what was expected
    assert "[2, 3, 5]" in message  # what came
    assert fn.__name__ in message


@pytest.mark.parametrize("fn", [F.layer_norm, F.rms_norm])
def test_functional_multi_axis_normalized_shape_mismatch(fn):
    with pytest.raises(ValueError, match=r"\[3, 4\].*normalized_shape.*\[2, 3, 5\]"):
        fn(torch.randn(2, 3, 5), (3, 4))


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_module_trailing_shape_mismatch_names_normalized_shape_and_input_shape(cls):
    m = cls(4)
    with pytest.raises(ValueError, match=r"normalized_shape.*" + _shape((2, 3, 5))):
        m(torch.randn(2, 3, 5))


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_input_with_too_few_dimensions_for_normalized_shape(cls):
    with pytest.raises(ValueError, match=r"input.*at least 2 dimensions.*normalized_shape.*got 1"):
        cls((3, 4))(torch.randn(4))


def test_shape_mismatch_at_dim_names_the_dim():
    with pytest.raises(ValueError, match=r"shape at dim \(1,\) \[4\].*" + _shape((2, 3, 5))):
        F.layer_norm(torch.randn(2, 3, 5), 4, dim=1)


@pytest.mark.parametrize("fn", [F.layer_norm, F.rms_norm])
def test_functional_weight_of_wrong_shape_names_weight(fn):
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\), got \(3,\)"):
        fn(torch.randn(2, 4), (4,), torch.ones(3))


def test_functional_layer_norm_bias_of_wrong_shape_names_bias():
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\), got \(4, 1\)"):
        F.layer_norm(torch.randn(2, 4), (4,), torch.ones(4), torch.zeros(4, 1))


def test_weight_is_not_silently_broadcast():
    # A (1,) weight would broadcast; the check refuses anything but exactly normalized_shape.
    with pytest.raises(ValueError, match=r"weight.*\(4,\).*\(1,\)"):
        F.layer_norm(torch.randn(2, 4), (4,), torch.ones(1))


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_module_with_replaced_weight_of_wrong_shape_names_weight(cls):
    m = cls(4)
    m.weight = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\), got \(3,\)"):
        m(torch.randn(2, 4))


def test_weight_that_is_not_a_tensor_is_a_type_error():
    with pytest.raises(TypeError, match=r"weight must be a torch.Tensor or None, got list"):
        F.layer_norm(torch.randn(2, 4), (4,), [1.0] * 4)


def test_bool_entry_in_normalized_shape_is_a_type_error():
    with pytest.raises(TypeError, match=r"normalized_shape.*got \(4, True\)"):
        F.layer_norm(torch.randn(2, 4), (4, True))


@pytest.mark.parametrize("bad", [0, -1, (), (3, 0)])
def test_invalid_normalized_shape_is_a_value_error(bad):
    with pytest.raises(ValueError, match=r"normalized_shape.*got"):
        F.layer_norm(torch.randn(2, 4), bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda: F.layer_norm(torch.randn(2, 4), 4.0),
        lambda: F.rms_norm(torch.randn(2, 4), 4.0),
        lambda: normlab.LayerNorm(4.0),
    ],
    ids=["layer_norm", "rms_norm", "LayerNorm"],
)
def test_float_normalized_shape_error_names_normalized_shape(make):
    with pytest.raises(TypeError, match=r"normalized_shape.*got float 4.0"):
        make()


# ----------------------------------------------------------------------------------------------
# dim


def test_layernorm_dim_out_of_range_is_an_index_error_naming_dim():
    m = normlab.LayerNorm(3, dim=5)
    with pytest.raises(IndexError, match=r"dim.*4 dimensions.*\[-4, 3\].*got 5"):
        m(torch.randn(2, 3, 4, 4))


def test_layernorm_negative_dim_out_of_range_is_an_index_error():
    with pytest.raises(IndexError, match=r"dim.*got -5"):
        F.layer_norm(torch.randn(2, 3, 4, 4), 2, dim=-5)


def test_batchnorm_dim_out_of_range_is_an_index_error_naming_dim():
    m = normlab.BatchNorm(3, dim=3)
    with pytest.raises(IndexError, match=r"dim.*3 dimensions.*\[-3, 2\].*got 3"):
        m(torch.randn(2, 3, 4))
    with pytest.raises(IndexError, match=r"dim.*got 3"):
        F.batch_norm(torch.randn(2, 3, 4), None, None, training=True, dim=3)


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_dim_with_wrong_count_of_axes_is_a_value_error_at_construction(cls):
    with pytest.raises(ValueError, match=r"dim: expected 2 axis/axes.*normalized_shape.*got 1"):
        cls((3, 4), dim=1)
    with pytest.raises(ValueError, match=r"dim: expected 1 axis/axes.*got \(1, 2\)"):
        cls(3, dim=(1, 2))


@pytest.mark.parametrize("fn", [F.layer_norm, F.rms_norm])
def test_functional_dim_with_wrong_count_of_axes_is_a_value_error(fn):
    with pytest.raises(ValueError, match=r"dim: expected 2 axis/axes.*got 1"):
        fn(torch.randn(2, 3, 4), (3, 4), dim=1)


@pytest.mark.parametrize("dim", [(2, 1), (1, 1), (-1, 1)])
def test_non_increasing_dims_are_a_value_error(dim):
    x = torch.randn(2, 3, 3, 5)
    with pytest.raises(ValueError, match=r"dim: expected distinct axes in increasing order"):
        normlab.LayerNorm((3, 3), dim=dim)(x)
    with pytest.raises(ValueError, match=re.escape(f"got {dim!r}")):
        F.rms_norm(x, (3, 3), dim=dim)


def test_non_int_axis_in_dim_is_a_type_error_naming_dim():
    with pytest.raises(TypeError, match=r"dim: expected an int axis.*got \(1.0,\).*is a float"):
        F.layer_norm(torch.randn(2, 3), 3, dim=(1.0,))
    with pytest.raises(TypeError, match=r"dim: expected an int axis, got float 1.0"):
        normlab.BatchNorm(3, dim=1.0)(torch.randn(2, 3))


def test_non_int_scalar_dim_is_a_type_error_naming_dim():
    with pytest.raises(TypeError, match=r"dim.*int.*got float"):
        F.layer_norm(torch.randn(2, 3), 3, dim=1.0)


# ----------------------------------------------------------------------------------------------
# GroupNorm


def test_groupnorm_channels_not_divisible_by_groups_fails_at_construction():
    with pytest.raises(ValueError, match=r"num_channels \(6\).*divisible.*num_groups \(4\)"):
        normlab.GroupNorm(4, 6)


def test_functional_group_norm_channels_not_divisible_by_groups():
    with pytest.raises(ValueError, match=r"divisible by num_groups.*6 channels.*num_groups=4"):
        F.group_norm(torch.randn(2, 6, 5), 4)


@pytest.mark.parametrize("bad", [0, -2, 2.0, True])
def test_functional_group_norm_invalid_num_groups(bad):
    with pytest.raises(ValueError, match=r"num_groups must be a positive int, got"):
        F.group_norm(torch.randn(2, 4, 5), bad)


def test_groupnorm_channel_count_mismatch_names_channels_and_input_shape():
    m = normlab.GroupNorm(2, 4)
    with pytest.raises(ValueError, match=r"4 channels.*" + _shape((2, 6, 5))):
        m(torch.randn(2, 6, 5))


def test_groupnorm_one_value_per_group_is_refused():
    # 4 groups of 1 channel, no spatial positions: every group holds a single value.
    with pytest.raises(ValueError, match=r"more than 1 value per group.*" + _shape((2, 4))):
        normlab.GroupNorm(4, 4)(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"more than 1 value per group"):
        F.group_norm(torch.randn(3, 2, 1, 1), 2)


def test_functional_group_norm_weight_of_wrong_shape():
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\), got \(2,\)"):
        F.group_norm(torch.randn(2, 4, 3), 2, torch.ones(2))


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: F.group_norm(x, 1),
        lambda x: F.instance_norm(x),
        lambda x: normlab.GroupNorm(1, 4)(x),
    ],
)
def test_channel_norms_need_at_least_two_dimensions(fn):
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*\(N, C, \*spatial\).*\(4,\)"):
        fn(torch.randn(4))


# ----------------------------------------------------------------------------------------------
# BatchNorm


@pytest.mark.parametrize(
    "m, x",
    [
        (normlab.BatchNorm1d(3), torch.randn(4, 5)),
        (normlab.BatchNorm2d(3), torch.randn(2, 4, 3, 3)),
        (normlab.BatchNorm3d(3), torch.randn(2, 4, 2, 2, 2)),
        (normlab.BatchNorm(3, dim=-1), torch.randn(2, 5, 4)),
    ],
)
def test_batchnorm_channel_count_mismatch_names_num_features_and_input_shape(m, x):
    with pytest.raises(ValueError, match=r"num_features \(3\).*" + _shape(x.shape)):
        m(x)
    m.eval()
    with pytest.raises(ValueError, match=r"num_features \(3\)"):
        m(x)


def test_batchnorm_channel_mismatch_does_not_count_a_batch():
    m = normlab.BatchNorm1d(3)
    with pytest.raises(ValueError):
        m(torch.randn(4, 5))
    assert int(m.num_batches_tracked) == 0
    assert torch.equal(m.running_mean, torch.zeros(3))


@pytest.mark.parametrize(
    "cls, bad_shape, expected",
    [
        (normlab.BatchNorm1d, (2, 3, 4, 4), r"expected 2D or 3D input.*\(got 4D input\)"),
        (normlab.BatchNorm1d, (3,), r"expected 2D or 3D input.*\(got 1D input\)"),
        (normlab.BatchNorm2d, (2, 3, 4), r"expected 4D input \(N, C, H, W\) \(got 3D input\)"),
        (normlab.BatchNorm2d, (2, 3, 4, 4, 4), r"expected 4D input.*\(got 5D input\)"),
        (
            normlab.BatchNorm3d,
            (2, 3, 4, 4),
            r"expected 5D input \(N, C, D, H, W\) \(got 4D input\)",
        ),
    ],
)
def test_batchnorm_wrong_rank_names_expected_and_actual_rank(cls, bad_shape, expected):
    with pytest.raises(ValueError, match=expected):
        cls(3)(torch.randn(bad_shape))


def test_batchnorm_single_value_per_channel_in_training_is_refused():
    m = normlab.BatchNorm1d(3)
    x = torch.randn(1, 3)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\[1, 3\]"):
        m(x)
    # In eval the running statistics are used: the same input is fine.
    m.eval()
    y = m(x)
    torch.testing.assert_close(y, x / torch.sqrt(torch.tensor(1.0 + m.eps)))


def test_batchnorm_single_value_per_channel_in_3d_input():
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        normlab.BatchNorm1d(3)(torch.randn(1, 3, 1))
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        normlab.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))


def test_functional_batch_norm_eval_without_running_stats_is_refused():
    x = torch.randn(4, 3)
    with pytest.raises(
        ValueError,
        match=r"running_mean and running_var are required.*"
        r"training=False.*got NoneType and NoneType",
    ):
        F.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match=r"running_mean and running_var.*got Tensor and NoneType"):
        F.batch_norm(x, torch.zeros(3), None)


@pytest.mark.parametrize("argument", ["running_mean", "running_var", "weight", "bias"])
def test_functional_batch_norm_argument_of_wrong_shape_names_it(argument):
    args = {
        "running_mean": torch.zeros(3),
        "running_var": torch.ones(3),
        "weight": torch.ones(3),
        "bias": torch.zeros(3),
    }
    args[argument] = torch.ones(4)
    with pytest.raises(ValueError, match=argument + r" must have shape \(3,\), got \(4,\)"):
        F.batch_norm(
            torch.randn(5, 3),
            args["running_mean"],
            args["running_var"],
            args["weight"],
            args["bias"],
            training=True,
        )


def test_functional_batch_norm_validates_before_updating_running_stats():
    running_mean = torch.zeros(3)
    with pytest.raises(ValueError, match=r"running_var"):
        F.batch_norm(torch.randn(5, 3) + 10, running_mean, torch.ones(2), training=True)
    assert torch.equal(running_mean, torch.zeros(3))


def test_functional_batch_norm_running_mean_wrong_shape_with_channel_last_dim():
    with pytest.raises(ValueError, match=r"running_mean must have shape \(4,\), got \(3,\)"):
        F.batch_norm(torch.randn(2, 5, 4), torch.zeros(3), torch.ones(4), dim=-1)


# ----------------------------------------------------------------------------------------------
# InstanceNorm


@pytest.mark.parametrize(
    "m, x, seen",
    [
        (normlab.InstanceNorm1d(3), torch.randn(2, 3, 1), (2, 3, 1)),
        (
            normlab.InstanceNorm1d(3, affine=True, track_running_stats=True),
            torch.randn(2, 3, 1),
            (2, 3, 1),
        ),
        (normlab.InstanceNorm2d(3), torch.randn(2, 3, 1, 1), (2, 3, 1, 1)),
        (normlab.InstanceNorm3d(3), torch.randn(3, 1, 1, 1), (1, 3, 1, 1, 1)),  # unbatched
    ],
)
def test_instancenorm_spatial_size_one_in_training_is_refused(m, x, seen):
    with pytest.raises(ValueError, match=r"more than 1 value per instance.*" + _shape(seen)):
        m(x)


def test_instancenorm_spatial_size_one_with_running_stats_in_eval_works():
    m = normlab.InstanceNorm1d(3, track_running_stats=True).eval()
    x = torch.randn(2, 3, 1)
    torch.testing.assert_close(m(x), x / torch.sqrt(torch.tensor(1.0 + m.eps)))


@pytest.mark.parametrize(
    "cls, bad_shape, expected",
    [
        (normlab.InstanceNorm1d, (2, 3, 4, 4), r"expected 2D or 3D input \(got 4D input\)"),
        (normlab.InstanceNorm1d, (3,), r"expected 2D or 3D input \(got 1D input\)"),
        (normlab.InstanceNorm2d, (2, 3), r"expected 3D or 4D input \(got 2D input\)"),
        (normlab.InstanceNorm2d, (2, 3, 4, 4, 4), r"expected 3D or 4D input \(got 5D input\)"),
        (normlab.InstanceNorm3d, (2, 3, 4), r"expected 4D or 5D input \(got 3D input\)"),
    ],
)
def test_instancenorm_wrong_rank_names_expected_and_actual_rank(cls, bad_shape, expected):
    with pytest.raises(ValueError, match=expected):
        cls(3)(torch.randn(bad_shape))


@pytest.mark.parametrize("x, channel_dim", [(torch.randn(2, 4, 5), 1), (torch.randn(4, 5), 0)])
def test_instancenorm_affine_channel_mismatch_is_a_value_error(x, channel_dim):
    m = normlab.InstanceNorm1d(3, affine=True)
    with pytest.raises(ValueError, match=rf"size at dim={channel_dim}.*num_features \(3\).*got: 4"):
        m(x)


def test_instancenorm_channel_mismatch_without_affine_warns_and_normalizes():
    m = normlab.InstanceNorm1d(3)
    x = torch.randn(2, 4, 5)
    with pytest.warns(UserWarning, match=r"dim=1 does not match num_features.*affine=False"):
        y = m(x)
    expected = (x - x.mean(2, keepdim=True)) / torch.sqrt(
        x.var(2, keepdim=True, correction=0) + m.eps
    )
    torch.testing.assert_close(y, expected)


def test_instancenorm_matching_channels_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normlab.InstanceNorm1d(3)(torch.randn(2, 3, 5))


@pytest.mark.parametrize("argument", ["running_mean", "running_var", "weight", "bias"])
def test_functional_instance_norm_argument_of_wrong_shape_names_it(argument):
    args = {
        "running_mean": torch.zeros(3),
        "running_var": torch.ones(3),
        "weight": torch.ones(3),
        "bias": torch.zeros(3),
    }
    args[argument] = torch.ones(2)
    with pytest.raises(ValueError, match=argument + r" must have shape \(3,\), got \(2,\)"):
        F.instance_norm(torch.randn(2, 3, 4), **args)


def test_functional_instance_norm_without_input_stats_needs_running_stats():
    # The message names the arguments, the condition, and what came instead.
    with pytest.raises(
        ValueError,
        match=r"running_mean and running_var are required.*"
        r"use_input_stats=False.*got",
    ):
        F.instance_norm(torch.randn(2, 3, 4), use_input_stats=False)


# ----------------------------------------------------------------------------------------------
# Input type


FUNCTIONALS = {
    "layer_norm": lambda x: F.layer_norm(x, (4,)),
    "rms_norm": lambda x: F.rms_norm(x, (4,)),
    "rms_norm-eps": lambda x: F.rms_norm(x, (4,), eps=1e-6),
    "batch_norm-train": lambda x: F.batch_norm(x, None, None, training=True),
    "batch_norm-eval": lambda x: F.batch_norm(x, torch.zeros(3), torch.ones(3)),
    "instance_norm": lambda x: F.instance_norm(x),
    "group_norm": lambda x: F.group_norm(x, 1),
}


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
@pytest.mark.parametrize("call", list(FUNCTIONALS))
def test_non_floating_input_is_a_type_error_naming_the_dtype(call, dtype):
    x = torch.ones(2, 3, 4).to(dtype)
    with pytest.raises(
        TypeError,
        match=r"input must be a floating-point tensor, got dtype " + re.escape(str(dtype)),
    ):
        FUNCTIONALS[call](x)


@pytest.mark.parametrize("bad", [[[1.0] * 4] * 3, np.ones((2, 3, 4)), 1.5, None])
@pytest.mark.parametrize("call", list(FUNCTIONALS))
def test_non_tensor_input_is_a_type_error_naming_the_type(call, bad):
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor, got " + type(bad).__name__):
        FUNCTIONALS[call](bad)


@pytest.mark.parametrize(
    "module",
    [
        normlab.LayerNorm(4),
        normlab.RMSNorm(4),
        normlab.BatchNorm1d(3),
        normlab.GroupNorm(1, 3),
        normlab.InstanceNorm1d(3),
        normlab.BatchNorm(4, dim=-1),
    ],
)
def test_modules_refuse_integer_input_with_a_type_error(module):
    with pytest.raises(TypeError, match=r"floating"):
        module(torch.ones(2, 3, 4, dtype=torch.int64))


def test_functional_names_itself_in_the_message():
    for name, call in FUNCTIONALS.items():
        with pytest.raises(TypeError, match=r"^" + name.split("-")[0] + ":"):
            call(torch.ones(2, 3, 4, dtype=torch.int64))
