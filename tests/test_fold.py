"""fold_batchnorm: outputs equal the unfolded eval model, no foldable BatchNorm left."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import normlab
from normlab.fold import fold_batchnorm

BN_TYPES = (nn.modules.batchnorm._BatchNorm, normlab.BatchNorm)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters on every BatchNorm, then eval."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                n = m.num_features
                dtype = m.weight.dtype if m.weight is not None else torch.float32
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g).to(dtype))
                    m.running_var.copy_((torch.rand(n, generator=g) * 2 + 0.2).to(dtype))
                if m.weight is not None:
                    m.weight.copy_(torch.randn(n, generator=g).to(dtype))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(n, generator=g).to(dtype))
    return model.eval()


def bns(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, BN_TYPES)]


def check(model: nn.Module, x: torch.Tensor, tol: float = 1e-4):
    model = randomize(model)
    with torch.no_grad():
        expected = model(x)
        folded, summary = fold_batchnorm(model)
        got = folded(x)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    return folded, summary


def test_sequential_linear_bn1d():
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    folded, summary = check(model, torch.randn(8, 6))
    assert isinstance(folded, nn.Sequential) and not summary.traced
    assert isinstance(folded[1], nn.Identity) and bns(folded) == []
    assert summary.folded == [("1", "0")] and summary.skipped == []
    assert isinstance(model[1], nn.BatchNorm1d)  # inplace=False leaves the model alone


@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_sequential_conv2d_bn2d(conv_bias, groups):
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=conv_bias))
    model.append(nn.BatchNorm2d(6))
    folded, summary = check(model, torch.randn(2, 4, 7, 7))
    assert folded[0].bias is not None and folded[0].bias.shape == (6,)
    assert bns(folded) == [] and summary.folded == [("1", "0")]


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose2d_bn2d(groups):
    model = nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, groups=groups, bias=False), nn.BatchNorm2d(6)
    )
    folded, _ = check(model, torch.randn(2, 4, 5, 5))
    assert bns(folded) == []


def test_conv_transpose1d_and_conv3d():
    model = nn.Sequential(nn.ConvTranspose1d(3, 4, 2, groups=1), nn.BatchNorm1d(4))
    assert bns(check(model, torch.randn(2, 3, 9))[0]) == []
    model = nn.Sequential(nn.Conv3d(2, 4, 2, groups=2), normlab.BatchNorm3d(4))
    assert bns(check(model, torch.randn(2, 2, 4, 4, 4))[0]) == []


def test_conv1d_normlab_bn1d():
    model = nn.Sequential(nn.Conv1d(3, 5, 3), normlab.BatchNorm1d(5, eps=1e-3), nn.GELU())
    folded, summary = check(model, torch.randn(4, 3, 11))
    assert bns(folded) == [] and summary.folded == [("1", "0")]


def test_linear_normlab_bn_last_axis():
    model = nn.Sequential(nn.Linear(6, 5), normlab.BatchNorm(5, dim=-1))
    folded, summary = check(model, torch.randn(3, 7, 6))  # (B, L, C)
    assert bns(folded) == [] and summary.folded == [("1", "0")]


def test_float64():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(3, 5)).double()
    model.append(normlab.BatchNorm(5, dim=-1).double())
    folded, _ = check(model, torch.randn(2, 3, 5, 5, dtype=torch.float64), tol=1e-10)
    assert bns(folded) == [] and folded[0].weight.dtype == torch.float64


def test_nested_sequential():
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
    model = nn.Sequential(inner, nn.Sequential(nn.BatchNorm2d(4)), nn.Flatten(), nn.Linear(36, 2))
    folded, summary = check(model, torch.randn(2, 3, 5, 5))
    assert not summary.traced and bns(folded) == []
    assert sorted(summary.folded) == [("0.1", "0.0"), ("1.0", "0.3")]


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn2 = normlab.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y  # conv's output has two users: not foldable
        z = self.bn2(self.conv2(torch.relu(z)))
        return self.head(z.mean(dim=(2, 3)))


def test_custom_module_residual_traced():
    model = Residual()
    folded, summary = check(model, torch.randn(2, 4, 6, 6))
    assert isinstance(folded, fx.GraphModule) and summary.traced
    assert sorted(summary.folded) == [("bn2", "conv2"), ("head.1", "head.0")]
    assert [name for name, _ in summary.skipped] == ["bn"]
    assert "also feeds" in summary.skipped[0][1]
    assert bns(folded) == ["bn"]
    assert isinstance(model.bn2, normlab.BatchNorm2d)  # original untouched


def test_inplace_traced_keeps_original_consistent():
    model = randomize(Residual())
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = model(x)
        folded, _ = fold_batchnorm(model, inplace=True)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    assert bns(model) == ["bn"]


def test_inplace_sequential():
    model = randomize(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    folded, _ = fold_batchnorm(model, inplace=True)
    assert folded is model and isinstance(model[1], nn.Identity)


def test_training_mode_raises():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="training mode"):
        fold_batchnorm(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match="'1'"):
        fold_batchnorm(model)


def test_skips_without_running_stats_and_mismatch():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.BatchNorm2d(4),
        nn.Linear(5, 4),
        nn.BatchNorm2d(4),  # Linear's features are the last axis, not BatchNorm2d's axis 1
    )
    folded, summary = check(model, torch.randn(2, 3, 4, 5))
    reasons = dict(summary.skipped)
    assert summary.folded == []
    assert "track_running_stats=False" in reasons["1"]
    assert "not directly after" in reasons["3"]
    assert "does not normalize" in reasons["5"]
    assert len(bns(folded)) == 3


def test_affine_false_and_no_bias():
    model = nn.Sequential(
        nn.Conv1d(2, 3, 1), normlab.BatchNorm1d(3, bias=False), nn.Conv1d(3, 3, 1)
    )
    model.append(nn.BatchNorm1d(3, affine=False))
    folded, summary = check(model, torch.randn(2, 2, 5))
    assert bns(folded) == [] and len(summary.folded) == 2


class SkipSequential(nn.Sequential):
    """A Sequential subclass whose forward is not a chain: must not be folded as one."""

    def forward(self, x):
        return self[1](self[0](x)) + self[0](x)


def test_sequential_root_with_custom_blocks_is_traced():
    model = nn.Sequential(Residual(), nn.Linear(3, 3), nn.BatchNorm1d(3))
    folded, summary = check(model, torch.randn(2, 4, 6, 6))
    assert summary.traced and isinstance(folded, fx.GraphModule)
    assert ("2", "1") in summary.folded and bns(folded) == ["0.bn"]

    model = nn.Sequential(SkipSequential(nn.Conv1d(2, 2, 1), nn.BatchNorm1d(2)))
    folded, summary = check(model, torch.randn(3, 2, 4))
    assert summary.traced and summary.folded == []
    assert "'0.0' is called 2 times" in dict(summary.skipped)["0.1"]


def test_shared_layer_is_not_folded():
    conv = nn.Conv1d(2, 2, 1)
    model = nn.Sequential(conv, nn.BatchNorm1d(2), conv, nn.BatchNorm1d(2))
    folded, summary = check(model, torch.randn(3, 2, 4))
    assert summary.folded == [] and len(summary.skipped) == 2 and len(bns(folded)) == 2
    assert "more than once" in summary.skipped[0][1]
    assert "folded 0" in str(summary)


def test_untraceable_model_raises():
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.bn = nn.Linear(2, 2), nn.BatchNorm1d(2)

        def forward(self, x):
            return self.bn(self.lin(x)) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="cannot trace Dynamic"):
        fold_batchnorm(Dynamic().eval())
