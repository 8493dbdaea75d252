"""(f) Architecture fit: LayerNorm suits Transformer blocks of per-sample feature vectors;
BatchNorm, designed for CNNs, is less effective there. A tiny causal Transformer on lines of
Python's standard library, with each norm; the gradient at initialization versus depth for
Pre-LN and Post-LN; and how much batch statistics fluctuate on text versus images."""

from __future__ import annotations

import functools
import math
import platform

import numpy as np
import torch
from torch import nn

import normlab
from normlab.lab import text
from normlab.lab.rules import (
    apply_regime,
    consistent_effect,
    fmt,
    mean,
    plateau,
    power_text,
    regime,
    spread,
)
from normlab.lab.runner import Claim, Findings, RunContext, Verdict, seed_everything
from normlab.lab.sequence_models import (
    NORM_COLOURS,
    NORM_KINDS,
    NORM_LABELS,
    Schedule,
    SequenceNorm,
    TinyTransformer,
    next_token_loss,
    padded_train_losses,
    thin,
    train_next_token,
)

D_MODEL, HEADS, LAYERS, FFN = 32, 2, 2, 64
BATCH = 16
LR = 1e-2
DIGITS_BATCH = 64
DEPTHS = (1, 2, 4, 8)
PLACEMENTS = {"pre": "Pre-LN", "post": "Post-LN"}
BN_FAMILY = ("batch", "batch-masked", "power-masked")
# The full profile's schedule, fixed before its data: 3000 steps at a constant lr 0.01 left
# 39/40 runs still improving (the first full report), so the rate now warms up, decays to
# a tenth by step 2000 and stays there, and a run stops when its held-out curve meets the
# regime criterion. With a cap of 5000 steps one run of 40 (Pre-LN LayerNorm, seed 3) was
# still improving by 1.6% at the cap (the report of 2026-12-04), so the cap is now 10000:
# a run that has plateaued stops where it did, only a slower one trains on.
FULL_SCHEDULE = Schedule(
    lr=LR, max_steps=10000, eval_every=50, warmup=100, decay_end=2000, floor=0.1, early_stop=True
)


