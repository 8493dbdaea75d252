"""(a) Definition: LayerNorm normalizes all features of one sample; BatchNorm one feature over
all samples. The cube figure is drawn from normlab's own axis definitions."""

from __future__ import annotations

import itertools

import numpy as np
import torch

import normlab
from normlab import axes as norm_axes
from normlab.lab.rules import fmt
from normlab.lab.runner import Claim, Findings, RunContext, Verdict

N, C, L, GROUPS = 4, 6, 5, 2  # the cube: (batch, channels, positions)


def _grouped_index(index):
    """(n, c, l) in the (N, G, C // G, L) view that GroupNorm's axes are defined on."""
    per_group = C // GROUPS
    return (index[0], index[1] // per_group, index[1] % per_group, index[2])


def shared_statistics(norm: str, anchor=(0, 0, 0)) -> np.ndarray:
    """Bool (N, C, L): the elements that share one mean and variance with ``anchor``,
    derived from the library's reduction axes (never drawn by hand)."""
    cells = np.zeros((N, C, L), dtype=bool)
    for index in itertools.product(range(N), range(C), range(L)):
        if norm == "GroupNorm":  # statistics live on the grouped view (N, G, C // G, L)
            spec = norm_axes.group_norm_axes()
            point, origin = _grouped_index(index), _grouped_index(anchor)
        else:
            spec = {
                "BatchNorm": norm_axes.channel_norm_axes(3, dim=1),
                "LayerNorm": norm_axes.feature_norm_axes(3, (C, L), None),
                "InstanceNorm": norm_axes.instance_norm_axes(3),
            }[norm]
            point, origin = index, anchor
        cells[index] = all(
            point[d] == origin[d] for d in range(len(point)) if d not in spec.reduction
        )
    return cells


def _cube_figure(ctx: RunContext) -> None:
    import matplotlib.pyplot as plt

    names = ("BatchNorm", "LayerNorm", "InstanceNorm", "GroupNorm")
    fig = plt.figure(figsize=(12, 3.4))
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, 4, i + 1, projection="3d")
        shared = shared_statistics(name)
        # Axes of the plot: x = positions, y = batch, z = channels (as in Wu & He, Fig. 2).
        filled = np.ones((L, N, C), dtype=bool)
        colours = np.where(
            shared.transpose(2, 0, 1)[..., None], [0.16, 0.45, 0.82, 0.9], [0.85, 0.85, 0.85, 0.25]
        )
        ax.voxels(filled, facecolors=colours, edgecolor=(0.3, 0.3, 0.3, 0.4), linewidth=0.3)
        ax.set_xlabel("positions L")
        ax.set_ylabel("batch N")
        ax.set_zlabel("channels C")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_zticks([])
        ax.set_title(f"{name}\n{int(shared.sum())} elements share one mean/var", fontsize=9)
    fig.suptitle(
        "Which elements share one mean and variance (blue), from normlab.axes", fontsize=10
    )
    ctx.figure("cube", fig)


def _moments(y: torch.Tensor, dims) -> dict[str, float]:
    mean = y.mean(dims)
    var = y.var(dims, unbiased=False)
    return {
        "max_abs_mean": float(mean.abs().max()),
        "max_abs_var_minus_1": float((var - 1).abs().max()),
    }


