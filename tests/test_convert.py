"""normlab.convert: torch.nn <-> normlab norms, and look-alike norms of model libraries."""

import pytest
import torch
from torch import nn

import normlab
from normlab.conversion import ConversionSummary, convert
from tolerances import grad_tol, tol

# (torch module factory, input shape)
TORCH_CASES = {
    "LayerNorm": (lambda: nn.LayerNorm(6), (4, 3, 6)),
    "LayerNorm2d-shape-nobias": (lambda: nn.LayerNorm((3, 6), eps=1e-3, bias=False), (4, 3, 6)),
    "LayerNorm-noaffine": (lambda: nn.LayerNorm(6, elementwise_affine=False), (4, 6)),
    "RMSNorm": (lambda: nn.RMSNorm(6), (4, 3, 6)),
    "RMSNorm-eps": (lambda: nn.RMSNorm((3, 6), eps=1e-4), (4, 3, 6)),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(5, momentum=0.3), (8, 5, 7)),
    "BatchNorm1d-nostats": (lambda: nn.BatchNorm1d(5, track_running_stats=False), (8, 5)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(5, momentum=None), (4, 5, 3, 3)),
    "BatchNorm3d-noaffine": (lambda: nn.BatchNorm3d(5, affine=False), (2, 5, 3, 2, 2)),
    "SyncBatchNorm": (lambda: nn.SyncBatchNorm(5, eps=1e-3), (4, 5, 3, 3)),
    "GroupNorm": (lambda: nn.GroupNorm(2, 6), (4, 6, 5)),
    "GroupNorm-nobias": (lambda: nn.GroupNorm(3, 6, bias=False), (4, 6, 5)),
    "InstanceNorm1d": (lambda: nn.InstanceNorm1d(5), (4, 5, 7)),
    "InstanceNorm2d": (
        lambda: nn.InstanceNorm2d(5, affine=True, track_running_stats=True),
        (4, 5, 3, 3),
    ),
    "InstanceNorm3d": (lambda: nn.InstanceNorm3d(5, affine=True), (2, 5, 3, 2, 2)),
}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial parameters and running statistics, so that copying them is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
            elif name.endswith("num_batches_tracked"):
                b.fill_(3)
    return model


def _assert_same_state(a: nn.Module, b: nn.Module, exact: bool = True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert sa[key].device == sb[key].device, key
        close = {"rtol": 0, "atol": 0} if exact else tol(torch.float32)
        torch.testing.assert_close(sa[key], sb[key], **close)


@pytest.mark.parametrize("case", list(TORCH_CASES))
@pytest.mark.parametrize("training", [True, False])
def test_every_torch_norm_round_trips(case, training):
    make, shape = TORCH_CASES[case]
    torch.manual_seed(0)
    original = _randomize(make()).train(training)
    x = torch.randn(shape)

    converted, summary = convert(original)
    assert type(converted) is getattr(normlab, type(original).__name__)
    assert converted is not original and converted.training == training
    assert [(e.name, e.converted) for e in summary] == [("", True)]
    _assert_same_state(original, converted)

    back, back_summary = convert(converted, to="torch")
    assert type(back) is type(original)
    assert back.training == training
    assert [(e.name, e.to_class) for e in back_summary] == [("", f"torch.nn.{type(back).__name__}")]
    _assert_same_state(original, back)

    expected = original(x)  # in training this also updates original's running stats
    torch.testing.assert_close(converted(x), expected, **tol(torch.float32))
    torch.testing.assert_close(back(x), expected, **tol(torch.float32))
    _assert_same_state(original, converted, exact=False)  # same running-statistics update
    _assert_same_state(original, back, exact=False)


def test_float64_requires_grad_and_eval_mode_kept():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.BatchNorm1d(6)).double()
    _randomize(model)
    model[1].weight.requires_grad_(False)
    model.eval()
    converted, _ = convert(model)
    assert isinstance(converted[1], normlab.LayerNorm)
    assert isinstance(converted[2], normlab.BatchNorm1d)
    for p_old, (name, p_new) in zip(model.parameters(), converted.named_parameters(), strict=True):
        assert p_new.dtype == torch.float64 and p_old.requires_grad == p_new.requires_grad, name
    assert all(b.dtype == torch.float64 for b in converted[2].buffers() if b.is_floating_point())
    assert not converted.training and not converted[1].training
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(converted(x), model(x), **tol(torch.float64))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6), nn.ReLU())
        self.groups = nn.ModuleList([nn.GroupNorm(2, 6), nn.InstanceNorm1d(6, affine=True)])
        self.heads = nn.ModuleDict({"ln": nn.LayerNorm(6), "rms": nn.RMSNorm(6)})

    def forward(self, x):  # (N, 4, L)
        h = self.proj(x)
        for norm in self.groups:
            h = norm(h)
        h = h.transpose(1, 2)
        return self.heads["rms"](self.heads["ln"](h))


