"""Drop-in compatibility with torch.nn: constructor, attributes, repr, state_dict keys and
checkpoints move between torch.nn and normlab modules with ``strict=True``."""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict

import pytest
import torch
from torch import nn

import normlab
from tolerances import tol

# id: (class name, constructor args, constructor kwargs, input shape)
CASES = {
    "LayerNorm": ("LayerNorm", (6,), {}, (4, 5, 6)),
    "LayerNorm-2d-shape": ("LayerNorm", ([5, 6],), {}, (4, 5, 6)),
    "LayerNorm-no-bias": ("LayerNorm", (6,), {"bias": False}, (4, 5, 6)),
    "LayerNorm-no-affine": ("LayerNorm", (6,), {"elementwise_affine": False}, (4, 5, 6)),
    "LayerNorm-eps": ("LayerNorm", (6,), {"eps": 1e-3}, (3, 6)),
    "RMSNorm": ("RMSNorm", (6,), {}, (4, 5, 6)),
    "RMSNorm-2d-shape-eps": ("RMSNorm", ((5, 6),), {"eps": 1e-6}, (4, 5, 6)),
    "RMSNorm-no-affine": ("RMSNorm", (6,), {"elementwise_affine": False}, (4, 6)),
    "BatchNorm1d-2D": ("BatchNorm1d", (4,), {}, (8, 4)),
    "BatchNorm1d-3D": ("BatchNorm1d", (4,), {}, (6, 4, 5)),
    "BatchNorm1d-no-bias": ("BatchNorm1d", (4,), {"bias": False}, (8, 4)),
    "BatchNorm2d": ("BatchNorm2d", (3,), {}, (4, 3, 5, 5)),
    "BatchNorm2d-no-affine": ("BatchNorm2d", (3,), {"affine": False}, (4, 3, 5, 5)),
    "BatchNorm2d-untracked": ("BatchNorm2d", (3,), {"track_running_stats": False}, (4, 3, 5, 5)),
    "BatchNorm2d-momentum-none": ("BatchNorm2d", (3,), {"momentum": None}, (4, 3, 2, 2)),
    "BatchNorm3d": ("BatchNorm3d", (3,), {}, (2, 3, 3, 4, 4)),
    "BatchNorm3d-no-affine-untracked": (
        "BatchNorm3d",
        (3,),
        {"affine": False, "track_running_stats": False},
        (2, 3, 3, 4, 4),
    ),
    "GroupNorm": ("GroupNorm", (2, 6), {}, (4, 6, 5)),
    "GroupNorm-2D-spatial": ("GroupNorm", (3, 6), {}, (2, 6, 3, 4)),
    "GroupNorm-no-affine": ("GroupNorm", (2, 6), {"affine": False}, (4, 6, 5)),
    "GroupNorm-no-bias": ("GroupNorm", (3, 6), {"bias": False}, (4, 6, 5)),
    "InstanceNorm1d": ("InstanceNorm1d", (3,), {}, (4, 3, 7)),
    "InstanceNorm2d": ("InstanceNorm2d", (3,), {}, (2, 3, 4, 5)),
    "InstanceNorm3d": ("InstanceNorm3d", (3,), {}, (2, 3, 3, 4, 2)),
    "InstanceNorm1d-affine-tracked": (
        "InstanceNorm1d",
        (3,),
        {"affine": True, "track_running_stats": True},
        (4, 3, 7),
    ),
    "InstanceNorm2d-affine-tracked": (
        "InstanceNorm2d",
        (3,),
        {"affine": True, "track_running_stats": True},
        (2, 3, 4, 5),
    ),
    "InstanceNorm3d-affine-tracked": (
        "InstanceNorm3d",
        (3,),
        {"affine": True, "track_running_stats": True},
        (2, 3, 3, 4, 2),
    ),
}

CLASS_NAMES = sorted({name for name, *_ in CASES.values()})

RUNNING_STATS_CLASSES = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
]


def _pair(case, **extra):
    name, args, kwargs, shape = CASES[case]
    kwargs = {**kwargs, **extra}
    return getattr(normlab, name)(*args, **kwargs), getattr(nn, name)(*args, **kwargs), shape


def _input(shape, dtype=torch.float32):
    x = torch.randn(shape, dtype=torch.float64)
    return (x * 2.0 + 0.5).to(dtype)


