"""(g) Position information: does LayerNorm keep the position signal that was added to the
token embeddings? A linear probe reads the token position from representations after
LayerNorm and after eval-mode BatchNorm, for three absolute encodings; two more checks test
the article's reason ("LN applies a linear transform") and where LN does remove a position
signal (one that lives only in the mean or the scale of the vector)."""

from __future__ import annotations

import torch

import normlab
from normlab.lab.rules import consistent_effect, fmt, mean
from normlab.lab.runner import Claim, Findings, RunContext, Verdict

ENCODINGS = ("offset", "sinusoidal", "learned")  # probed
USED_BY_TRANSFORMERS = ("sinusoidal", "learned")  # Vaswani et al. 2017, BERT
REMOVAL_ENCODINGS = ("offset", "scale")  # a signal only in the mean / only in the scale
OFFSET_STEP = 0.1  # offset: pos * 0.1 added to every feature
SCALE_STEP = 0.1  # scale: features multiplied by 1 + pos * 0.1
RIDGE_ALPHA = 1.0
TRAIN_FRACTION = 0.75
EPS = 1e-5
# Verdict thresholds (fixed before the results)
DECODABLE = 0.5  # BN's probe R^2 must reach this for the test to mean anything
RETAINED = 0.9  # LN keeps the information if its R^2 >= 0.9 x BN's
NONLINEAR = 0.05  # relative additivity error above this: not linear
REMOVED = 1e-4  # max |LN(x with signal) - LN(x without)| below this: removed exactly
REMOVED_R2 = 0.1  # probe R^2 below this after LN: nothing left to read


def _sizes(ctx: RunContext) -> dict:
    pick = ctx.profile.pick
    return {
        "sequences": pick(smoke=96, quick=200, full=400),
        "length": pick(smoke=32, quick=32, full=64),
        "width": pick(smoke=64, quick=64, full=128),
        "vocabulary": pick(smoke=100, quick=100, full=200),
    }


def sinusoidal_encoding(length: int, width: int) -> torch.Tensor:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    angle = position / 10000 ** (torch.arange(0, width, 2, dtype=torch.float64) / width)
    encoding = torch.zeros(length, width, dtype=torch.float64)
    encoding[:, 0::2], encoding[:, 1::2] = torch.sin(angle), torch.cos(angle)
    return encoding