NESTED_NAMES = [
    "proj.1",
    "groups.0",
    "groups.1",
    "heads.ln",
    "heads.rms",
]


def test_nested_model_and_backward():
    torch.manual_seed(1)
    model = _randomize(Block())
    converted, summary = convert(model)
    assert [e.name for e in summary.converted] == NESTED_NAMES and not summary.skipped
    for name in NESTED_NAMES:
        assert type(converted.get_submodule(name)).__module__.startswith("normlab.")
        assert type(model.get_submodule(name)).__module__.startswith("torch.")  # not inplace
    assert list(converted.state_dict()) == list(model.state_dict())
    assert "proj.1: torch.nn.BatchNorm1d -> normlab.BatchNorm1d" in str(summary)

    x = torch.randn(3, 4, 5)
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_new = model(x_ref), converted(x_new)
    torch.testing.assert_close(y_new, y_ref, **tol(torch.float32))
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_new.backward(g)
    torch.testing.assert_close(x_new.grad, x_ref.grad, **grad_tol(torch.float32))
    new_params = dict(converted.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(new_params[name].grad, p.grad, **grad_tol(torch.float32))

    back, back_summary = convert(converted, to="torch")
    assert [e.name for e in back_summary.converted] == NESTED_NAMES
    torch.testing.assert_close(back(x), model(x), **tol(torch.float32))


def test_inplace_semantics_and_shared_modules():
    shared = nn.LayerNorm(4)
    model = nn.Sequential(shared, nn.Linear(4, 4), shared)
    copy_model, _ = convert(model)
    assert model[0] is shared  # untouched
    assert copy_model[0] is copy_model[2]  # still shared in the copy

    same, summary = convert(model, inplace=True)
    assert same is model and len(summary) == 1
    assert isinstance(model[0], normlab.LayerNorm) and model[0] is model[2]


# Look-alike norms written from their description (not transformers' code).


class FakeLlamaRMSNorm(nn.Module):
    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(input_dtype)


class FakeT5LayerNorm(nn.Module):
    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class FakeGemmaRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class FakeBiasLayerNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class FakeScaledNorm(nn.Module):
    """Looks like a norm, but is L2 normalization times sqrt(H)... times 2: no match."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return 2 * self.weight * x / (x.norm(dim=-1, keepdim=True) + self.eps)


class Decoder(nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        self.llama = FakeLlamaRMSNorm(hidden)
        self.t5 = FakeT5LayerNorm(hidden)
        self.ln = FakeBiasLayerNorm(hidden)
        self.gemma = FakeGemmaRMSNorm(hidden)
        self.odd = FakeScaledNorm(hidden)

    def forward(self, x):
        return self.odd(self.gemma(self.ln(self.t5(self.llama(x)))))


def test_lookalike_norms_converted_or_reported():
    torch.manual_seed(2)
    model = _randomize(Decoder())
    model.llama.weight.requires_grad_(False)
    converted, summary = convert(model)
    kinds = {e.name: (e.to_class, e.reason) for e in summary}
    assert kinds["llama"][0] == "normlab.RMSNorm"
    assert kinds["t5"][0] == "normlab.RMSNorm"
    assert kinds["ln"][0] == "normlab.LayerNorm"
    assert kinds["gemma"] == ("normlab.RMSNorm", "scales by (1 + weight): offset=1.0, weight kept")
    assert kinds["odd"][0] is None and "matches neither" in kinds["odd"][1]
    assert converted.llama.eps == 1e-6 and not converted.llama.weight.requires_grad
    assert converted.ln.bias is not None
    assert isinstance(converted.gemma, normlab.RMSNorm) and converted.gemma.offset == 1.0
    torch.testing.assert_close(converted.gemma.weight, model.gemma.weight, rtol=0, atol=0)
    assert "gemma: " in str(summary) and "odd: " in str(summary) and "skipped" in str(summary)
    assert list(converted.state_dict()) == list(model.state_dict())

    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(converted(x), model(x), **tol(torch.float32))

    folded, folded_summary = convert(model, fold_offset=True)
    assert isinstance(folded.gemma, normlab.RMSNorm) and folded.gemma.offset == 0.0
    assert "folded" in {e.name: e for e in folded_summary}["gemma"].reason
    torch.testing.assert_close(folded.gemma.weight, model.gemma.weight + 1)
    torch.testing.assert_close(folded(x), model(x), **tol(torch.float32))

    with pytest.raises(ValueError, match="odd"):
        convert(model, strict=True, fold_offset=True)
    assert isinstance(model.llama, FakeLlamaRMSNorm)  # strict failure leaves the model


class FakeMatrixNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, 3))
        self.eps = 1e-6

    def forward(self, x):
        return x @ self.weight


class FakeBrokenNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        raise RuntimeError("needs a mask")


def test_lookalikes_that_cannot_be_probed_are_reported():
    model = nn.Sequential(FakeMatrixNorm(), FakeBrokenNorm(), nn.Linear(3, 3))
    converted, summary = convert(model)
    reasons = [e.reason for e in summary]
    assert len(reasons) == 2 and not summary.converted
    assert "not a 1-D parameter" in reasons[0]
    assert "forward failed" in reasons[1] and "needs a mask" in reasons[1]
    assert type(converted[0]) is FakeMatrixNorm and type(converted[1]) is FakeBrokenNorm


def test_lookalike_float64_and_backward():
    model = _randomize(nn.Sequential(FakeLlamaRMSNorm(8), nn.Linear(8, 2))).double()
    converted, _ = convert(model)
    assert isinstance(converted[0], normlab.RMSNorm) and converted[0].weight.dtype == torch.float64
    x = torch.randn(4, 8, dtype=torch.float64)
    model(x).sum().backward()
    converted(x).sum().backward()
    # the fake computes in float32 (as Hugging Face's does): float32 agreement only
    torch.testing.assert_close(converted(x), model(x), **tol(torch.float32))
    torch.testing.assert_close(
        converted[0].weight.grad, model[0].weight.grad, **grad_tol(torch.float32)
    )


def test_to_torch_skips_what_torch_cannot_express():
    model = nn.Sequential(
        normlab.LayerNorm(4, dim=1),
        normlab.LayerNorm(4, dim=-1),
        normlab.RMSNorm(4),
        normlab.BatchNorm(4, dim=-1),
        normlab.BatchNorm1d(4, virtual_batch_size=2),
        normlab.PowerNorm(4),
        normlab.BatchRenorm1d(4),
        normlab.SyncBatchNorm(4, dim=-1),
        normlab.RMSNorm(4, offset=1.0),
        normlab.LayerNorm(4, offset=1.0),
    )
    converted, summary = convert(model, to="torch")
    assert [e.converted for e in summary] == [False, True, True] + [False] * 7
    assert "dim=(1,)" in summary.entries[0].reason
    assert "virtual_batch_size=2" in summary.entries[4].reason
    assert "no torch.nn equivalent" in summary.entries[5].reason
    for entry in summary.entries[8:]:
        assert "offset=1.0" in entry.reason and "has no offset" in entry.reason
    assert type(converted[8]) is normlab.RMSNorm and converted[8].offset == 1.0
    assert type(converted[1]) is nn.LayerNorm and type(converted[2]) is nn.RMSNorm
    assert converted[0] is not model[0] and isinstance(converted[0], normlab.LayerNorm)
    with pytest.raises(ValueError, match=r"strict=True.*8 norm-like"):
        convert(model, to="torch", strict=True)


def test_subclass_of_torch_norm_is_probed():
    """A subclass of torch.nn.LayerNorm may change forward: it is converted only when its
    forward is found to compute a LayerNorm (with weight, or 1 + weight: offset=1.0, or
    folded with fold_offset)."""

    class MyLN(nn.LayerNorm):
        pass

    class OnePlusLN(nn.LayerNorm):  # Nemotron's LayerNorm1P
        def forward(self, x):
            return nn.functional.layer_norm(
                x, self.normalized_shape, self.weight + 1, self.bias, self.eps
            )

    class Doubled(nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(MyLN(4), OnePlusLN(4), Doubled(4))
    with torch.no_grad():
        for m in model:
            m.weight.normal_()
            m.bias.normal_()
    converted, summary = convert(model)
    assert type(converted[0]) is normlab.LayerNorm and type(converted[2]) is Doubled
    assert type(converted[1]) is normlab.LayerNorm and converted[1].offset == 1.0
    assert "offset=1.0" in summary.entries[1].reason
    assert "matches neither" in summary.entries[2].reason
    folded, _ = convert(model, fold_offset=True)
    assert type(folded[1]) is normlab.LayerNorm and folded[1].offset == 0.0
    x = torch.randn(5, 4)
    torch.testing.assert_close(converted[1](x), model[1](x))
    torch.testing.assert_close(folded[0](x), model[0](x))
    torch.testing.assert_close(folded[1](x), model[1](x))


def test_bad_target_and_model():
    with pytest.raises(ValueError, match=r"to: expected one of \['normlab', 'torch'\], got 'jax'"):
        convert(nn.LayerNorm(3), to="jax")
    with pytest.raises(TypeError, match="model"):
        convert("not a module")


def test_summary_is_readable():
    _, summary = convert(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    assert isinstance(summary, ConversionSummary)
    assert str(summary) == (
        "convert(to='normlab'): 1 converted, 0 skipped\n"
        "  1: torch.nn.LayerNorm -> normlab.LayerNorm"
    )
    _, root = convert(nn.GroupNorm(1, 2))
    assert str(root.entries[0]) == "(model): torch.nn.GroupNorm -> normlab.GroupNorm"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", [FakeLlamaRMSNorm, FakeT5LayerNorm])
def test_half_precision_lookalikes(cls, dtype):
    model = _randomize(cls(64)).to(dtype)
    converted, _ = convert(model)
    assert isinstance(converted, normlab.RMSNorm) and converted.weight.dtype == dtype
    x = torch.randn(4, 64).to(dtype)
    torch.testing.assert_close(converted(x), model(x), **tol(dtype))


class FreeLayerNorm(nn.Module):  # OLMo's LayerNorm: no parameters, no eps attribute
    def __init__(self, hidden):
        super().__init__()
        self.normalized_shape = (hidden,)

    def forward(self, x):
        return nn.functional.layer_norm(x.float(), self.normalized_shape, eps=1e-6).to(x.dtype)


class AnyWidthRMS(nn.Module):  # Llama 4's L2Norm: RMSNorm of the last axis, any width
    def __init__(self, eps=1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class NotANorm(nn.Module):  # has an eps attribute, computes something else
    eps = 1e-5

    def forward(self, x):
        return x / (x.abs().amax(-1, keepdim=True) + self.eps)


def test_parameter_free_norms_are_probed():
    model = nn.Sequential(FreeLayerNorm(6), AnyWidthRMS(), NotANorm())
    converted, summary = convert(model)
    assert type(converted[0]) is normlab.LayerNorm
    assert converted[0].weight is None and converted[0].eps == 1e-6
    assert "eps=1e-06 found by probing" in summary.entries[0].reason
    assert type(converted[1]) is AnyWidthRMS
    assert "needs a normalized_shape" in summary.entries[1].reason
    assert type(converted[2]) is NotANorm and len(summary) == 2  # not a norm: not reported
    x = torch.randn(4, 6) * 0.01 + 3  # small variance: a wrong eps would show
    torch.testing.assert_close(converted[0](x), model[0](x), **tol(torch.float32))
