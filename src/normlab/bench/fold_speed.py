"""What ``normlab.fold_batchnorm`` saves at inference: a small CNN and an MLP in eval mode,
each as built with torch.nn BatchNorm, converted to normlab's BatchNorm, and folded (every
BatchNorm merged into the Linear/Conv before it). Times the forward under
``torch.inference_mode`` with the bench's interleaved timer; reports medians, the folded
model's speed-up over both unfolded ones, and the largest output difference.
"""

from __future__ import annotations

import torch
from torch import nn

import normlab
from normlab.bench import timing

# name -> (input shape, model builder); "toy" sizes keep the unit test fast.
SIZES = {
    "default": {"cnn": (32, 3, 32, 32), "mlp": (256, 512)},
    "quick": {"cnn": (32, 3, 32, 32), "mlp": (256, 512)},
    "toy": {"cnn": (2, 3, 8, 8), "mlp": (4, 16)},
}


def small_cnn(channels: int = 3) -> nn.Sequential:
    """Three conv -> BatchNorm -> ReLU blocks (bias-free convs, as usual before BN)."""

    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(channels, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def mlp(features: int) -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU, twice, then a classifier."""
    return nn.Sequential(
        nn.Linear(features, features),
        nn.BatchNorm1d(features),
        nn.ReLU(),
        nn.Linear(features, features),
        nn.BatchNorm1d(features),
        nn.ReLU(),
        nn.Linear(features, 10),
    )


def _trained_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics and affine parameters away from their initial values (a few
    training-mode forwards on shifted inputs), then eval mode."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
        model.train()
        for step in range(3):
            model(x * (1 + 0.1 * step) + 0.1)
    return model.eval()


def _models(name: str, shape: tuple[int, ...], seed: int):
    torch.manual_seed(seed)
    x = torch.randn(shape)
    torch_model = small_cnn(shape[1]) if name == "cnn" else mlp(shape[1])
    torch_model = _trained_statistics(torch_model, x)
    normlab_model, _ = normlab.convert(torch_model)
    folded, summary = normlab.fold_batchnorm(torch_model)
    return x, {"torch.nn": torch_model, "normlab": normlab_model, "folded": folded}, summary


def _runner(model: nn.Module, x: torch.Tensor) -> timing.Runner:
    def call():
        return (model(x),)

    return timing.forward_runner(call, torch.inference_mode)


def measure(grid: str, repetitions: int, warmup: int, seed: int = 0) -> dict:
    """Median forward times and speed-ups of the folded models, per model."""
    results = {}
    for name, shape in SIZES.get(grid, SIZES["default"]).items():
        x, models, summary = _models(name, shape, seed)
        with torch.inference_mode():
            reference = models["torch.nn"](x)
            error = max(float((m(x) - reference).abs().max()) for m in models.values())
        samples = timing.interleaved(
            {label: _runner(m, x) for label, m in models.items()}, repetitions, warmup, seed
        )
        medians = {label: timing.summarize(s)["median_s"] for label, s in samples.items()}
        results[name] = {
            "input": list(shape),
            "folded_batchnorms": len(summary.folded),
            "median_s": medians,
            "speedup_vs_torch": medians["torch.nn"] / medians["folded"],
            "speedup_vs_normlab": medians["normlab"] / medians["folded"],
            "max_abs_diff": error,
        }
    return results


def print_table(results: dict, console) -> None:
    from rich.table import Table

    table = Table(title="fold_batchnorm: eval forward, median ms (inference_mode)")
    for column in ("model", "input", "BNs folded", "torch.nn", "normlab", "folded"):
        table.add_column(column, justify="right")
    table.add_column("speed-up vs torch.nn / normlab", justify="right")
    table.add_column("max |diff|", justify="right")
    for name, r in results.items():
        ms = {label: f"{1e3 * t:.3f}" for label, t in r["median_s"].items()}
        table.add_row(
            name,
            "x".join(map(str, r["input"])),
            str(r["folded_batchnorms"]),
            ms["torch.nn"],
            ms["normlab"],
            ms["folded"],
            f"x{r['speedup_vs_torch']:.2f} / x{r['speedup_vs_normlab']:.2f}",
            f"{r['max_abs_diff']:.1e}",
        )
    console.print(table)