def ridge_r2(train_x, train_y, test_x, test_y, alpha: float = RIDGE_ALPHA) -> float:
    """Ridge regression with an (unpenalized) intercept, fitted on train; R^2 on test."""
    mean_x, mean_y = train_x.mean(0), train_y.mean()
    xc = train_x - mean_x
    eye = torch.eye(xc.shape[1], dtype=xc.dtype)
    w = torch.linalg.solve(xc.T @ xc + alpha * eye, xc.T @ (train_y - mean_y))
    prediction = (test_x - mean_x) @ w + mean_y
    residual = (test_y - prediction).square().sum()
    total = (test_y - test_y.mean()).square().sum()
    return float(1 - residual / total)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _seed_run(seed: int, ctx: RunContext, sizes: dict) -> dict:
    generator = ctx.seed_everything(seed)
    n, length, width, vocabulary = (
        sizes["sequences"],
        sizes["length"],
        sizes["width"],
        sizes["vocabulary"],
    )
    f64 = torch.float64
    embedding = torch.randn(vocabulary, width, generator=generator, dtype=f64)
    tokens = embedding[torch.randint(vocabulary, (n, length), generator=generator)]
    position = torch.arange(length, dtype=f64)
    encodings = {
        "offset": (position * OFFSET_STEP)[:, None].expand(length, width),
        "sinusoidal": sinusoidal_encoding(length, width),
        "learned": torch.randn(length, width, generator=generator, dtype=f64),  # nn.Embedding
    }
    train = int(n * TRAIN_FRACTION)  # split by sequence
    target = position.expand(n, length)
    layer_norm = normlab.LayerNorm(width, eps=EPS).double()
    result = {"probe_r2": {}, "ln_additivity_error": {}, "bn_affine_additivity_error": {}}
    with torch.no_grad():
        for name, encoding in encodings.items():
            x = tokens + encoding
            batch_norm = normlab.BatchNorm(width, eps=EPS, momentum=None, dim=-1).double()
            batch_norm.train()  # running statistics: cumulative average over training batches
            for batch in x[:train].split(max(train // 6, 2)):
                batch_norm(batch)
            batch_norm.eval()
            representations = {"raw": x, "layer_norm": layer_norm(x), "batch_norm": batch_norm(x)}
            result["probe_r2"][name] = {
                kind: ridge_r2(
                    h[:train].reshape(-1, width),
                    target[:train].reshape(-1),
                    h[train:].reshape(-1, width),
                    target[train:].reshape(-1),
                )
                for kind, h in representations.items()
            }
            if name in USED_BY_TRANSFORMERS:  # LN(a + b) vs LN(a) + LN(b)
                a, b = tokens, encoding.expand_as(tokens)
                result["ln_additivity_error"][name] = _relative(
                    layer_norm(a) + layer_norm(b), layer_norm(a + b)
                )
                zero = torch.zeros_like(a)  # eval BN is affine: BN(a+b) = BN(a)+BN(b)-BN(0)
                result["bn_affine_additivity_error"][name] = _relative(
                    batch_norm(a) + batch_norm(b) - batch_norm(zero), batch_norm(a + b)
                )
        # A position signal only in the mean (same constant on every feature) or only in the
        # scale: how much of it reaches the output?
        removal = {}
        for name in REMOVAL_ENCODINGS:
            if name == "offset":
                x = tokens + encodings["offset"]
            else:
                x = tokens * (1 + SCALE_STEP * position)[:, None]
            batch_norm = normlab.BatchNorm(width, eps=EPS, momentum=None, dim=-1).double()
            batch_norm.train()
            for batch in x[:train].split(max(train // 6, 2)):
                batch_norm(batch)
            batch_norm.eval()
            ln_with, ln_without = layer_norm(x), layer_norm(tokens)
            bn_with, bn_without = batch_norm(x), batch_norm(tokens)
            removal[name] = {
                "ln_max_abs_change": float((ln_with - ln_without).abs().max()),
                "ln_relative_change": _relative(ln_with, ln_without),
                "bn_relative_change": _relative(bn_with, bn_without),
            }
        result["removal"] = removal
    return result


def _figure(ctx: RunContext, numbers: dict) -> None:
    import matplotlib.pyplot as plt

    runs = list(numbers["seeds"].values())
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), gridspec_kw={"width_ratios": [1.5, 1, 1]})
    ax = axes[0]
    kinds = (("raw", "no norm", "#999999"), ("batch_norm", "BatchNorm (eval)", "#d08c2c"))
    kinds += (("layer_norm", "LayerNorm", "#2a6fb0"),)
    for j, (kind, label, colour) in enumerate(kinds):
        for i, name in enumerate(ENCODINGS):
            values = [r["probe_r2"][name][kind] for r in runs]
            x = i + (j - 1) * 0.27
            ax.bar(
                x, sum(values) / len(values), 0.25, color=colour, label=label if i == 0 else None
            )
            ax.scatter([x] * len(values), values, color="black", s=8, zorder=3)
    ax.set_xticks(
        range(len(ENCODINGS)), ["offset\n(same on all features)", "sinusoidal", "learned"]
    )
    ax.set_ylabel("linear-probe R² for the position (test)")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_title("Position read back from the representation", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[1]
    floor = 1e-17
    for j, (key, label, colour) in enumerate(
        (
            ("ln_relative_change", "LayerNorm", "#2a6fb0"),
            ("bn_relative_change", "BatchNorm", "#d08c2c"),
        )
    ):
        for i, name in enumerate(REMOVAL_ENCODINGS):
            values = [max(r["removal"][name][key], floor) for r in runs]
            x = i + (j - 0.5) * 0.35
            ax.bar(x, max(values), 0.33, color=colour, label=label if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(range(2), ["mean only\nx + 0.1·pos", "scale only\nx·(1 + 0.1·pos)"])
    ax.set_ylabel("‖norm(x+signal) − norm(x)‖ / ‖norm(x)‖")
    ax.set_title("Signal only in the mean / scale: LN removes it", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)

    ax = axes[2]
    for j, (key, label, colour) in enumerate(
        (
            ("ln_additivity_error", "LN: ‖LN(a)+LN(b)−LN(a+b)‖", "#2a6fb0"),
            ("bn_affine_additivity_error", "BN eval: affine check", "#d08c2c"),
        )
    ):
        for i, name in enumerate(USED_BY_TRANSFORMERS):
            values = [max(r[key][name], floor) for r in runs]
            x = i + (j - 0.5) * 0.35
            ax.bar(x, max(values), 0.33, color=colour, label=label if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(range(2), ["a = tokens\nb = sinusoidal", "a = tokens\nb = learned"])
    ax.set_ylabel("relative error (max over seeds)")
    ax.set_title("Is LN linear? (BN in eval is affine)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1)
    fig.suptitle("(g) Position information after LayerNorm and BatchNorm", fontsize=10)
    fig.tight_layout()
    ctx.figure("position", fig)


def run(ctx: RunContext) -> Findings:
    sizes = _sizes(ctx)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small float64 ops: one thread is fastest on a shared machine
    try:
        seeds = {str(s): _seed_run(s, ctx, sizes) for s in ctx.track(ctx.seeds, "seed")}
    finally:
        torch.set_num_threads(threads)
    numbers = {"sizes": sizes, "seeds": seeds}
    runs = seeds.values()
    numbers["aggregate"] = {
        "ln_over_bn_r2": {
            name: [
                r["probe_r2"][name]["layer_norm"] / r["probe_r2"][name]["batch_norm"] for r in runs
            ]
            for name in USED_BY_TRANSFORMERS
        },
        "bn_r2": {name: [r["probe_r2"][name]["batch_norm"] for r in runs] for name in ENCODINGS},
        "ln_r2": {name: [r["probe_r2"][name]["layer_norm"] for r in runs] for name in ENCODINGS},
        "ln_additivity_error": {
            name: [r["ln_additivity_error"][name] for r in runs] for name in USED_BY_TRANSFORMERS
        },
        "ln_removal_max_abs_change": {
            name: [r["removal"][name]["ln_max_abs_change"] for r in runs]
            for name in REMOVAL_ENCODINGS
        },
        "bn_removal_relative_change": {
            name: [r["removal"][name]["bn_relative_change"] for r in runs]
            for name in REMOVAL_ENCODINGS
        },
    }
    a = numbers["aggregate"]
    numbers["summary"] = (
        f"probe R² after LN / after eval BN, mean over seeds: sinusoidal "
        f"{fmt(mean(a['ln_over_bn_r2']['sinusoidal']))}, learned "
        f"{fmt(mean(a['ln_over_bn_r2']['learned']))}; offset on all features: R² "
        f"{fmt(max(a['ln_r2']['offset']))} after LN vs {fmt(min(a['bn_r2']['offset']))} after "
        f"BN; LN additivity error "
        f"{fmt(min(min(v) for v in a['ln_additivity_error'].values()))}-"
        f"{fmt(max(max(v) for v in a['ln_additivity_error'].values()))} (0 if LN were linear)."
    )
    _figure(ctx, numbers)
    s = sizes
    return Findings(
        numbers,
        (
            f"Seeds {ctx.seeds}, float64, 1 thread. Tokens: a vocabulary of {s['vocabulary']} "
            f"random N(0, 1) embeddings of width {s['width']}; {s['sequences']} sequences of "
            f"{s['length']} uniformly drawn tokens; position p = 0..{s['length'] - 1} encoded "
            f"three ways and added: offset (p x {OFFSET_STEP} on every feature), sinusoidal "
            f"(Vaswani et al. 2017), learned (a random-init N(0, 1) embedding per position, as "
            f"nn.Embedding; untrained). Representations: no norm, normlab.LayerNorm "
            f"(eps {EPS}), normlab.BatchNorm(dim=-1) in eval mode with running statistics "
            f"from training-mode passes over the training sequences (cumulative average). "
            f"Probe: ridge regression (alpha {RIDGE_ALPHA}, intercept) from one token's "
            f"vector to its position, fitted on {TRAIN_FRACTION:.0%} of the sequences, R² on "
            f"the rest. Linearity: ||LN(a) + LN(b) - LN(a + b)|| / ||LN(a + b)|| with a = token "
            f"embeddings, b = position encoding (for eval BN the affine analogue "
            f"BN(a) + BN(b) - BN(0)). Removal: a signal only in the mean (x + {OFFSET_STEP} p on "
            f"every feature) or only in the scale (x (1 + {SCALE_STEP} p)); change of the "
            f"normalized output when it is added."
        ),
    )


def verdict(numbers: dict) -> Verdict:
    a = numbers["aggregate"]
    decodable = min(min(a["bn_r2"][name]) for name in USED_BY_TRANSFORMERS)
    # the encoding LN hurts most, by its mean over seeds
    worst = min(USED_BY_TRANSFORMERS, key=lambda name: mean(a["ln_over_bn_r2"][name]))
    retained = mean(a["ln_over_bn_r2"][worst])
    additivity = min(min(v) for v in a["ln_additivity_error"].values())
    removal = max(max(v) for v in a["ln_removal_max_abs_change"].values())
    offset_ln, offset_bn = max(a["ln_r2"]["offset"]), min(a["bn_r2"]["offset"])
    deciding = (
        f"LN keeps {fmt(retained)} of BN's position R² ({worst}, the lower of sinusoidal and "
        f"learned; mean over seeds); "
        f"LN additivity error {fmt(additivity)}; offset-only position R² {fmt(offset_ln)} "
        f"after LN vs {fmt(offset_bn)} after BN"
    )
    if decodable < DECODABLE:
        return Verdict(
            "inconclusive",
            f"The probe cannot read the position even after eval BN (R² {fmt(decodable)} < "
            f"{DECODABLE}), so it cannot show what LN keeps.",
            deciding,
        )
    if retained < RETAINED:
        if consistent_effect([RETAINED - r for r in a["ln_over_bn_r2"][worst]]):
            return Verdict(
                "contradicted",
                f"LayerNorm loses position information of the encodings Transformers use: "
                f"the probe's R² after LN is only {fmt(retained)} of that after eval BN "
                f"({worst}), below {RETAINED} in every seed.",
                deciding,
            )
        return Verdict(
            "inconclusive",
            f"On average LN keeps only {fmt(retained)} of the probe's R² ({worst}), but not "
            f"consistently below {RETAINED} over seeds.",
            deciding,
        )
    nonlinear = additivity > NONLINEAR
    removes = removal < REMOVED and offset_ln < REMOVED_R2 and offset_bn >= DECODABLE
    if not nonlinear and not removes:
        return Verdict(
            "supported",
            f"LN keeps {fmt(retained)} of the position R², behaves linearly (additivity error "
            f"{fmt(additivity)}) and removes no position signal.",
            deciding,
        )
    faults = []
    if nonlinear:
        faults.append(
            f"LN is not linear (LN(a)+LN(b) differs from LN(a+b) by {fmt(additivity)} relative)"
        )
    if removes:
        faults.append(
            f"LN does destroy a position signal carried only by the mean or the scale of the "
            f"vector (output change <= {fmt(removal)}; offset R² {fmt(offset_ln)} after LN vs "
            f"{fmt(offset_bn)} after BN, which as an invertible affine map keeps everything)"
        )
    return Verdict(
        "partly supported",
        f"The conclusion holds for the encodings Transformers use: after LayerNorm a linear "
        f"probe still reads the position with {fmt(retained)} of the R² it gets after eval BN "
        f"({worst}, mean over seeds). The reasoning is wrong: " + "; and ".join(faults) + ". "
        "Nor do the original Transformer (sinusoidal) and BERT (learned) use relative position "
        "encodings; both are absolute.",
        deciding,
    )


CLAIM = Claim(
    letter="g",
    key="position",
    title="Position information: does LN keep it, and is LN linear?",
    article='"Transformer uses relative position encoding; LN applies a linear transform to '
    'one sample and does not destroy its position information."',
    rule=f"Written before the results. Inconclusive if a linear probe reads the position "
    f"from eval-BN representations with R² < {DECODABLE} for the sinusoidal or learned "
    f"encoding in some seed. Let kept = R² after LN / R² after eval BN, averaged over seeds, "
    f"for the encoding (sinusoidal or learned) where it is lower. Contradicted if kept < "
    f"{RETAINED} and {RETAINED} - kept is a consistent effect over seeds (positive in every "
    f"seed, mean beyond the spread): LN destroys position information; inconclusive if "
    f"kept < {RETAINED} without consistency. Supported if kept >= {RETAINED} and LN is "
    f"linear (relative error of "
    f"LN(a)+LN(b) vs LN(a+b) <= {NONLINEAR} in some seed) and removes no position signal. "
    f"Partly supported if LN keeps the information but is not linear (error > {NONLINEAR} "
    f"in every seed) or removes exactly a position signal carried only by the mean or the "
    f"scale (max output change < {REMOVED} and offset R² < {REMOVED_R2} after LN while "
    f">= {DECODABLE} after BN).",
    literature="Vaswani et al. 2017 (original Transformer: absolute sinusoidal encodings added "
    "to the embeddings; learned absolute ones gave nearly identical results); Devlin et al. "
    "2019 (BERT: learned absolute position embeddings, 512 positions); relative encodings "
    "came later: Shaw, Uszkoreit & Vaswani 2018, Transformer-XL (Dai et al. 2019), T5 "
    "(Raffel et al. 2020), RoPE (Su et al. 2021); Ba, Kiros & Hinton 2016 (LN: per-sample "
    "centring and scaling, a nonlinear map); Brody, Alon & Yahav 2023 (LN projects onto the "
    "hyperplane orthogonal to the all-ones vector, then scales).",
    run=run,
    verdict=verdict,
)
