"""(b) Formula and purpose: does (value - mean) / std tame vanishing and exploding gradients,
and does it improve generalization? Gradients of deep ReLU MLPs at initialization across
depth and weight scale, then training on digits at one moderate depth."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from normlab.lab import digits
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

NORMS = ("none", "BatchNorm", "LayerNorm", "RMSNorm")
DECIDING_NORMS = ("BatchNorm", "LayerNorm")  # the article's (value - mean) / std pair
WIDTH = 64
GAIN = math.sqrt(2.0)  # He: scale 1 keeps a plain ReLU net's activations at one scale
GRADIENT_BATCH = 128
TRAIN_DEPTH, BATCH_SIZE, LR = 10, 32, 0.02
# The full profile's training, fixed before its data: 80 epochs left 1 of 15 runs still
# improving (the previous full report), so runs may now go on to FULL_EPOCHS and stop at the
# first evaluation after FULL_MIN_EPOCHS at which the held-out curve meets the regime
# criterion; evaluations every FULL_EVAL_EVERY steps (20 per 80 epochs, as before).
FULL_EPOCHS = 160
FULL_MIN_EPOCHS = 20
FULL_EVAL_EVERY = 160
EVALUATIONS = 20  # held-out loss evaluations per training run (the regime check's curve)
ORDERS_BETTER = 1.0  # "mitigates": at least 10x less drift than without normalization
ORDERS_TAME = 1.0  # "tame": the first layer's gradient moves less than 10x from shallow to deep
YANG_RELU_RATE = math.sqrt(math.pi / (math.pi - 1))  # BN gradient growth per layer, ReLU


def _scale_key(scale: float) -> str:
    return f"{scale:g}"


def _init_gradients_seed(seed: int, depths, scales) -> dict:
    """One seed (a job for ``RunContext.map``): per norm, scale and depth, the first and last
    hidden layers' weight-gradient norms for one batch of real digits in float64 (so neither
    2^-80 nor 2^80 leaves the representable range)."""
    data = digits.load_digits()
    generator = seed_everything(seed)
    batch = torch.randperm(len(data.y_train), generator=generator)[:GRADIENT_BATCH]
    x, y = data.x_train[batch].double(), data.y_train[batch]
    result = {norm: {} for norm in NORMS}
    for norm in NORMS:
        for scale in scales:
            cell = result[norm][_scale_key(scale)] = {"first": {}, "last": {}, "ratio": {}}
            for depth in depths:
                model = digits.mlp(digits.norm_factory(norm), depth=depth, width=WIDTH)
                model = digits.scale_init(model.double().train(), scale, generator, GAIN)
                nn.functional.cross_entropy(model(x), y).backward()
                hidden = digits.hidden_linears(model)
                first = float(hidden[0].weight.grad.norm())
                last = float(hidden[-1].weight.grad.norm())
                for name, value in (("first", first), ("last", last), ("ratio", first / last)):
                    cell[name][str(depth)] = value
    return result


def _init_gradients(ctx: RunContext, depths, scales) -> dict:
    """Per norm, scale and depth: the first and last hidden layers' weight-gradient norms,
    one value per seed."""
    per_seed = ctx.map(
        _init_gradients_seed,
        [(seed, depths, scales) for seed in ctx.seeds],
        "gradients at initialization",
    )
    return {
        norm: {
            _scale_key(s): {
                name: {
                    str(d): [r[norm][_scale_key(s)][name][str(d)] for r in per_seed] for d in depths
                }
                for name in ("first", "last", "ratio")
            }
            for s in scales
        }
        for norm in NORMS
    }


def _log_drift(first_deep: float, first_shallow: float) -> float:
    """Orders of magnitude the first layer's gradient moves from the shallowest to the
    deepest net (positive: grows with depth)."""
    return math.log10(first_deep) - math.log10(first_shallow)


def _train_deep(
    norm: str, seed: int, epochs: int, eval_every: int, early_stop_after: int | None
) -> dict:
    """One training run at depth TRAIN_DEPTH (a job for ``RunContext.map``)."""
    data = digits.load_digits()
    generator = seed_everything(seed)
    model = digits.mlp(digits.norm_factory(norm), depth=TRAIN_DEPTH, width=WIDTH)
    digits.scale_init(model, 1.0, generator, GAIN)
    outcome = digits.train(
        model,
        data.x_train,
        data.y_train,
        data.x_test,
        data.y_test,
        batch_size=BATCH_SIZE,
        lr=LR,
        epochs=epochs,
        generator=generator,
        curves=True,
        eval_every=eval_every,
        early_stop_after=early_stop_after,
    )
    return {
        "steps": outcome.steps,
        "test_error": outcome.test_error,
        "train_error": outcome.train_error,
        "diverged": outcome.diverged,
        "curves": {
            "train_error": outcome.curves["train_error"],
            "test_error": outcome.curves["test_error"],
            "held_out_steps": outcome.held_out_steps,
            "held_out_loss": outcome.held_out_loss,
        },
    }


def _training(ctx: RunContext, epochs: int, eval_every: int, early_stop_after: int | None) -> dict:
    jobs = [
        (norm, seed, epochs, eval_every, early_stop_after) for norm in NORMS for seed in ctx.seeds
    ]
    outcomes = ctx.map(_train_deep, jobs, f"training at depth {TRAIN_DEPTH}, up to {epochs} epochs")
    runs = {}
    for norm in NORMS:
        per_seed = [o for (n, *_), o in zip(jobs, outcomes, strict=True) if n == norm]
        runs[norm] = {
            "steps": [o["steps"] for o in per_seed],
            "test_error": [o["test_error"] for o in per_seed],
            "train_error": [o["train_error"] for o in per_seed],
            "gap": [o["test_error"] - o["train_error"] for o in per_seed],
            "diverged": [o["diverged"] for o in per_seed],
            "curves": [o["curves"] for o in per_seed],
        }
    return runs


def _gradient_figure(ctx: RunContext, grads: dict, depths, scales) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(NORMS), figsize=(13, 6), sharey="row", sharex=True)
    colours = plt.cm.viridis(np.linspace(0.1, 0.85, len(scales)))
    for col, norm in enumerate(NORMS):
        for row, quantity in enumerate(("ratio", "first")):
            ax = axes[row, col]
            for scale, colour in zip(scales, colours, strict=True):
                per_depth = [grads[norm][_scale_key(scale)][quantity][str(d)] for d in depths]
                centre = [float(np.exp(np.mean(np.log(v)))) for v in per_depth]
                ax.plot(depths, centre, "o-", color=colour, label=f"init scale {scale:g}")
                ax.fill_between(
                    depths,
                    [min(v) for v in per_depth],
                    [max(v) for v in per_depth],
                    color=colour,
                    alpha=0.2,
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            if quantity == "ratio":
                ax.axhline(1.0, color="grey", lw=0.8)
            if quantity == "ratio" and norm == "BatchNorm":
                start = float(np.exp(np.mean(np.log(grads[norm]["1"]["ratio"][str(depths[0])]))))
                ax.plot(
                    depths,
                    [start * YANG_RELU_RATE ** (d - depths[0]) for d in depths],
                    "k:",
                    label="Yang et al. rate",
                )
                ax.legend(fontsize=8)
            ax.set_xticks(depths, [str(d) for d in depths])
            if row == 0:
                ax.set_title(norm)
            else:
                ax.set_xlabel("depth (hidden layers)")
        axes[0, 0].set_ylabel("first / last layer\ngradient norm")
        axes[1, 0].set_ylabel("first-layer\ngradient norm")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        f"Deep ReLU MLPs (width {WIDTH}) at initialization, one batch of {GRADIENT_BATCH} "
        "digits: geometric mean over seeds, band = min..max",
        fontsize=10,
    )
    fig.subplots_adjust(wspace=0.08, hspace=0.08)  # tight_layout costs a second here
    ctx.figure("gradient-ratio", fig)


def _training_figure(ctx: RunContext, runs: dict) -> None:
    import matplotlib.pyplot as plt

    fig, (curves_ax, bar_ax) = plt.subplots(1, 2, figsize=(12, 4))
    colours = dict(zip(NORMS, plt.cm.tab10.colors, strict=False))
    for norm in NORMS:
        for quantity, style in (("train_error", "--"), ("test_error", "-")):
            per_seed = [c[quantity] for c in runs[norm]["curves"]]
            epochs = min(len(c) for c in per_seed)
            average = np.mean([c[:epochs] for c in per_seed], axis=0)
            curves_ax.plot(
                range(1, epochs + 1),
                average,
                style,
                color=colours[norm],
                label=f"{norm} {'test' if quantity == 'test_error' else 'train'}",
            )
    curves_ax.set_yscale("log")
    curves_ax.set_xlabel("epoch")
    curves_ax.set_ylabel("error (eval mode), mean over seeds")
    curves_ax.set_title(f"Digits, ReLU MLP depth {TRAIN_DEPTH}: train (dashed), test (solid)")
    curves_ax.legend(fontsize=7, ncol=2)
    positions = np.arange(len(NORMS))
    for offset, quantity, label in (
        (-0.2, "test_error", "test error"),
        (0.2, "gap", "test - train"),
    ):
        values = [runs[n][quantity] for n in NORMS]
        bar_ax.bar(
            positions + offset,
            [mean(v) for v in values],
            0.4,
            yerr=[spread(v) for v in values],
            label=label,
            capsize=3,
        )
    bar_ax.set_xticks(positions, NORMS)
    bar_ax.set_ylabel("final error (eval mode)")
    bar_ax.set_title("Final test error and train-test gap (bars: seed std)")
    bar_ax.legend(fontsize=8)
    fig.tight_layout()
    ctx.figure("training-curves", fig)


def run(ctx: RunContext) -> Findings:
    depths = ctx.profile.pick(
        smoke=[5, 20], quick=[5, 10, 20, 40, 80], full=[5, 10, 20, 40, 80, 160]
    )
    scales = [0.5, 1.0, 2.0]
    epochs = ctx.profile.pick(smoke=1, quick=10, full=FULL_EPOCHS)
    grads = _init_gradients(ctx, depths, scales)
    shallow, deep = str(depths[0]), str(depths[-1])
    drift_by_scale = {
        norm: {
            key: [
                _log_drift(d, s)
                for d, s in zip(cell["first"][deep], cell["first"][shallow], strict=True)
            ]
            for key, cell in grads[norm].items()
        }
        for norm in NORMS
    }
    n_seeds = len(ctx.seeds)
    worst_drift = {
        norm: [max(abs(v[i]) for v in drift_by_scale[norm].values()) for i in range(n_seeds)]
        for norm in NORMS
    }
    # Per-layer growth of the first layer's gradient, from the drift averaged over scales.
    growth_per_layer = {
        norm: [
            10 ** (mean([v[i] for v in drift_by_scale[norm].values()]) / (depths[-1] - depths[0]))
            for i in range(n_seeds)
        ]
        for norm in NORMS
    }
    scale_sensitivity = {
        norm: [
            math.log10(
                max(grads[norm][_scale_key(s)]["first"][deep][i] for s in scales)
                / min(grads[norm][_scale_key(s)]["first"][deep][i] for s in scales)
            )
            for i in range(n_seeds)
        ]
        for norm in NORMS
    }
    steps_per_epoch = digits.TRAIN_SIZE // BATCH_SIZE
    eval_every = ctx.profile.pick(
        smoke=max(1, steps_per_epoch // EVALUATIONS),
        quick=max(1, epochs * steps_per_epoch // EVALUATIONS),
        full=FULL_EVAL_EVERY,
    )
    early_stop_after = ctx.profile.pick(
        smoke=None, quick=None, full=FULL_MIN_EPOCHS * steps_per_epoch
    )
    runs = _training(ctx, epochs, eval_every, early_stop_after)
    _gradient_figure(ctx, grads, depths, scales)
    _training_figure(ctx, runs)
    numbers = {
        "activation": "ReLU",
        "width": WIDTH,
        "depths": depths,
        "scales": scales,
        "seeds": ctx.seeds,
        "init_gradients": grads,
        "drift_orders_by_scale": drift_by_scale,
        "worst_drift_orders": worst_drift,
        "growth_per_layer": growth_per_layer,
        "scale_sensitivity_orders": scale_sensitivity,
        "training": {
            "depth": TRAIN_DEPTH,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "epochs": epochs,
            "eval_every": eval_every,
            "early_stop_after": early_stop_after,
            "runs": runs,
        },
        "regime": training_regime(runs, ctx.seeds),
    }
    numbers["summary"] = (
        f"worst-scale drift of the first layer's gradient, depth {shallow}->{deep} (orders of "
        "magnitude): "
        + ", ".join(f"{n} {fmt(mean(worst_drift[n]), 2)}" for n in NORMS)
        + f"; BatchNorm's per-layer growth {fmt(mean(growth_per_layer['BatchNorm']))}x "
        f"(Yang et al.: {fmt(YANG_RELU_RATE)}x)"
        + f"; spread over init scales at depth {deep}: "
        + ", ".join(f"{n} {fmt(mean(scale_sensitivity[n]), 2)}" for n in NORMS)
        + f"; digits test error at depth {TRAIN_DEPTH}: "
        + ", ".join(
            f"{n} {100 * mean(runs[n]['test_error']):.1f}% (gap "
            f"{100 * mean(runs[n]['gap']):.1f} pp)"
            for n in NORMS
        )
    )
    return Findings(
        numbers,
        (
            f"Plain ReLU MLPs on standardized 8x8 digits (64 inputs), width {WIDTH}, blocks "
            f"Linear -> norm -> ReLU, norms {', '.join(NORMS)} (normlab modules, BatchNorm in "
            f"training mode). At initialization: depths {depths}, hidden weights "
            f"N(0, (scale*sqrt(2))^2/64) with scale {scales} (1 = He), one batch of "
            f"{GRADIENT_BATCH} training digits, cross-entropy, float64; recorded: the weight-"
            f"gradient norms of the first and last hidden layers. Training: depth "
            f"{TRAIN_DEPTH}, He init, SGD lr {LR} "
            f"(constant) momentum 0.9, batch {BATCH_SIZE}, "
            + (
                f"{epochs} epochs"
                if early_stop_after is None
                else f"at most {epochs} epochs, stopping at the first held-out evaluation "
                f"(every {eval_every} steps) after {early_stop_after} steps at which the "
                f"held-out curve meets the regime criterion (runs took "
                f"{min(min(r['steps']) for r in runs.values())}-"
                f"{max(max(r['steps']) for r in runs.values())} steps)"
            )
            + f" over {digits.TRAIN_SIZE} training digits, errors in eval mode on "
            f"{digits.TEST_SIZE} test digits (fixed split). lr {LR} is the largest of "
            f"0.02/0.05/0.1 at which the unnormalized net trained in an exploratory run. "
            f"Seeds {ctx.seeds} (init, batch order, gradient batch)."
        ),
    )


def _gradient_state(numbers: dict) -> tuple[str, dict]:
    drift = numbers["worst_drift_orders"]
    states = {}
    for norm in DECIDING_NORMS:
        mitigates = consistent_effect(
            [
                d_none - d - ORDERS_BETTER
                for d_none, d in zip(drift["none"], drift[norm], strict=True)
            ]
        )
        tame = max(drift[norm]) < ORDERS_TAME
        states[norm] = (
            "tames" if mitigates and tame else "reduces but still drifts" if mitigates else "fails"
        )
    values = set(states.values())
    half = "holds" if values == {"tames"} else "fails" if values == {"fails"} else "mixed"
    return half, states


def _generalization_state(numbers: dict) -> tuple[str, dict]:
    runs = numbers["training"]["runs"]
    states = {}
    for norm in DECIDING_NORMS:
        reduction = _error_reduction(runs, norm)
        if consistent_effect(reduction):
            states[norm] = "better"
        elif consistent_effect([-r for r in reduction]):
            states[norm] = "worse"
        else:
            states[norm] = "no clear difference"
    values = set(states.values())
    half = "holds" if values == {"better"} else "mixed" if "better" in values else "fails"
    return half, states


def verdict(numbers: dict) -> Verdict:
    drift = numbers["worst_drift_orders"]
    runs = numbers["training"]["runs"]
    depths = numbers["depths"]
    gradients, grad_states = _gradient_state(numbers)
    generalization, gen_states = _generalization_state(numbers)
    deciding = (
        f"worst-scale first-layer gradient drift, depth {depths[0]}->{depths[-1]}: "
        + " / ".join(f"{n} {fmt(mean(drift[n]), 2)}" for n in ("none", *DECIDING_NORMS))
        + " orders of magnitude; test error at depth "
        + f"{numbers['training']['depth']}: "
        + " / ".join(
            f"{n} {100 * mean(runs[n]['test_error']):.1f}%" for n in ("none", *DECIDING_NORMS)
        )
    )
    signed = numbers["drift_orders_by_scale"]

    def direction(norm):
        values = [v for per_seed in signed[norm].values() for v in per_seed]
        if all(v > 0 for v in values):
            return "grows with depth in every seed and scale"
        if all(v < 0 for v in values):
            return "shrinks with depth in every seed and scale"
        return "moves either way across seeds and scales"

    reason = (
        f"Gradients {gradients}: "
        + ", ".join(
            f"{n} {s} ({fmt(mean(drift[n]), 2)} orders; its first-layer gradient {direction(n)})"
            for n, s in grad_states.items()
        )
        + f" (no norm drifts {fmt(mean(drift['none']), 2)} orders at its worst init scale). "
        f"Drift reduction against no norm (orders): "
        + ", ".join(
            f"{n} " + power_text([a - b for a, b in zip(drift["none"], drift[n], strict=True)])
            for n in DECIDING_NORMS
        )
        + f". Generalization {generalization}: "
        + ", ".join(
            f"{n} {s} (test error {100 * mean(runs[n]['test_error']):.1f} ± "
            f"{100 * spread(runs[n]['test_error']):.1f}% vs none "
            f"{100 * mean(runs['none']['test_error']):.1f}%; none − {n}: "
            + power_text(_error_reduction(runs, n), scale=100, unit=" pp")
            + f"; train-test gap {100 * mean(runs[n]['gap']):.1f} vs "
            f"{100 * mean(runs['none']['gap']):.1f} pp)"
            for n, s in gen_states.items()
        )
        + "."
    )
    if mean(drift["none"]) < ORDERS_BETTER:
        label = "inconclusive"
        reason = (
            "Without normalization the gradients did not vanish or explode on this grid, so "
            "there was nothing to mitigate. " + reason
        )
    elif gradients == "holds" and generalization == "holds":
        label = "supported"
    elif gradients == "fails" and generalization == "fails":
        label = "contradicted"
    else:
        label = "partly supported"
    return Verdict(*apply_regime(numbers["regime"], label, reason, deciding))


def _error_reduction(runs: dict, norm: str) -> list[float]:
    """Per seed, the unnormalized net's test error minus ``norm``'s."""
    return [
        a - b for a, b in zip(runs["none"]["test_error"], runs[norm]["test_error"], strict=True)
    ]


def training_regime(runs: dict, seeds: list[int]) -> dict:
    """``numbers["regime"]``: the held-out loss curves of the runs the verdict compares (no
    norm and the deciding norms, every seed)."""
    return regime(
        {
            f"{norm} seed {seed}": plateau(curves["held_out_steps"], curves["held_out_loss"])
            for norm in ("none", *DECIDING_NORMS)
            for seed, curves in zip(seeds, runs[norm]["curves"], strict=True)
        }
    )


CLAIM = Claim(
    letter="b",
    key="gradients",
    title="Formula and purpose: vanishing/exploding gradients and generalization",
    article="(value - mean) / std mitigates vanishing and exploding gradients and improves "
    "generalization.",
    rule=(
        "Two halves, decided for the article's pair BatchNorm and LayerNorm (RMSNorm, which "
        "does not subtract the mean, is shown for context). Drift = orders of magnitude by "
        "which the first hidden layer's gradient norm changes from the shallowest to the "
        "deepest net, worst over the init scales. Gradients: a norm 'tames' them if its drift "
        f"is below the unnormalized net's by more than {ORDERS_BETTER:g} order in every seed "
        "(consistent_effect of the difference minus 1) and its own drift stays below "
        f"{ORDERS_TAME:g} order in every seed; 'reduces but still drifts' if only the first "
        "holds. The half holds if both norms tame, fails if neither reduces, else mixed. "
        "Generalization: a norm is better if its eval-mode test error is below the "
        "unnormalized net's at the training depth (consistent_effect over seeds); the half "
        "holds if both are better, is mixed if one is, fails otherwise. Supported if both "
        "halves hold, contradicted if both fail, partly supported otherwise; inconclusive if "
        "the unnormalized net's drift is under 1 order (nothing to mitigate). Regime first: "
        "if a training run of no norm, BatchNorm or LayerNorm has not converged "
        "(rules.REGIME_CRITERION on its held-out loss, evaluated "
        f"{EVALUATIONS} times per 80 epochs in full, per run in quick), inconclusive."
    ),
    literature=(
        "Ioffe & Szegedy 2015 introduced BatchNorm to speed up training and noted a "
        "regularizing effect; normalization makes a layer invariant to its weight scale, so "
        "the init scale no longer matters (Ba et al. 2016; Arora et al. 2019). But Yang et "
        "al., ICLR 2019 ('A Mean Field Theory of Batch Normalization') prove that BatchNorm "
        "alone makes gradients explode with depth at initialization in plain feed-forward "
        "nets, for any batch size and nonlinearity they consider: for ReLU the squared "
        "gradient norm grows by about pi/(pi-1) ~ 1.47 per layer (~1.21x in norm), which "
        "makes very deep BN nets without skip connections untrainable."
    ),
    run=run,
    verdict=verdict,
)