def _train(module, shape, steps=3):
    """Give the module non-default parameters and (where tracked) running statistics."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    module.train()
    for _ in range(steps):
        module(_input(shape))
    return module


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def _assert_same_outputs(a, b, shape):
    """Outputs in eval, then in train (which also updates the buffers identically)."""
    for training in (False, True):
        a.train(training)
        b.train(training)
        x = _input(shape)
        torch.testing.assert_close(a(x), b(x), **tol(torch.float32))
    for (name, buf_a), (_, buf_b) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        torch.testing.assert_close(buf_a, buf_b, **tol(torch.float32), msg=name)


# ----------------------------------------------------------------------------------------------
# state_dict keys and loading in both directions


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_keys_and_version_equal_torch(case):
    ours, theirs, _ = _pair(case)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.state_dict()._metadata == theirs.state_dict()._metadata
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]


@pytest.mark.parametrize("case", list(CASES))
def test_trained_torch_checkpoint_loads_strictly_and_gives_same_outputs(case):
    ours, theirs, shape = _pair(case)
    _train(theirs, shape)
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    _assert_same_state(ours, theirs)
    _assert_same_outputs(ours, theirs, shape)


@pytest.mark.parametrize("case", list(CASES))
def test_trained_normlab_checkpoint_loads_strictly_into_torch(case):
    ours, theirs, shape = _pair(case)
    _train(ours, shape)
    result = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    _assert_same_state(ours, theirs)
    _assert_same_outputs(ours, theirs, shape)


@pytest.mark.parametrize("case", ["BatchNorm2d", "InstanceNorm2d-affine-tracked"])
def test_loaded_running_stats_are_the_torch_ones(case):
    ours, theirs, shape = _pair(case)
    _train(theirs, shape, steps=4)
    ours.load_state_dict(theirs.state_dict())
    assert not torch.equal(ours.running_mean, torch.zeros(3))
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert torch.equal(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def test_loading_a_checkpoint_with_extra_keys_is_refused_when_strict():
    ours, theirs, _ = _pair("BatchNorm2d-untracked")
    tracked = nn.BatchNorm2d(3)
    with pytest.raises(RuntimeError, match="running_mean"):
        ours.load_state_dict(tracked.state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="running_mean"):
        theirs.load_state_dict(tracked.state_dict(), strict=True)


# ----------------------------------------------------------------------------------------------
# Constructor, attributes, parameters, repr


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_constructor_signature_defaults_equal_torch(name):
    """torch's arguments, in torch's order with torch's defaults; normlab's additions
    (``dim``, ``virtual_batch_size``, ``offset``) are keyword-only extras."""
    ours = inspect.signature(getattr(normlab, name).__init__).parameters
    theirs = inspect.signature(getattr(nn, name).__init__).parameters
    extras = {"dim", "virtual_batch_size", "offset"}
    ours_torch_part = [(p.name, p.kind, p.default) for p in ours.values() if p.name not in extras]
    assert ours_torch_part == [(p.name, p.kind, p.default) for p in theirs.values()]
    assert all(ours[name].kind is inspect.Parameter.KEYWORD_ONLY for name in extras & set(ours))


ATTRIBUTES = (
    "eps",
    "momentum",
    "affine",
    "track_running_stats",
    "normalized_shape",
    "elementwise_affine",
    "num_groups",
    "num_channels",
    "num_features",
    "training",
)


@pytest.mark.parametrize("case", list(CASES))
def test_attributes_equal_torch(case):
    ours, theirs, _ = _pair(case)
    compared = 0
    for attr in ATTRIBUTES:
        if hasattr(theirs, attr):
            value = getattr(ours, attr)
            assert value == getattr(theirs, attr), attr
            assert type(value) is type(getattr(theirs, attr)), attr
            compared += 1
    assert compared >= 2
    assert (ours.weight is None) == (theirs.weight is None)
    assert (getattr(ours, "bias", None) is None) == (getattr(theirs, "bias", None) is None)


def test_layernorm_normalized_shape_is_a_tuple_for_every_spelling():
    for spelling in (6, [6], (6,), torch.Size([6])):
        assert normlab.LayerNorm(spelling).normalized_shape == (6,)
        assert normlab.RMSNorm(spelling).normalized_shape == (6,)
    assert normlab.LayerNorm([5, 6]).normalized_shape == nn.LayerNorm([5, 6]).normalized_shape
    assert isinstance(normlab.LayerNorm([5, 6]).normalized_shape, tuple)


def test_default_constructor_values():
    bn = normlab.BatchNorm2d(4)
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (1e-5, 0.1, True, True)
    inorm = normlab.InstanceNorm2d(4)
    assert (inorm.eps, inorm.momentum, inorm.affine, inorm.track_running_stats) == (
        1e-5,
        0.1,
        False,
        False,
    )
    ln = normlab.LayerNorm(4)
    assert (ln.eps, ln.elementwise_affine, ln.bias is not None) == (1e-5, True, True)
    rms = normlab.RMSNorm(4)
    assert (rms.eps, rms.elementwise_affine) == (None, True)
    gn = normlab.GroupNorm(2, 4)
    assert (gn.eps, gn.affine) == (1e-5, True)


@pytest.mark.parametrize(
    "factory",
    [
        {},
        {"dtype": torch.float64},
        {"device": "cpu", "dtype": torch.float64},
        {"device": "meta"},
        {"device": torch.device("meta"), "dtype": torch.float16},
    ],
)
@pytest.mark.parametrize("case", list(CASES))
def test_parameters_and_buffers_have_torch_shapes_dtypes_and_devices(case, factory):
    ours, theirs, _ = _pair(case, **factory)
    named = [
        (dict(ours.named_parameters()), dict(theirs.named_parameters())),
        (dict(ours.named_buffers()), dict(theirs.named_buffers())),
    ]
    for ours_tensors, theirs_tensors in named:
        assert list(ours_tensors) == list(theirs_tensors)
        for key, t in theirs_tensors.items():
            o = ours_tensors[key]
            assert o.shape == t.shape, key
            assert o.dtype == t.dtype, key
            assert o.device == t.device, key
            assert o.requires_grad == t.requires_grad, key
    if "dtype" in factory:
        for p in ours.parameters():
            assert p.dtype == factory["dtype"]
    if "device" in factory:
        for t in [*ours.parameters(), *ours.buffers()]:
            assert t.device == torch.device(factory["device"])


@pytest.mark.parametrize("case", list(CASES))
def test_initial_values_equal_torch(case):
    ours, theirs, _ = _pair(case)
    _assert_same_state(ours, theirs)


@pytest.mark.parametrize("case", list(CASES))
def test_repr_equals_torch_for_default_dim(case):
    ours, theirs, _ = _pair(case)
    assert repr(ours) == repr(theirs)
    assert ours.extra_repr() == theirs.extra_repr()


def test_repr_names_a_non_default_dim():
    assert repr(normlab.BatchNorm(4, dim=-1)) == (
        "BatchNorm(4, eps=1e-05, momentum=0.1, affine=True, bias=True, "
        "track_running_stats=True, dim=-1)"
    )
    assert repr(normlab.LayerNorm(4, dim=1)).endswith("bias=True, dim=1)")
    assert repr(normlab.LayerNorm((3, 4), dim=(1, 2))).endswith("dim=(1, 2))")
    assert repr(normlab.RMSNorm(4, dim=1)).endswith("elementwise_affine=True, dim=1)")


def test_batchnorm_with_channel_last_dim_shares_torch_state_dict():
    ours = normlab.BatchNorm(4, dim=-1)
    theirs = _train(nn.BatchNorm1d(4), (8, 4, 5))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    theirs.eval()
    x = _input((8, 5, 4))
    torch.testing.assert_close(
        ours(x), theirs(x.transpose(1, 2)).transpose(1, 2), **tol(torch.float32)
    )


# ----------------------------------------------------------------------------------------------
# Old checkpoints (version 1, without num_batches_tracked)


def _as_version_1(state_dict):
    sd = OrderedDict((k, v) for k, v in state_dict.items() if k != "num_batches_tracked")
    sd._metadata = OrderedDict([("", {"version": 1})])
    return sd


@pytest.mark.parametrize("name", RUNNING_STATS_CLASSES)
@pytest.mark.parametrize("build", ["metadata-attribute", "constructed-ordereddict"])
def test_version_1_checkpoint_without_num_batches_tracked_loads_strictly(name, build):
    kwargs = {"affine": True, "track_running_stats": True}
    shape = {"1d": (4, 3, 5), "2d": (2, 3, 4, 4), "3d": (2, 3, 2, 3, 3)}[name[-2:]]
    source = _train(getattr(nn, name)(3, **kwargs), shape)
    if build == "metadata-attribute":
        sd = source.state_dict()
        del sd["num_batches_tracked"]
        sd._metadata[""]["version"] = 1
    else:
        sd = _as_version_1(source.state_dict())
    assert "num_batches_tracked" not in sd
    ours = getattr(normlab, name)(3, **kwargs)
    result = ours.load_state_dict(sd, strict=True)
    assert result.missing_keys == []
    assert int(ours.num_batches_tracked) == 0
    assert ours.num_batches_tracked.dtype == torch.long
    assert torch.equal(ours.running_mean, source.running_mean)
    assert torch.equal(ours.running_var, source.running_var)
    assert torch.equal(ours.weight, source.weight)


def test_version_2_checkpoint_without_num_batches_tracked_is_refused_when_strict():
    sd = nn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        normlab.BatchNorm1d(3).load_state_dict(sd, strict=True)


def test_version_1_checkpoint_keeps_the_count_of_a_trained_module_as_torch():
    sd = _as_version_1(nn.BatchNorm1d(3).state_dict())
    ours, theirs = normlab.BatchNorm1d(3), nn.BatchNorm1d(3)
    for m in (ours, theirs):
        for _ in range(2):
            m(_input((4, 3)))
        m.load_state_dict(sd, strict=True)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def test_version_1_checkpoint_into_sequential_loads_strictly():
    source = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    _train(source[1], (4, 3))
    sd = source.state_dict()
    del sd["1.num_batches_tracked"]
    sd._metadata["1"]["version"] = 1
    target = nn.Sequential(nn.Linear(3, 3), normlab.BatchNorm1d(3))
    target.load_state_dict(sd, strict=True)
    assert int(target[1].num_batches_tracked) == 0
    assert torch.equal(target[1].running_var, source[1].running_var)


@pytest.mark.parametrize("name", ["InstanceNorm1d", "InstanceNorm2d"])
def test_unversioned_instancenorm_checkpoint_with_stale_running_stats_is_refused_as_torch(name):
    # Before version 1, InstanceNorm saved running stats even when not tracking them.
    sd = OrderedDict([("running_mean", torch.zeros(3)), ("running_var", torch.ones(3))])
    sd._metadata = OrderedDict([("", {})])
    for module in (getattr(nn, name)(3), getattr(normlab, name)(3)):
        for strict in (True, False):  # refused even when not strict (an error, not a key)
            with pytest.raises(RuntimeError, match="running_mean"):
                module.load_state_dict(copy.copy(sd), strict=strict)


# ----------------------------------------------------------------------------------------------
# torch.save / torch.load round trip


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_weights_only_round_trip(case, tmp_path):
    ours, theirs, shape = _pair(case)
    _train(ours, shape)
    path = tmp_path / "norm.pt"
    torch.save(ours.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    again, _, _ = _pair(case)
    again.load_state_dict(loaded, strict=True)
    _assert_same_state(again, ours)
    theirs.load_state_dict(torch.load(path, weights_only=True), strict=True)
    _assert_same_state(theirs, ours)
    _assert_same_outputs(again, theirs, shape)


# ----------------------------------------------------------------------------------------------
# Inside a model


def _model(lib):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        lib.BatchNorm2d(8),
        nn.ReLU(),
        lib.GroupNorm(4, 8),
        lib.InstanceNorm2d(8, affine=True, track_running_stats=True),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        lib.LayerNorm(16),
        lib.RMSNorm(16),
        lib.BatchNorm1d(16, momentum=None),
        nn.Linear(16, 2),
    )


def test_torch_sequential_checkpoint_loads_into_normlab_sequential(tmp_path):
    source = _model(nn)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1)
    for _ in range(3):
        loss = source(torch.randn(6, 3, 4, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    target = _model(normlab)
    assert list(target.state_dict()) == list(source.state_dict())
    target.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert int(target[1].num_batches_tracked) == 3
    for training in (False, True):
        source.train(training)
        target.train(training)
        x = torch.randn(5, 3, 4, 4)
        torch.testing.assert_close(target(x), source(x), atol=1e-4, rtol=1e-4)
    # ... and the other way: the normlab model's checkpoint loads into the torch model.
    fresh = _model(nn)
    fresh.load_state_dict(target.state_dict(), strict=True)
    for key, value in target.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
