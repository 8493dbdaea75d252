"""Fuzz of the module constructors (issue #8): every normlab module built from arbitrary
argument values either refuses with a TypeError/ValueError naming the class, or is a working
module: a forward in training and in eval on an input of the shape it declares gives an
output of that shape (finite, from finite input), and its state_dict loads into a module
built with the same arguments. ``python -m tests.fuzz_api`` fuzzes the functional API.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import normlab
from strategies import budget

MODULES = [getattr(normlab, name) for name in normlab.modules.__all__ if name[0].isupper()]

# Values an argument may take: plausible ones and garbage of every kind.
GARBAGE = st.sampled_from(
    [None, True, False, 0, 1, -1, 2, 3, 7, 2**20, 0.0, 1e-5, -1e-5, 0.5, 1.5, 1e30,
     math.nan, math.inf, -math.inf, "1", "", (), (2,), (2, 3), [3], {"a": 1}, 1j, object(),
     torch.tensor(0.1), torch.tensor([1, 2]), torch.float16, torch.int64, torch.float64, "cpu",
     torch.device("cpu"), -2, 4]
)  # fmt: skip


def _parameters(cls):
    return [
        p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name not in ("self", "device", "process_group")
    ]


@st.composite
def constructions(draw):
    """A module class and arguments: each parameter kept at its default, set to a valid
    small value, or replaced by garbage."""
    cls = draw(st.sampled_from(MODULES))
    kwargs = {}
    for p in _parameters(cls):
        required = p.default is inspect.Parameter.empty
        choice = draw(st.sampled_from(["default", "valid", "garbage"]))
        if choice == "garbage":
            kwargs[p.name] = draw(GARBAGE)
        elif choice == "valid" or required:
            kwargs[p.name] = _valid(cls, p.name, draw)
    return cls, kwargs


def _valid(cls, name, draw):
    small = {
        "num_features": 4,
        "num_channels": 4,
        "num_groups": 2,
        "normalized_shape": (4,),
        "virtual_batch_size": None,
    }
    if name in small:
        return small[name]
    if name in ("eps", "momentum", "alpha_fwd", "alpha_bkw"):
        return draw(st.sampled_from([1e-5, 0.1, 0.9]))
    if name in ("affine", "track_running_stats", "elementwise_affine", "bias"):
        return draw(st.booleans())
    if name == "dtype":
        return draw(st.sampled_from([None, torch.float32, torch.float64]))
    if name in ("warmup_iters", "warmup_steps", "ramp_steps"):
        return draw(st.integers(0, 3))
    if name in ("r_max", "d_max"):
        return draw(st.sampled_from([1.0, 3.0, math.inf]))
    if name == "dim":
        return draw(st.sampled_from([None, 1, -1])) if "Norm" in cls.__name__ else 1
    if name == "offset":
        return draw(st.sampled_from([0.0, 1.0]))
    return inspect.signature(cls.__init__).parameters[name].default


def _input_for(module) -> torch.Tensor | None:
    """A finite input of the shape the module declares (None when it declares none that
    this fuzz knows how to build)."""
    dtype = next((t.dtype for t in module.state_dict().values() if t.is_floating_point()), None)
    dtype = dtype or torch.get_default_dtype()
    gen = torch.Generator().manual_seed(0)
    name = type(module).__name__
    if name in ("LayerNorm", "RMSNorm"):
        shape = (3, 2, *module.normalized_shape)
        dim = module.dim
        if dim is not None:
            return None  # the axes are the user's choice: covered by the functional fuzz
    elif name == "GroupNorm":
        shape = (3, module.num_channels, 5)
    elif name.startswith("InstanceNorm"):
        shape = (3, module.num_features) + (5,) * (int(name[-2]) if name[-2].isdigit() else 1)
    elif name == "PowerNorm":
        shape = (3, 5, module.num_features) if module.dim in (-1, 2) else None
    else:  # the BatchNorm family
        rank = {"1d": 3, "2d": 4, "3d": 5}.get(name[-2:], 3)
        if getattr(module, "dim", 1) not in (1, -rank + 1):
            return None
        ghost = getattr(module, "virtual_batch_size", None)  # the batch must split evenly
        shape = (2 * (ghost or 2), module.num_features) + (3,) * (rank - 2)
    if shape is None or math.prod(shape) > 10_000:
        return None
    return torch.randn(shape, generator=gen).to(dtype)


@budget(ci_examples=400)
@given(constructions())
def test_constructor_refuses_clearly_or_builds_a_working_module(case):
    cls, kwargs = case
    try:
        module = cls(**kwargs)
    except (TypeError, ValueError) as error:
        assert cls.__name__ in str(error) or any(k in str(error) for k in kwargs), (
            f"{cls.__name__}({kwargs}): the error names neither the class nor an argument: {error}"
        )
        return
    x = _input_for(module)
    if x is None:
        return
    for training in (True, False):
        module.train(training)
        y = module(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        if module.training and min(x.shape[0], 2) == 2:
            assert torch.isfinite(y).all(), f"{cls.__name__}({kwargs}) gave non-finite output"
    twin = cls(**kwargs)
    twin.load_state_dict(module.state_dict())
    for a, b in zip(twin.state_dict().values(), module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_every_module_is_fuzzed(cls):
    """The strategy reaches every module class, and each has a valid construction."""
    kwargs = {p.name: _valid(cls, p.name, None) for p in _parameters(cls) if p.name in (
        "num_features", "num_channels", "num_groups", "normalized_shape")}  # fmt: skip
    assert isinstance(cls(**kwargs), torch.nn.Module)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_eps_none_is_refused_at_construction_except_by_rms_norm(cls):
    """Found by this fuzz: BatchNorm(4, eps=None) was built and failed at its first forward."""
    kwargs = {p.name: _valid(cls, p.name, None) for p in _parameters(cls) if p.name in (
        "num_features", "num_channels", "num_groups", "normalized_shape")}  # fmt: skip
    if cls is normlab.RMSNorm:  # torch.nn.RMSNorm's default: torch.finfo(dtype).eps
        assert cls(**kwargs, eps=None).eps is None
        return
    with pytest.raises(TypeError, match=f"{cls.__name__}: eps must be a real number"):
        cls(**kwargs, eps=None)