class StatisticsProbe:
    """Per training step, how far each BatchNorm layer's batch statistics are from its
    running statistics (Shen et al. 2020, Fig. 2), relative to the running variance:
    mean over channels of |mu_B - mu| / sqrt(var) and |var_B - var| / var."""

    def __init__(self, layers: list[tuple[nn.Module, nn.Module]]):
        self.mean_shift: list[list[float]] = [[] for _ in layers]
        self.var_shift: list[list[float]] = [[] for _ in layers]
        self.elements: list[int] = []
        self.handles = [
            hooked.register_forward_pre_hook(self._hook(i, batch_norm))
            for i, (hooked, batch_norm) in enumerate(layers)
        ]

    def _hook(self, index: int, batch_norm: nn.Module):
        def record(module, args):
            if not module.training:
                return
            x = args[0].detach()
            channels = x.shape[-1]
            masked = isinstance(module, SequenceNorm) and module.masked
            if masked:  # the real tokens, as the masked norm sees them
                x = x[normlab.lengths_to_mask(args[1], x.shape[1])]
            x = x.reshape(-1, channels)
            batch_mean, batch_var = x.mean(0), x.var(0, unbiased=False)
            running_var = batch_norm.running_var + batch_norm.eps
            self.mean_shift[index].append(
                float(((batch_mean - batch_norm.running_mean).abs() / running_var.sqrt()).mean())
            )
            self.var_shift[index].append(
                float(((batch_var - batch_norm.running_var).abs() / running_var).mean())
            )
            if index == 0:
                self.elements.append(x.shape[0])

        return record

    def close(self, burn_in: int, points: int = 500, every: int | None = None) -> dict:
        """Averages after ``burn_in`` steps; the per-step series as means of blocks of
        ``per_step_every`` steps, at most ``points`` of them."""
        for handle in self.handles:
            handle.remove()
        per_step_mean = np.mean(self.mean_shift, axis=0)
        per_step_var = np.mean(self.var_shift, axis=0)
        burn_in = min(burn_in, len(per_step_mean) // 3)  # a run shorter than the burn-in
        mean_series, every = thin(per_step_mean.tolist(), points, every)
        return {
            "mean_shift_per_step": mean_series,
            "var_shift_per_step": thin(per_step_var.tolist(), points, every)[0],
            "per_step_every": every,
            "mean_shift": float(per_step_mean[burn_in:].mean()),
            "var_shift": float(per_step_var[burn_in:].mean()),
            "elements_per_batch": float(np.mean(self.elements)),
        }


def _sequence_probe(model: nn.Module) -> StatisticsProbe:
    layers = [(m, m.norm) for m in model.modules() if isinstance(m, SequenceNorm)]
    return StatisticsProbe(layers)


def _digits_run(seed: int, steps: int, burn_in: int) -> dict:
    """An MLP with BatchNorm on scikit-learn's 8x8 digits: the image-data reference."""
    from sklearn.datasets import load_digits

    generator = seed_everything(seed)
    images, labels = load_digits(return_X_y=True)
    order = torch.randperm(len(labels), generator=generator)
    x = torch.tensor(images, dtype=torch.float32)[order] / 16
    y = torch.tensor(labels, dtype=torch.long)[order]
    split = 1500
    model = nn.Sequential(
        nn.Linear(64, 64),
        normlab.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 64),
        normlab.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    probe = StatisticsProbe([(m, m) for m in model.modules() if isinstance(m, normlab.BatchNorm1d)])
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, foreach=True)  # constant
    for _ in range(steps):
        picks = torch.randperm(split, generator=generator)[:DIGITS_BATCH]
        loss = nn.functional.cross_entropy(model(x[picks]), y[picks])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    result = probe.close(burn_in)
    model.eval()
    with torch.no_grad():
        result["held_out_accuracy"] = float(
            (model(x[split:]).argmax(-1) == y[split:]).float().mean()
        )
    return result


def _gradients_at_init(seed: int, tokens: torch.Tensor, lengths: torch.Tensor) -> dict:
    """Frobenius norm of dLoss/dW of each block's second FFN layer at initialization, for
    LayerNorm Transformers of each depth, Pre-LN and Post-LN (Xiong et al. 2020, Fig. 3)."""
    out = {}
    for placement in PLACEMENTS:
        out[placement] = {}
        for depth in DEPTHS:
            seed_everything(seed)
            model = TinyTransformer(
                text.VOCAB_SIZE,
                "layer",
                pre_ln=placement == "pre",
                d_model=D_MODEL,
                heads=HEADS,
                layers=depth,
                ffn=FFN,
            )
            loss, _, _ = next_token_loss(model(tokens, lengths), tokens, lengths)
            loss.backward()
            out[placement][str(depth)] = [
                float(block.ffn_out.weight.grad.norm()) for block in model.blocks
            ]
    return out


