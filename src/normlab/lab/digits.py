"""Small real-data experiments for the lab: scikit-learn's bundled 8x8 digits (no download),
a fixed train/test split, tiny MLPs and CNNs whose normalization is a parameter, and a
training loop that reports eval-mode error."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import normlab
from normlab.lab.rules import stop_now

TRAIN_SIZE, TEST_SIZE = 1280, 512  # both divisible by every batch size the lab uses (<= 128)
SPLIT_SEED = 0  # the split is the same for every run seed: seeds vary init and batch order
CLASSES = 10

# The norms the lab compares, by the names its reports use.
NORMS = ("none", "BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm", "BatchRenorm", "GhostBN")

# A norm factory builds the normalization for a tensor whose per-sample shape is given:
# (features,) in an MLP, (channels, height, width) in a CNN.
NormFactory = Callable[[tuple[int, ...]], nn.Module]


@dataclass(frozen=True)
class Digits:
    """Standardized digits: ``x_*`` float32 (N, 64), ``y_*`` int64 (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @staticmethod
    def images(x: torch.Tensor) -> torch.Tensor:
        """(N, 64) rows as (N, 1, 8, 8) images for a CNN."""
        return x.reshape(-1, 1, 8, 8)


@functools.lru_cache(maxsize=1)
def load_digits() -> Digits:
    """The 1797 digits, split by a fixed permutation into 1280 train and 512 test samples
    (5 left out), each pixel standardized with the train mean and std (constant pixels get
    std 1)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    order = np.random.RandomState(SPLIT_SEED).permutation(len(bunch.target))
    train, test = order[:TRAIN_SIZE], order[TRAIN_SIZE : TRAIN_SIZE + TEST_SIZE]
    x = bunch.data.astype(np.float32)
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / np.where(std > 0, std, 1.0)
    tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    targets = bunch.target.astype(np.int64)
    return Digits(tensor(x[train]), tensor(targets[train]), tensor(x[test]), tensor(targets[test]))


def norm_factory(
    kind: str, *, groups: int = 4, virtual_batch_size: int = 4, renorm_warmup: int = 0
) -> NormFactory:
    """The factory for one of ``NORMS``; 1d or 2d variants are chosen by the shape's rank.

    LayerNorm and RMSNorm normalize all of one sample's features, (C, H, W) in a CNN, as the
    article defines LN (GroupNorm with one group, plus a per-element affine). GroupNorm uses
    ``groups`` groups; GhostBN is BatchNorm with ``virtual_batch_size``; BatchRenorm keeps
    plain BatchNorm for ``renorm_warmup`` steps, then uses r_max=3, d_max=5."""

    def build(shape: tuple[int, ...]) -> nn.Module:
        channels, image = shape[0], len(shape) > 1
        if kind == "none":
            return nn.Identity()
        if kind == "BatchNorm":
            return (normlab.BatchNorm2d if image else normlab.BatchNorm1d)(channels)
        if kind == "GhostBN":
            bn = normlab.BatchNorm2d if image else normlab.BatchNorm1d
            return bn(channels, virtual_batch_size=virtual_batch_size)
        if kind == "BatchRenorm":
            brn = normlab.BatchRenorm2d if image else normlab.BatchRenorm1d
            return brn(channels, warmup_steps=renorm_warmup)
        if kind == "LayerNorm":
            return normlab.LayerNorm(shape)
        if kind == "RMSNorm":
            return normlab.RMSNorm(shape)
        if kind == "GroupNorm":
            return normlab.GroupNorm(groups, channels)
        raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")

    return build


def mlp(
    norm: NormFactory,
    *,
    depth: int = 2,
    width: int = 64,
    activation: type[nn.Module] = nn.ReLU,
    in_features: int = 64,
) -> nn.Sequential:
    """``depth`` hidden blocks Linear -> norm -> activation (as Ioffe & Szegedy place BN),
    then a Linear readout to the 10 classes."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), norm((width,)), activation()]
    layers.append(nn.Linear(width, CLASSES))
    return nn.Sequential(*layers)


def cnn(norm: NormFactory, *, channels: tuple[int, int] = (8, 16)) -> nn.Sequential:
    """For (N, 1, 8, 8): conv3x3 -> norm -> ReLU, strided conv3x3 (to 4x4) -> norm -> ReLU,
    then a Linear readout of the flattened 4x4 maps."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        norm((c1, 8, 8)),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1),
        norm((c2, 4, 4)),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 16, CLASSES),
    )


def hidden_linears(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of an ``mlp`` except its readout, first to last."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]


def scale_init(model: nn.Module, scale: float, generator: torch.Generator, gain: float = 1.0):
    """Hidden Linear weights ~ N(0, (scale * gain)^2 / fan_in), biases 0: ``scale`` 1 is the
    critical initialization (gain 1 for tanh, sqrt(2) for ReLU); the readout keeps its own."""
    with torch.no_grad():
        for linear in hidden_linears(model):
            std = scale * gain / math.sqrt(linear.in_features)
            nn.init.normal_(linear.weight, 0.0, std, generator=generator)
            nn.init.zeros_(linear.bias)
    return model


@torch.no_grad()
def error_rate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    train_mode: bool = False,
    batch_size: int = 512,
) -> float:
    """Fraction misclassified. ``train_mode=True`` evaluates a copy of the model in training
    mode (batch statistics from each batch of ``batch_size`` consecutive samples; the
    model's running statistics are left untouched). Non-finite outputs count as errors."""
    net = copy.deepcopy(model).train() if train_mode else model.eval()
    wrong = 0
    for start in range(0, len(x), batch_size):
        logits = net(x[start : start + batch_size])
        correct = (logits.argmax(1) == y[start : start + batch_size]) & logits.isfinite().all(1)
        wrong += int((~correct).sum())
    return wrong / len(x)


@torch.no_grad()
def held_out_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Mean cross-entropy in eval mode (running statistics); None if not finite."""
    was_training = model.training
    loss = float(nn.functional.cross_entropy(model.eval()(x), y))
    model.train(was_training)
    return loss if math.isfinite(loss) else None


@dataclass
class Training:
    """The outcome of ``train``: final eval-mode errors and, per epoch when asked, curves."""

    train_error: float
    test_error: float
    final_loss: float  # mean training loss over the last epoch (nan if it diverged)
    diverged: bool
    steps: int
    curves: dict[str, list[float]] = field(default_factory=dict)
    # Held-out (test) cross-entropy in eval mode at ``held_out_steps`` (``eval_every``).
    held_out_steps: list[int] = field(default_factory=list)
    held_out_loss: list[float | None] = field(default_factory=list)


def train(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    batch_size: int,
    lr: float,
    epochs: int,
    generator: torch.Generator,
    momentum: float = 0.9,
    curves: bool = False,
    max_steps: int | None = None,
    eval_every: int | None = None,
    early_stop_after: int | None = None,
) -> Training:
    """SGD with momentum for ``epochs`` passes over a fresh permutation each (batches of
    ``batch_size``, last partial batch dropped), or fewer: at most ``max_steps`` steps.
    Errors are measured in eval mode; with ``curves`` also after every epoch; with
    ``eval_every`` the held-out loss every that many steps and at the end (the regime check's
    curve). Stops early if the loss becomes non-finite, and, with ``early_stop_after``, at
    the first evaluation after that many steps at which the held-out curve so far meets the
    regime criterion (``rules.stop_now``; the learning rate is constant).

    The update is torch.optim.SGD's (heavy-ball momentum, no dampening, no weight decay),
    written out: constructing a torch optimizer imports torch._dynamo, seconds on 2 cores."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    velocities = [torch.zeros_like(p) for p in parameters]
    history: dict[str, list[float]] = {"train_error": [], "test_error": [], "loss": []}
    steps, diverged, epoch_loss = 0, False, math.nan
    held_steps: list[int] = []
    held_losses: list[float | None] = []
    stopped = False
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        batches = len(x_train) // batch_size
        if max_steps is not None:
            batches = min(batches, max_steps - steps)
        for b in range(batches):
            index = order[b * batch_size : (b + 1) * batch_size]
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            gradients = torch.autograd.grad(loss, parameters)
            with torch.no_grad():
                for parameter, velocity, gradient in zip(
                    parameters, velocities, gradients, strict=True
                ):
                    velocity.mul_(momentum).add_(gradient)
                    parameter.sub_(velocity, alpha=lr)
            steps += 1
            total += loss.item()
            if not math.isfinite(total):
                diverged = True
                break
            if eval_every and steps % eval_every == 0:
                held_steps.append(steps)
                held_losses.append(held_out_loss(model, x_test, y_test))
                if (
                    early_stop_after is not None
                    and steps >= early_stop_after
                    and stop_now(held_steps, held_losses)
                ):
                    stopped = True
                    break
        epoch_loss = total / max(1, b + 1 if batches else 1)
        if curves:
            history["loss"].append(epoch_loss)
            history["train_error"].append(error_rate(model, x_train, y_train))
            history["test_error"].append(error_rate(model, x_test, y_test))
        if diverged or stopped or steps == max_steps:
            break
    if eval_every and (not held_steps or held_steps[-1] != steps):
        held_steps.append(steps)
        held_losses.append(None if diverged else held_out_loss(model, x_test, y_test))
    return Training(
        train_error=error_rate(model, x_train, y_train),
        test_error=error_rate(model, x_test, y_test),
        final_loss=epoch_loss,
        diverged=diverged,
        steps=steps,
        curves=history if curves else {},
        held_out_steps=held_steps,
        held_out_loss=held_losses,
    )
