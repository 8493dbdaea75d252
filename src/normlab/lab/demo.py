"""``normlab demo``: LayerNorm and BatchNorm on one small batch, side by side, with the
statistics each one used, so a reader sees which elements share a mean and variance."""

from __future__ import annotations

import torch

import normlab

SAMPLES, FEATURES = 4, 6


def demo_batch() -> torch.Tensor:
    """4 samples x 6 features whose features have very different scales and offsets."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(SAMPLES, FEATURES, generator=generator, dtype=torch.float64)
    offsets = torch.tensor([0.0, 5.0, -3.0, 10.0, 0.5, 100.0], dtype=torch.float64)
    scales = torch.tensor([1.0, 0.5, 2.0, 4.0, 0.1, 20.0], dtype=torch.float64)
    return noise * scales + offsets


def _row(values, width=8) -> str:
    # rounding then + 0.0 turns -1e-17 into 0.0, so a mean of zero prints as 0.000
    return "".join(f"{round(float(v), 3) + 0.0:{width}.3f}" for v in values)


def _table(title: str, rows: list[str]) -> list[str]:
    return [title, *rows]


def render() -> str:
    x = demo_batch()
    layer_norm = normlab.LayerNorm(FEATURES, elementwise_affine=False).double()
    batch_norm = normlab.BatchNorm1d(FEATURES, affine=False).double().train()
    y_ln = layer_norm(x).detach()
    y_bn = batch_norm(x).detach()

    # The statistics each norm used: LN per row (sample), BN per column (feature).
    ln_mean, ln_std = x.mean(dim=1), x.var(dim=1, unbiased=False).add(layer_norm.eps).sqrt()
    bn_mean, bn_std = x.mean(dim=0), x.var(dim=0, unbiased=False).add(batch_norm.eps).sqrt()

    header = "".join(f"{'f' + str(j):>8}" for j in range(FEATURES))
    lines = ["Input x: 4 samples (rows) x 6 features (columns)", f"{'':9}{header}"]
    lines += [f"sample {i} {_row(x[i])}" for i in range(SAMPLES)]
    lines.append("")

    left = _table(
        "LayerNorm: each ROW shares one mean/std",
        [
            f"{'':9}{header}{'mean':>9}{'std':>8}",
            *(
                f"sample {i} {_row(y_ln[i])} {_row([ln_mean[i], ln_std[i]])}"
                for i in range(SAMPLES)
            ),
            "",
            "",
        ],
    )
    right = _table(
        "BatchNorm (training): each COLUMN shares one mean/std",
        [
            f"{header}",
            *(_row(y_bn[i]) for i in range(SAMPLES)),
            _row(bn_mean) + "  <- mean",
            _row(bn_std) + "  <- std",
        ],
    )
    width = max(len(s) for s in left) + 4
    for a, b in zip(left, right, strict=True):
        lines.append(f"{a:<{width}}{b}")
    lines += [
        "",
        "LayerNorm: every row of its output has mean 0 and variance 1; the columns do not.",
        "BatchNorm: every column of its output has mean 0 and variance 1; the rows do not.",
        f"check: LN row means {_row(y_ln.mean(1), 7)};  BN column means {_row(y_bn.mean(0), 7)}",
    ]
    return "\n".join(lines)


def main() -> int:
    print(render())
    return 0