def run(ctx: RunContext) -> Findings:
    _cube_figure(ctx)
    numbers = {"cube": {"N": N, "C": C, "L": L, "groups": GROUPS}, "seeds": {}}
    for seed in ctx.seeds:
        generator = ctx.seed_everything(seed)
        # Features with different scales and offsets, so the two norms visibly differ.
        x = torch.randn(32, 16, generator=generator, dtype=torch.float64) * torch.linspace(
            0.1, 10, 16, dtype=torch.float64
        ) + torch.linspace(-50, 50, 16, dtype=torch.float64)
        with torch.no_grad():
            # eps 1e-300: no change to a float64 variance of these scales (training BatchNorm
            # refuses eps = 0, as torch's does).
            y_ln = normlab.LayerNorm(16, elementwise_affine=False, eps=1e-300).double()(x)
            y_bn = normlab.BatchNorm1d(16, affine=False, eps=1e-300).double().train()(x)
        numbers["seeds"][str(seed)] = {
            "layer_norm_per_sample": _moments(y_ln, 1),
            "layer_norm_per_feature": _moments(y_ln, 0),
            "batch_norm_per_feature": _moments(y_bn, 0),
            "batch_norm_per_sample": _moments(y_bn, 1),
        }
    worst = lambda key, field: max(s[key][field] for s in numbers["seeds"].values())  # noqa: E731
    numbers["worst"] = {
        "ln_sample_mean": worst("layer_norm_per_sample", "max_abs_mean"),
        "ln_sample_var": worst("layer_norm_per_sample", "max_abs_var_minus_1"),
        "bn_feature_mean": worst("batch_norm_per_feature", "max_abs_mean"),
        "bn_feature_var": worst("batch_norm_per_feature", "max_abs_var_minus_1"),
        "ln_feature_mean": min(
            s["layer_norm_per_feature"]["max_abs_mean"] for s in numbers["seeds"].values()
        ),
        "bn_sample_mean": min(
            s["batch_norm_per_sample"]["max_abs_mean"] for s in numbers["seeds"].values()
        ),
    }
    numbers["shared_counts"] = {
        name: int(shared_statistics(name).sum())
        for name in ("BatchNorm", "LayerNorm", "InstanceNorm", "GroupNorm")
    }
    return Findings(
        numbers,
        (
            f"The cube (N={N}, C={C}, L={L}, GroupNorm with {GROUPS} groups) shades the elements "
            f"that share a statistic with one element, computed from normlab.axes. Numeric check: "
            f"{ctx.profile.seeds} random (32 samples x 16 features) float64 batches with "
            f"per-feature scales 0.1..10 and offsets -50..50, LayerNorm and training-mode "
            f"BatchNorm without affine and eps=1e-300 (no change to these variances)."
        ),
    )


TOLERANCE = 1e-9


def verdict(numbers: dict) -> Verdict:
    worst = numbers["worst"]
    normalized = max(
        worst["ln_sample_mean"],
        worst["ln_sample_var"],
        worst["bn_feature_mean"],
        worst["bn_feature_var"],
    )
    other_axis = min(worst["ln_feature_mean"], worst["bn_sample_mean"])
    deciding = (
        f"max |mean| / |var - 1| along the normalized axes {fmt(normalized)}; "
        f"min max|mean| along the other axes {fmt(other_axis)}"
    )
    if normalized < TOLERANCE and other_axis > 0.1:
        return Verdict(
            "supported",
            "LayerNorm outputs have mean 0 and variance 1 per sample, "
            "BatchNorm outputs per feature, to float64 rounding, and neither "
            "normalizes the other axis.",
            deciding,
        )
    return Verdict(
        "contradicted",
        "The outputs are not normalized along the axes the "
        "definition names (or are also normalized along the others).",
        deciding,
    )


CLAIM = Claim(
    letter="a",
    key="definition",
    title="Definition: which elements share a mean and variance",
    article="Layer normalization normalizes all features of one sample; batch normalization "
    "normalizes one feature over all samples.",
    rule=f"Supported if, in every seed, LayerNorm's per-sample and BatchNorm's per-feature "
    f"output means are 0 and variances 1 within {TOLERANCE}, while the other axis keeps a "
    f"mean of magnitude > 0.1 somewhere.",
    literature="Ba, Kiros & Hinton 2016 (Layer Normalization); Ioffe & Szegedy 2015 (Batch "
    "Normalization); the cube figure follows Wu & He 2018 (Group Normalization, "
    "Fig. 2).",
    run=run,
    verdict=verdict,
)