@functools.lru_cache(maxsize=2)
def _held_out_lines(files: int, count: int) -> tuple[torch.Tensor, ...]:
    """``count`` lines spread evenly over the held-out files."""
    corpus = text.load_corpus(files=files)
    return corpus.held_out[:: max(1, len(corpus.held_out) // count)][:count]


def _transformer_run(
    seed: int,
    placement: str,
    kind: str,
    files: int,
    held_out_count: int,
    schedule: Schedule,
    extra: dict,
) -> tuple[dict, dict | None]:
    """One training run (a job for ``RunContext.map``): its curves, and for the BatchNorm
    kinds the statistics probe's record. The same initialization stream and batches for every
    norm within a seed."""
    corpus = text.load_corpus(files=files)
    held_out = text.fixed_batches(_held_out_lines(files, held_out_count), 64)
    generator = seed_everything(seed)
    model = TinyTransformer(
        text.VOCAB_SIZE,
        kind,
        pre_ln=placement == "pre",
        d_model=D_MODEL,
        heads=HEADS,
        layers=LAYERS,
        ffn=FFN,
        power_warmup=extra["power_warmup"],
    )
    probe = _sequence_probe(model) if kind.startswith("batch") else None
    curves = train_next_token(
        model,
        lambda: text.sample_batch(corpus.train, BATCH, generator),
        held_out,
        schedule,
    )
    return (
        curves.as_dict(max_steps=schedule.max_steps),
        # Blocks of the same length for every run (runs that stop early are shorter).
        None
        if probe is None
        else probe.close(extra["burn_in"], every=math.ceil(schedule.max_steps / 500)),
    )


def _seed_extras(seed: int, files: int, held_out_count: int, extra: dict) -> tuple:
    """The digits reference for the fluctuation and the gradients at initialization."""
    probe_batch = text.pad_batch(list(_held_out_lines(files, held_out_count)[:32]))
    return (
        _digits_run(seed, extra["digits_steps"], extra["burn_in"]),
        _gradients_at_init(seed, *probe_batch),
    )


def run(ctx: RunContext) -> Findings:
    pick = ctx.profile.pick
    files = pick(smoke=10, quick=40, full=80)
    schedule = pick(
        smoke=Schedule(lr=LR, max_steps=6, eval_every=2),
        quick=Schedule(lr=LR, max_steps=100, eval_every=10),
        full=FULL_SCHEDULE,
    )
    steps, eval_every = schedule.max_steps, schedule.eval_every
    held_out_count = pick(smoke=32, quick=128, full=512)
    digits_steps = pick(smoke=6, quick=100, full=3000)
    burn_in = pick(smoke=2, quick=33, full=1000)
    power_warmup = pick(smoke=1, quick=20, full=600)
    extra = {"burn_in": burn_in, "power_warmup": power_warmup, "digits_steps": digits_steps}
    corpus = text.load_corpus(files=files)
    held_out_lines = _held_out_lines(files, held_out_count)
    numbers = {
        "python": platform.python_version(),
        "data": corpus.describe(),
        "model": {"d_model": D_MODEL, "heads": HEADS, "layers": LAYERS, "ffn": FFN},
        "training": {
            "steps": steps,
            "schedule": schedule.as_dict(),
            "eval_every": eval_every,
            "lr": LR,
            "batch": BATCH,
            "power_warmup": power_warmup,
            "seeds": {},
        },
        "gradients": {"depths": list(DEPTHS), "seeds": {}},
        "fluctuation": {"burn_in": burn_in, "digits_batch": DIGITS_BATCH, "seeds": {}},
    }
    jobs = [
        (seed, placement, kind, files, held_out_count, schedule, extra)
        for seed in ctx.seeds
        for placement in PLACEMENTS
        for kind in NORM_KINDS
    ]
    trained = ctx.map(_transformer_run, jobs, f"Transformers, up to {steps} steps")
    extras = ctx.map(
        _seed_extras,
        [(seed, files, held_out_count, extra) for seed in ctx.seeds],
        "digits reference and gradients at init",
    )
    outcomes = dict(zip([job[:3] for job in jobs], trained, strict=True))
    for seed, (digits_reference, gradients) in zip(ctx.seeds, extras, strict=True):
        runs = {p: {k: outcomes[seed, p, k][0] for k in NORM_KINDS} for p in PLACEMENTS}
        fluctuation = {
            f"text {k} {p}": outcomes[seed, p, k][1]
            for p in PLACEMENTS
            for k in NORM_KINDS
            if k.startswith("batch")
        }
        fluctuation["digits"] = digits_reference
        numbers["training"]["seeds"][str(seed)] = runs
        numbers["fluctuation"]["seeds"][str(seed)] = fluctuation
        numbers["gradients"]["seeds"][str(seed)] = gradients

    seeds = numbers["training"]["seeds"].values()
    numbers["training"]["final_loss"] = {
        placement: {
            kind: [s[placement][kind]["eval_loss"][-1] for s in seeds] for kind in NORM_KINDS
        }
        for placement in PLACEMENTS
    }
    numbers["training"]["final_accuracy"] = {
        placement: {
            kind: [s[placement][kind]["eval_accuracy"][-1] for s in seeds] for kind in NORM_KINDS
        }
        for placement in PLACEMENTS
    }
    numbers["fluctuation"]["var_shift_ratio"] = _fluctuation_ratios(numbers, "var_shift")
    numbers["fluctuation"]["mean_shift_ratio"] = _fluctuation_ratios(numbers, "mean_shift")
    # Added after the first quick run showed text batches (~540 real tokens) fluctuating less
    # than digits batches (64 images); reported, not used by the verdict.
    numbers["fluctuation"]["var_shift_ratio_per_element"] = _fluctuation_ratios(
        numbers, "var_shift", per_element=True
    )
    numbers["gradients"]["last_layer"] = {
        placement: {
            str(depth): [
                g[placement][str(depth)][-1] for g in numbers["gradients"]["seeds"].values()
            ]
            for depth in DEPTHS
        }
        for placement in PLACEMENTS
    }
    numbers["regime"] = regime(
        {
            f"{PLACEMENTS[p]} {NORM_LABELS[k]} seed {seed}": plateau(
                run[p][k]["eval_steps"], run[p][k]["eval_loss"], schedule.constant_from
            )
            for seed, run in numbers["training"]["seeds"].items()
            for p in PLACEMENTS
            for k in NORM_KINDS
        }
    )
    numbers["summary"] = _summary(numbers)
    _loss_figure(ctx, numbers)
    _gradient_figure(ctx, numbers)
    _fluctuation_figure(ctx, numbers)
    return Findings(
        numbers,
        (
            f"Data: {corpus.describe()} (Python {platform.python_version()}). Model: causal "
            f"character Transformer, d_model {D_MODEL}, {HEADS} heads, {LAYERS} layers, FFN "
            f"{FFN}, learned positions, Xavier-uniform weights and zero biases; Pre-LN (with a "
            f"final norm) and Post-LN; the norm is LayerNorm, BatchNorm(dim=-1) over all "
            f"positions (padding included), masked BatchNorm or masked PowerNorm (warmup "
            f"{power_warmup} steps), given lengths=. Training: Adam, {schedule.describe()}; "
            f"gradient clipping 1, batches of {BATCH} random lines padded to the longest, "
            f"next-character loss on real tokens; held-out loss in eval mode on "
            f"{len(held_out_lines)} lines of held-out files; the same initialization stream "
            f"and batches for every norm within a seed. Gradients: at initialization, "
            f"LayerNorm Transformers of depth {list(DEPTHS)}, one batch of 32 held-out lines, "
            f"Frobenius norm of dLoss/dW of each block's second FFN layer. Fluctuation: "
            f"during the BatchNorm runs, each BatchNorm layer's batch mean and variance (over "
            f"real tokens for the masked one) against its running statistics (momentum 0.1), "
            f"relative to the running variance, averaged over channels, layers and steps after "
            f"the first {burn_in}; image reference: MLP 64-64-BN-ReLU-64-BN-ReLU-10 on "
            f"scikit-learn's 8x8 digits (1500 train), batches of {DIGITS_BATCH} images, Adam "
            f"lr {LR} (constant) for {digits_steps} steps; the ratio scaled by sqrt(elements "
            f"per batch) was added after the first results and does not enter the verdict. "
            f"Seeds {ctx.seeds}."
        ),
    )


def _fluctuation_ratios(numbers: dict, key: str, per_element: bool = False) -> list[float]:
    """Per seed: masked-BatchNorm text fluctuation (both placements averaged) / digits.
    ``per_element`` first multiplies each by sqrt(elements per batch), the scale of i.i.d.
    sampling noise, so that batches of different sizes compare."""

    def value(run: dict) -> float:
        return run[key] * (math.sqrt(run["elements_per_batch"]) if per_element else 1.0)

    ratios = []
    for runs in numbers["fluctuation"]["seeds"].values():
        text_value = mean([value(runs[f"text batch-masked {p}"]) for p in PLACEMENTS])
        ratios.append(text_value / value(runs["digits"]))
    return ratios


def _elements(numbers: dict, name: str) -> list[float]:
    return [s[name]["elements_per_batch"] for s in numbers["fluctuation"]["seeds"].values()]


def _gaps(numbers: dict, placement: str, kind: str) -> list[float] | None:
    """Per seed, held-out loss of ``kind`` minus LayerNorm's; None if a run diverged."""
    final = numbers["training"]["final_loss"][placement]
    if any(v is None for v in final[kind] + final["layer"]):
        return None
    return [b - ln for b, ln in zip(final[kind], final["layer"], strict=True)]


def _summary(numbers: dict) -> str:
    final = numbers["training"]["final_loss"]
    parts = []
    for placement, name in PLACEMENTS.items():
        losses = ", ".join(
            f"{NORM_LABELS[k]} "
            f"{fmt(mean([v for v in final[placement][k] if v is not None] or [math.nan]))}"
            for k in NORM_KINDS
        )
        parts.append(f"{name}: {losses}")
    last = numbers["gradients"]["last_layer"]
    deepest = str(DEPTHS[-1])
    return (
        f"held-out loss {'; '.join(parts)}. Last FFN weight gradient at init, depth 1 -> "
        f"{deepest}: Post-LN {fmt(mean(last['post']['1']))} -> {fmt(mean(last['post'][deepest]))},"
        f" Pre-LN {fmt(mean(last['pre']['1']))} -> {fmt(mean(last['pre'][deepest]))}. Batch "
        f"variance deviation from the running variance, text (masked BN) / digits: "
        f"{fmt(mean(numbers['fluctuation']['var_shift_ratio']))}x (mean deviation "
        f"{fmt(mean(numbers['fluctuation']['mean_shift_ratio']))}x; text batches hold "
        f"{fmt(mean(_elements(numbers, 'text batch-masked pre')))} real tokens, digits batches "
        f"{DIGITS_BATCH} images; scaled by sqrt(elements per batch) the variance ratio is "
        f"{fmt(mean(numbers['fluctuation']['var_shift_ratio_per_element']))}x)."
    )


def _loss_figure(ctx: RunContext, numbers: dict) -> None:
    import matplotlib.pyplot as plt

    training = numbers["training"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (placement, name) in zip(axes[:2], PLACEMENTS.items(), strict=True):
        for kind in NORM_KINDS:
            runs = [s[placement][kind] for s in training["seeds"].values()]
            rows, every = padded_train_losses(runs)
            losses = np.array(rows)
            window = max(1, losses.shape[1] // 15)
            kernel = np.ones(window) / window
            smooth = np.array([np.convolve(row, kernel, mode="valid") for row in losses])
            steps = np.arange(window, losses.shape[1] + 1) * every
            ax.plot(steps, np.nanmean(smooth, 0), color=NORM_COLOURS[kind], label=NORM_LABELS[kind])
            ax.fill_between(
                steps,
                np.nanmin(smooth, 0),
                np.nanmax(smooth, 0),
                color=NORM_COLOURS[kind],
                alpha=0.15,
            )
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (moving average, 1/15 of the run)")
        ax.set_title(f"{name} Transformer (mean; band: seeds' range)", fontsize=10)
        ax.legend(fontsize=8)
    ax = axes[2]
    for i, placement in enumerate(PLACEMENTS):
        for j, kind in enumerate(NORM_KINDS):
            values = [np.nan if v is None else v for v in training["final_loss"][placement][kind]]
            x = i * (len(NORM_KINDS) + 1) + j
            ax.plot([x] * len(values), values, "o", color=NORM_COLOURS[kind], alpha=0.7)
            ax.plot([x - 0.3, x + 0.3], [np.nanmean(values)] * 2, "-", color=NORM_COLOURS[kind])
    ax.set_xticks(
        [i * (len(NORM_KINDS) + 1) + (len(NORM_KINDS) - 1) / 2 for i in range(len(PLACEMENTS))],
        list(PLACEMENTS.values()),
    )
    ax.set_ylabel("held-out loss at the end (eval mode)")
    ax.set_title("Held-out loss per seed (dots) and mean (bar); colours as left", fontsize=10)
    ctx.figure("loss-curves", fig)


def _gradient_figure(ctx: RunContext, numbers: dict) -> None:
    import matplotlib.pyplot as plt

    gradients = numbers["gradients"]
    colours = {"pre": "#1f77b4", "post": "#d62728"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for placement, name in PLACEMENTS.items():
        last = gradients["last_layer"][placement]
        means = [mean(last[str(d)]) for d in DEPTHS]
        left.plot(DEPTHS, means, "o-", color=colours[placement], label=name)
        for d in DEPTHS:
            left.plot([d] * len(last[str(d)]), last[str(d)], ".", color=colours[placement])
    reference = mean(gradients["last_layer"]["pre"][str(DEPTHS[0])])
    left.plot(
        DEPTHS,
        [reference / math.sqrt(d / DEPTHS[0]) for d in DEPTHS],
        "k:",
        label="Pre-LN theory: 1/sqrt(depth)",
    )
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("number of layers")
    left.set_ylabel("|dLoss/dW| of the last layer's FFN W2 at init")
    left.set_title("Last-layer gradient at initialization vs depth (LayerNorm)", fontsize=10)
    left.legend(fontsize=8)
    deepest = str(DEPTHS[-1])
    for placement, name in PLACEMENTS.items():
        per_layer = np.array([g[placement][deepest] for g in gradients["seeds"].values()])
        layers = np.arange(1, per_layer.shape[1] + 1)
        right.plot(layers, per_layer.mean(0), "o-", color=colours[placement], label=name)
        right.fill_between(
            layers, per_layer.min(0), per_layer.max(0), color=colours[placement], alpha=0.15
        )
    right.set_yscale("log")
    right.set_xlabel("layer index")
    right.set_ylabel("|dLoss/dW| of that layer's FFN W2 at init")
    right.set_title(f"Per layer, {deepest}-layer model (as Xiong et al. 2020, Fig. 3)", fontsize=10)
    right.legend(fontsize=8)
    ctx.figure("gradients", fig)


def _fluctuation_figure(ctx: RunContext, numbers: dict) -> None:
    import matplotlib.pyplot as plt

    fluctuation = numbers["fluctuation"]
    series = {
        "text batch-masked pre": ("text, masked BN, Pre-LN", "#2ca02c", "-"),
        "text batch-masked post": ("text, masked BN, Post-LN", "#2ca02c", "--"),
        "text batch pre": ("text, unmasked BN, Pre-LN", "#d62728", "-"),
        "text batch post": ("text, unmasked BN, Post-LN", "#d62728", "--"),
        "digits": ("digits images, BN MLP", "#333333", "-"),
    }
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    fig.subplots_adjust(wspace=0.3)
    for ax, key, label in (
        (axes[0], "var_shift", "|var_B - var_run| / var_run"),
        (axes[1], "mean_shift", "|mu_B - mu_run| / std_run"),
    ):
        for name, (text_label, colour, style) in series.items():
            records = [s[name] for s in fluctuation["seeds"].values()]
            series_of = [
                [np.nan if v is None else v for v in r[f"{key}_per_step"]] for r in records
            ]
            longest = max(len(v) for v in series_of)  # runs that stopped early end in NaN
            runs = np.array([v + [np.nan] * (longest - len(v)) for v in series_of], dtype=float)
            every = records[0].get("per_step_every", 1)
            x = np.arange(1, runs.shape[1] + 1) * every
            ax.plot(x, np.nanmean(runs, 0), style, color=colour, label=text_label)
        ax.axvline(fluctuation["burn_in"], color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("training step (dotted: end of burn-in)")
        ax.set_ylabel(label)
        ax.set_title("Batch vs running statistic, mean over channels, layers, seeds", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[2]
    names = list(series)
    width = 0.4
    for j, key in enumerate(("var_shift", "mean_shift")):
        values = [[s[name][key] for s in fluctuation["seeds"].values()] for name in names]
        positions = np.arange(len(names)) + (j - 0.5) * width
        ax.bar(positions, [np.mean(v) for v in values], width, label=key.replace("_", " "))
        for p, v in zip(positions, values, strict=True):
            ax.plot([p] * len(v), v, "k.", markersize=4)
    ax.set_xticks(np.arange(len(names)), [series[n][0] for n in names], rotation=25, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("average after burn-in (dots: seeds)")
    ax.set_title("Average after burn-in: text (~16 lines) vs images (64)", fontsize=10)
    ax.legend(fontsize=8)
    ctx.figure("fluctuation", fig)


def _run_lengths(numbers: dict) -> str:
    """The shortest and longest run, e.g. '2600-6000'."""
    lengths = [
        run["eval_steps"][-1]
        for seed in numbers["training"]["seeds"].values()
        for placement in seed.values()
        for run in placement.values()
    ]
    low, high = min(lengths), max(lengths)
    return str(low) if low == high else f"{low}-{high}"


def verdict(numbers: dict) -> Verdict:
    return Verdict(*apply_regime(numbers["regime"], *_decide(numbers)))


def _decide(numbers: dict) -> tuple[str, str, str]:
    """The rule on the final held-out losses, before the regime check."""
    gaps = {p: {k: _gaps(numbers, p, k) for k in BN_FAMILY} for p in PLACEMENTS}
    means = {
        p: {k: (mean(g) if g is not None else math.inf) for k, g in gaps[p].items()}
        for p in PLACEMENTS
    }
    best = {p: min(BN_FAMILY, key=lambda k, p=p: means[p][k]) for p in PLACEMENTS}
    deciding = "held-out loss, best BatchNorm-family norm − LayerNorm: " + "; ".join(
        f"{PLACEMENTS[p]} {fmt(means[p][best[p]])}"
        + (f" ± {fmt(spread(gaps[p][best[p]]))}" if gaps[p][best[p]] is not None else "")
        + f" ({NORM_LABELS[best[p]]})"
        for p in PLACEMENTS
    )
    ln_beats_all = all(
        gaps[p][k] is None or consistent_effect(gaps[p][k]) for p in PLACEMENTS for k in BN_FAMILY
    )
    bn_beats_ln = any(
        all(
            gaps[p][k] is not None and consistent_effect([-g for g in gaps[p][k]])
            for p in PLACEMENTS
        )
        for k in BN_FAMILY
    )
    ln_beats_unmasked = all(
        gaps[p]["batch"] is None or consistent_effect(gaps[p]["batch"]) for p in PLACEMENTS
    )
    ratios = numbers["fluctuation"]["var_shift_ratio"]
    text_fluctuates = consistent_effect([math.log(r) for r in ratios])
    last = numbers["gradients"]["last_layer"]
    deepest = str(DEPTHS[-1])
    post_over_pre = mean(last["post"][deepest]) / mean(last["pre"][deepest])
    training = numbers["training"]
    context = (
        f" (Held-out loss at the end of each run, {_run_lengths(numbers)} steps of "
        f"{training['batch']} lines, {len(training['seeds'])} seeds.)"
        f" Batch variance fluctuation, text (masked BN) / digits: {fmt(mean(ratios))}x ± "
        f"{fmt(spread(ratios))} (text {'' if text_fluctuates else 'not '}consistently above "
        f"images over seeds). Gradient of the last FFN weight at init with {deepest} layers: "
        f"Post-LN / Pre-LN {fmt(post_over_pre)}x (placement of LayerNorm, not LN vs BN)."
    )
    gap_text = "; ".join(
        f"{PLACEMENTS[p]}: "
        + ", ".join(
            f"{NORM_LABELS[k]} "
            + ("diverged" if gaps[p][k] is None else power_text(gaps[p][k], unit=" nats"))
            for k in BN_FAMILY
        )
        for p in PLACEMENTS
    )
    if ln_beats_all:
        return (
            "supported",
            f"LayerNorm reached a lower held-out loss than every BatchNorm-family norm in every "
            f"seed, in both placements (loss − LayerNorm: {gap_text}).{context}",
            deciding,
        )
    if bn_beats_ln:
        return (
            "contradicted",
            f"A BatchNorm-family norm reached a consistently lower held-out loss than LayerNorm "
            f"in both placements (loss − LayerNorm: {gap_text}).{context}",
            deciding,
        )
    if ln_beats_unmasked or text_fluctuates:
        return (
            "partly supported",
            f"LayerNorm did not beat every BatchNorm-family norm consistently (loss − "
            f"LayerNorm: {gap_text}), but "
            + (
                "it beat plain (unmasked) BatchNorm in both placements"
                if ln_beats_unmasked
                else "text batch statistics fluctuated consistently more than image ones"
            )
            + f".{context}",
            deciding,
        )
    return (
        "inconclusive",
        f"No consistent difference between LayerNorm and the BatchNorm family, and no "
        f"consistent excess fluctuation of text statistics (loss − LayerNorm: {gap_text})."
        f"{context}",
        deciding,
    )


CLAIM = Claim(
    letter="f",
    key="architecture",
    title="Architecture fit: norms inside a Transformer",
    article="Transformer and BERT are built from self-attention and MLP blocks over per-sample "
    "feature vectors, which LayerNorm fits directly; BatchNorm was designed for CNNs and is "
    "less effective in Transformers while adding complexity and cost.",
    rule="Per placement (Pre-LN, Post-LN) and BatchNorm-family norm (unmasked BatchNorm, masked "
    "BatchNorm, masked PowerNorm), the per-seed difference of final held-out loss minus "
    "LayerNorm's. Supported if LayerNorm is better than every one of them in both placements "
    "(rules.consistent_effect on the differences; a diverged run counts as worse). "
    "Contradicted if some BatchNorm-family norm is consistently better than LayerNorm in both "
    "placements. Otherwise partly supported if LayerNorm consistently beats unmasked BatchNorm "
    "in both placements, or if text batch-variance fluctuation (masked BatchNorm, relative to "
    "the running variance) exceeds the digits MLP's consistently (consistent_effect on the "
    "log ratio per seed); else inconclusive. Regime first: if any of these runs has not "
    "converged (rules.REGIME_CRITERION, on its held-out loss curve), inconclusive. The "
    "gradient-versus-depth measurement is "
    "reported beside the verdict: it concerns where LayerNorm sits, not LayerNorm vs "
    "BatchNorm.",
    literature="Xiong et al., ICML 2020 (On Layer Normalization in the Transformer "
    "Architecture): at initialization Post-LN's gradients near the output are large and do not "
    "shrink with depth, Pre-LN's scale as 1/sqrt(depth) and are uniform across layers, so "
    "Pre-LN trains without warmup. Shen et al., ICML 2020 (PowerNorm, arXiv:2003.07845): batch "
    "statistics in NLP Transformers fluctuate far more than in CNNs on images, which hurts "
    "BatchNorm; PowerNorm (quadratic mean, running statistics in the forward) closes the gap. "
    "Vaswani et al. 2017 and BERT use Post-LN LayerNorm.",
    run=run,
    verdict=verdict,
)
