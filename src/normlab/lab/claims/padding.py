"""(c) Sequence length: LayerNorm ignores padding; BatchNorm's statistics absorb it, unless
the norm is told which tokens are real (normlab's ``lengths=``). Measured on lines of
Python's standard library, as characters."""

from __future__ import annotations

import platform

import numpy as np
import torch

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
    TokenMLP,
    padded_train_losses,
    train_next_token,
)

BATCH = 16
TARGET_FRACTIONS = (0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
LR = 1e-2
EXACT = 1e-12  # "exactly 0" for float64 outputs computed in different batch layouts
MASKED_EXACT = 1e-9  # masked statistics equal the real-token ones up to float64 rounding
PADDING_NOISE = 0.05  # a relative statistic error at 50% padding that is not negligible
# The full profile's schedule, fixed before its data: 2000 steps at a constant lr 0.01 left
# 13/20 runs still improving (the previous full report), so the rate now warms up, decays to
# a tenth by step 1500 and stays there, and a run stops when its held-out curve meets the
# regime criterion (at most 5000 steps).
FULL_SCHEDULE = Schedule(
    lr=LR, max_steps=5000, eval_every=50, warmup=100, decay_end=1500, floor=0.1, early_stop=True
)


def _batch_length_for(lengths: list[int], target: float) -> int:
    """The batch length T (cutting longer sequences, padding shorter ones) whose padding
    fraction 1 - sum(min(l, T)) / (B T) is closest to ``target``."""
    longest = max(lengths)
    top = int(np.ceil(sum(lengths) / (len(lengths) * (1 - min(target, 0.95))))) + 1
    candidates = range(min(lengths), max(longest, top) + 1)
    fraction = lambda t: 1 - sum(min(n, t) for n in lengths) / (len(lengths) * t)  # noqa: E731
    return min(candidates, key=lambda t: abs(fraction(t) - target))


def _statistic_errors(features: torch.Tensor, lengths: torch.Tensor) -> dict[str, float]:
    """Relative errors of the statistics BatchNorm and PowerNorm use, unmasked and masked,
    against the statistics of the real tokens alone (float64, averaged over channels)."""
    mask = normlab.lengths_to_mask(lengths, features.shape[1])
    real = features[mask]
    ref_mean, ref_var = real.mean(0), real.var(0, unbiased=False)
    ref_phi = (real**2).mean(0)
    channels = features.shape[-1]
    errors = {}
    for masked in (False, True):
        kwargs = {"lengths": lengths} if masked else {}
        count = int(mask.sum()) if masked else mask.numel()
        # momentum=1: the running buffers become this batch's statistics (variance unbiased).
        bn = normlab.BatchNorm(channels, dim=-1, momentum=1.0, affine=False).double().train()
        # warmup: the first step's running quadratic mean is this batch's.
        pn = normlab.PowerNorm(channels, dim=-1, warmup_iters=1, affine=False).double().train()
        with torch.no_grad():
            bn(features, **kwargs)
            pn(features, **kwargs)
        batch_var = bn.running_var * (count - 1) / count
        name = "masked" if masked else "unmasked"
        errors[f"bn_mean_{name}"] = float(
            ((bn.running_mean - ref_mean).abs() / ref_var.sqrt()).mean()
        )
        errors[f"bn_var_{name}"] = float((batch_var / ref_var - 1).abs().mean())
        errors[f"pn_phi_{name}"] = float((pn.running_phi / ref_phi - 1).abs().mean())
    return errors


def _norm_outputs(kind: str, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    channels = features.shape[-1]
    with torch.no_grad():
        if kind == "layer":
            return normlab.LayerNorm(channels, elementwise_affine=False).double()(features)
        bn = normlab.BatchNorm(channels, dim=-1, affine=False).double().train()
        return bn(features, lengths=lengths) if kind == "batch-masked" else bn(features)


def _batch_mates(model: TokenMLP, corpus: text.Corpus, generator: torch.Generator) -> dict:
    """How much one sequence's normalized features change when its batch is padded to twice
    the length (same batch-mates), and when its batch-mates are other lines."""
    picks = torch.randperm(len(corpus.train), generator=generator)[: 2 * BATCH - 1].tolist()
    target = corpus.train[picks[0]]
    mates, other_mates = picks[1:BATCH], picks[BATCH:]
    base = text.pad_batch([target] + [corpus.train[i] for i in mates])
    longest = base[0].shape[1]
    batches = {
        "padding": text.pad_batch([target] + [corpus.train[i] for i in mates], 2 * longest),
        "content": text.pad_batch([target] + [corpus.train[i] for i in other_mates]),
    }
    n = len(target)
    out = {}
    for kind in ("layer", "batch", "batch-masked"):
        with torch.no_grad():
            reference = _norm_outputs(kind, model.features(base[0]), base[1])[0, :n]
        out[kind] = {}
        for change, (tokens, lengths) in batches.items():
            with torch.no_grad():
                y = _norm_outputs(kind, model.features(tokens), lengths)[0, :n]
            out[kind][change] = float((y - reference).abs().max())
    out["padding_fraction"] = {
        name: 1 - int(lengths.sum()) / tokens.numel()
        for name, (tokens, lengths) in {"base": base, **batches}.items()
    }
    return out


def _held_out(files: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    corpus = text.load_corpus(files=files)
    lines = corpus.held_out[:: max(1, len(corpus.held_out) // count)]
    return text.fixed_batches(lines[:count], 64)


def _train_token_model(
    seed: int,
    kind: str,
    files: int,
    held_out_count: int,
    schedule: Schedule,
    power_warmup: int,
) -> dict:
    """One training run (a job for ``RunContext.map``); the same initialization stream and
    batches for every norm within a seed."""
    corpus = text.load_corpus(files=files)
    generator = seed_everything(seed)
    model = TokenMLP(text.VOCAB_SIZE, kind, power_warmup=power_warmup)
    curves = train_next_token(
        model,
        lambda: text.sample_batch(corpus.train, BATCH, generator),
        _held_out(files, held_out_count),
        schedule,
    )
    return curves.as_dict(max_steps=schedule.max_steps)


def run(ctx: RunContext) -> Findings:
    pick = ctx.profile.pick
    files = pick(smoke=10, quick=40, full=80)
    schedule = pick(
        smoke=Schedule(lr=LR, max_steps=20, eval_every=2),
        quick=Schedule(lr=LR, max_steps=300, eval_every=15),
        full=FULL_SCHEDULE,
    )
    steps = schedule.max_steps
    held_out_count = pick(smoke=64, quick=256, full=512)
    corpus = text.load_corpus(files=files)
    power_warmup = pick(smoke=4, quick=60, full=400)
    numbers = {
        "python": platform.python_version(),
        "data": corpus.describe(),
        "batch_size": BATCH,
        "target_fractions": list(TARGET_FRACTIONS),
        "statistics": {},
        "batch_mates": {},
        "training": {
            "steps": steps,
            "schedule": schedule.as_dict(),
            "lr": LR,
            "power_warmup": power_warmup,
            "seeds": {},
        },
    }
    for seed in ctx.track(ctx.seeds, "statistics, seed"):
        generator = ctx.seed_everything(seed)
        model = TokenMLP(text.VOCAB_SIZE, "layer").double()
        picks = torch.randperm(len(corpus.train), generator=generator)[:BATCH].tolist()
        sequences = [corpus.train[i] for i in picks]
        natural = [len(s) for s in sequences]
        rows = []
        for target in TARGET_FRACTIONS:
            tokens, lengths = text.pad_batch(sequences, _batch_length_for(natural, target))
            with torch.no_grad():
                features = model.features(tokens)
            row = {"padding_fraction": 1 - int(lengths.sum()) / tokens.numel()}
            rows.append(row | _statistic_errors(features, lengths))
        numbers["statistics"][str(seed)] = {key: [row[key] for row in rows] for key in rows[0]}
        numbers["batch_mates"][str(seed)] = _batch_mates(model, corpus, generator)

    jobs = [
        (seed, kind, files, held_out_count, schedule, power_warmup)
        for seed in ctx.seeds
        for kind in NORM_KINDS
    ]
    trained = ctx.map(_train_token_model, jobs, f"token models, up to {steps} steps")
    for seed in ctx.seeds:
        numbers["training"]["seeds"][str(seed)] = {
            job[1]: curves for job, curves in zip(jobs, trained, strict=True) if job[0] == seed
        }
    numbers["training"]["final_loss"] = {
        kind: [s[kind]["eval_loss"][-1] for s in numbers["training"]["seeds"].values()]
        for kind in NORM_KINDS
    }
    numbers["training"]["final_accuracy"] = {
        kind: [s[kind]["eval_accuracy"][-1] for s in numbers["training"]["seeds"].values()]
        for kind in NORM_KINDS
    }
    numbers["regime"] = regime(
        {
            f"{NORM_LABELS[kind]} seed {seed}": plateau(
                run[kind]["eval_steps"], run[kind]["eval_loss"], schedule.constant_from
            )
            for seed, run in numbers["training"]["seeds"].items()
            for kind in NORM_KINDS
        }
    )
    numbers["summary"] = _summary(numbers)
    _statistics_figure(ctx, numbers)
    _training_figure(ctx, numbers)
    return Findings(
        numbers,
        (
            f"Data: {corpus.describe()} (Python {platform.python_version()}). "
            f"Statistics: per seed, {BATCH} random training lines cut or padded to a common "
            f"length so that the padding fraction sweeps {list(TARGET_FRACTIONS)}; the "
            f"features are what the norm sees in the token model below at initialization "
            f"(float64; padding positions hold the mixing layer's output for padding ids); "
            f"BatchNorm's mean and variance and PowerNorm's quadratic mean, unmasked and "
            f"masked (lengths=), are compared with those of the real tokens alone. "
            f"Batch-mates: one line's normalized features (LayerNorm, BatchNorm, masked "
            f"BatchNorm, training mode, no affine) in a batch of {BATCH}, re-computed with the "
            f"batch padded to twice its length and with {BATCH - 1} other batch-mates. "
            f"Training: next-character model (embeddings 16 of the last 4 characters -> "
            f"Linear 64 -> norm -> GELU -> Linear 64 -> GELU -> Linear {text.VOCAB_SIZE}), "
            f"Adam, {schedule.describe()}; gradient clipping 1, batches of {BATCH} random "
            f"lines padded to the longest, loss on real tokens only; held-out loss in eval mode on "
            f"{sum(len(t) for t, _ in _held_out(files, held_out_count))} lines from held-out "
            f"files (the regime check's curve); PowerNorm "
            f"warmup {power_warmup} steps; {ctx.profile.seeds} seeds ({ctx.seeds}), the same "
            f"initialization stream and batches for every norm within a seed."
        ),
    )


def _at_half(statistics: dict, key: str) -> list[float]:
    """Per seed, ``key`` at the padding fraction closest to 0.5."""
    values = []
    for seed in statistics.values():
        index = int(np.argmin([abs(f - 0.5) for f in seed["padding_fraction"]]))
        values.append(seed[key][index])
    return values


def _summary(numbers: dict) -> str:
    stats, mates = numbers["statistics"], numbers["batch_mates"]
    final = numbers["training"]["final_loss"]
    losses = ", ".join(
        f"{NORM_LABELS[k]} {fmt(mean([v for v in final[k] if v is not None] or [float('nan')]))}"
        for k in NORM_KINDS
    )
    return (
        f"at ~50% padding unmasked BatchNorm's variance is off by "
        f"{fmt(mean(_at_half(stats, 'bn_var_unmasked')))} (relative), its mean by "
        f"{fmt(mean(_at_half(stats, 'bn_mean_unmasked')))} std, masked by at most "
        f"{fmt(max(max(s['bn_var_masked'] + s['bn_mean_masked']) for s in stats.values()))}; "
        f"doubling the batch's padding changes a fixed line's output by "
        f"{fmt(max(m['layer']['padding'] for m in mates.values()))} (LayerNorm), "
        f"{fmt(mean([m['batch']['padding'] for m in mates.values()]))} (BatchNorm), "
        f"{fmt(max(m['batch-masked']['padding'] for m in mates.values()))} (masked BatchNorm; "
        f"{fmt(mean([m['batch-masked']['content'] for m in mates.values()]))} with other "
        f"batch-mates); held-out loss after training: {losses}."
    )


def _statistics_figure(ctx: RunContext, numbers: dict) -> None:
    import matplotlib.pyplot as plt

    floor = 1e-17  # exact zeros drawn at the bottom of the log scale
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    series = [
        ("bn_mean", "BatchNorm mean (in std)", "o"),
        ("bn_var", "BatchNorm variance", "s"),
        ("pn_phi", "PowerNorm quadratic mean", "^"),
    ]
    for key, label, marker in series:
        for masked, style in (("unmasked", "-"), ("masked", ":")):
            for i, seed in enumerate(numbers["statistics"].values()):
                left.plot(
                    seed["padding_fraction"],
                    np.maximum(seed[f"{key}_{masked}"], floor),
                    style,
                    marker=marker,
                    color="#d62728" if masked == "unmasked" else "#2ca02c",
                    alpha=0.75,
                    label=f"{label}, {masked}" if i == 0 else None,
                    markersize=4,
                )
    left.set_yscale("log")
    left.set_xlabel("padding fraction of the batch")
    left.set_ylabel("relative error vs real-token statistic")
    left.set_title("Statistic error vs padding (one line per seed)", fontsize=10)
    left.legend(fontsize=7)

    kinds = ("layer", "batch", "batch-masked")
    changes = (("padding", "batch padded to 2x"), ("content", "other batch-mates"))
    width = 0.38
    for j, (change, label) in enumerate(changes):
        values = [[m[k][change] for m in numbers["batch_mates"].values()] for k in kinds]
        positions = np.arange(len(kinds)) + (j - 0.5) * width
        right.bar(
            positions,
            [max(np.mean(v), floor) for v in values],
            width,
            label=label,
            color=("#ff7f0e", "#8c564b")[j],
        )
        for p, v in zip(positions, values, strict=True):
            right.plot([p] * len(v), np.maximum(v, floor), "k.", markersize=4)
    right.set_yscale("log")
    right.set_xticks(np.arange(len(kinds)), [NORM_LABELS[k] for k in kinds], fontsize=8)
    right.set_ylabel("max |change| of one line's output")
    right.set_title(
        f"One line's output when its batch changes (bars: mean, dots: seeds; "
        f"{floor:g} = exactly 0)",
        fontsize=9,
    )
    right.legend(fontsize=8)
    ctx.figure("statistics", fig)


def _training_figure(ctx: RunContext, numbers: dict) -> None:
    import matplotlib.pyplot as plt

    training = numbers["training"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for kind in NORM_KINDS:
        runs = [s[kind] for s in training["seeds"].values()]
        rows, every = padded_train_losses(runs)  # block means of ``every`` steps
        losses = np.array(rows)
        window = max(1, losses.shape[1] // 20)
        kernel = np.ones(window) / window
        smooth = np.array([np.convolve(row, kernel, mode="valid") for row in losses])
        steps = np.arange(window, losses.shape[1] + 1) * every
        centre = np.nanmean(smooth, 0)
        left.plot(steps, centre, color=NORM_COLOURS[kind], label=NORM_LABELS[kind])
        left.fill_between(
            steps, np.nanmin(smooth, 0), np.nanmax(smooth, 0), color=NORM_COLOURS[kind], alpha=0.15
        )
        for r in runs:
            right.plot(
                r["eval_steps"],
                [np.nan if v is None else v for v in r["eval_loss"]],
                "o-",
                color=NORM_COLOURS[kind],
                alpha=0.6,
                markersize=3,
                label=NORM_LABELS[kind] if r is runs[0] else None,
            )
    left.set_xlabel("step")
    left.set_ylabel("training loss (moving average, 1/20 of the run; band: seeds' range)")
    left.set_title("Next-character model: training loss", fontsize=10)
    left.legend(fontsize=8)
    right.set_xlabel("step")
    right.set_ylabel("held-out loss (eval mode)")
    right.set_title("Held-out loss, one line per seed", fontsize=10)
    right.legend(fontsize=8)
    ctx.figure("training", fig)


def verdict(numbers: dict) -> Verdict:
    decided = _decide(numbers)
    return Verdict(
        *apply_regime(numbers["regime"], decided.label, decided.reason, decided.deciding)
    )


def _decide(numbers: dict) -> Verdict:
    """The rule on the statistics, before the regime check of the training runs."""
    stats, mates = numbers["statistics"], numbers["batch_mates"]
    ln_change = max(max(m["layer"]["padding"], m["layer"]["content"]) for m in mates.values())
    bn_var_half = _at_half(stats, "bn_var_unmasked")
    bn_padding_change = [m["batch"]["padding"] for m in mates.values()]
    masked_error = max(
        max(s["bn_mean_masked"] + s["bn_var_masked"] + s["pn_phi_masked"]) for s in stats.values()
    )
    masked_padding_change = max(m["batch-masked"]["padding"] for m in mates.values())
    masked_content_change = mean([m["batch-masked"]["content"] for m in mates.values()])
    fraction = mean(_at_half(stats, "padding_fraction"))
    deciding = (
        f"unmasked BatchNorm variance error at {fraction:.0%} padding "
        f"{fmt(mean(bn_var_half))} ± {fmt(spread(bn_var_half))}; masked {fmt(masked_error)}"
    )

    final = numbers["training"]["final_loss"]
    training = ""
    if all(v is not None for k in NORM_KINDS for v in final[k]):
        unmasked_minus_masked = [
            u - m for u, m in zip(final["batch"], final["batch-masked"], strict=True)
        ]
        masked_minus_layer = [
            m - ln for m, ln in zip(final["batch-masked"], final["layer"], strict=True)
        ]
        training = (
            f" In training, held-out loss unmasked − masked BatchNorm was "
            f"{power_text(unmasked_minus_masked, unit=' nats')} "
            f"({'a consistent' if consistent_effect(unmasked_minus_masked) else 'no consistent'}"
            f" cost of padding noise), masked BatchNorm − LayerNorm "
            f"{power_text(masked_minus_layer, unit=' nats')}."
        )
    else:
        training = " Some training run diverged (non-finite held-out loss)."

    ln_invariant = ln_change <= EXACT
    bn_absorbs = (
        consistent_effect(bn_var_half)
        and mean(bn_var_half) > PADDING_NOISE
        and all(c > MASKED_EXACT for c in bn_padding_change)
    )
    masked_fixes = masked_error <= MASKED_EXACT and masked_padding_change <= MASKED_EXACT
    if not ln_invariant:
        return Verdict(
            "contradicted",
            f"LayerNorm's output for a fixed line changed by {fmt(ln_change)} when its "
            f"batch-mates changed.{training}",
            deciding,
        )
    if not bn_absorbs:
        return Verdict(
            "contradicted",
            f"Unmasked BatchNorm's statistics did not absorb padding measurably (variance "
            f"error {fmt(mean(bn_var_half))} at ~50% padding).{training}",
            deciding,
        )
    if masked_fixes:
        return Verdict(
            "partly supported",
            f"LayerNorm is untouched by padding (change {fmt(ln_change)}) and plain BatchNorm's "
            f"statistics absorb it (variance off by {fmt(mean(bn_var_half))} at "
            f"{fraction:.0%} padding; a fixed line's output moves by "
            f"{fmt(mean(bn_padding_change))} when its batch is padded further). But this is "
            f"a property of unmasked BatchNorm, not of batch statistics: with lengths= the "
            f"statistics equal the real tokens' to {fmt(masked_error)} and padding changes "
            f"nothing ({fmt(masked_padding_change)}); what remains is the dependence on the "
            f"batch-mates' real tokens ({fmt(masked_content_change)}), which is claim (d)'s "
            f"subject, not padding.{training}",
            deciding,
        )
    return Verdict(
        "supported",
        f"LayerNorm is untouched by padding (change {fmt(ln_change)}); BatchNorm's statistics "
        f"absorb it (variance off by {fmt(mean(bn_var_half))}), and masking did not remove "
        f"the effect (masked error {fmt(masked_error)}, padding change "
        f"{fmt(masked_padding_change)}).{training}",
        deciding,
    )


CLAIM = Claim(
    letter="c",
    key="padding",
    title="Sequence length: padding in the statistics",
    article="LayerNorm normalizes each sample over its features, so it is unaffected by "
    "sequence length; BatchNorm normalizes each feature over the batch, and with "
    "variable-length sequences the padding enters its mean and variance as noise.",
    rule=f"Contradicted if LayerNorm's output for a fixed line changes by more than {EXACT} "
    f"when its batch-mates' padding or content change, or if unmasked BatchNorm's relative "
    f"variance error at ~50% padding is not a consistent effect over seeds (rules."
    f"consistent_effect) with mean > {PADDING_NOISE}, or if doubling the batch's padding does "
    f"not change a fixed line's BatchNorm output by more than {MASKED_EXACT} in every seed. "
    f"Otherwise: partly supported if masked BatchNorm/PowerNorm statistics equal the "
    f"real-token statistics within {MASKED_EXACT} at every padding fraction and seed and "
    f"padding changes its output by at most {MASKED_EXACT} (the problem is unmasked "
    f"statistics, which a mask removes), supported if not. Training losses are reported "
    f"beside the verdict but do not decide it. Regime first: the claim is about training "
    f"with padded batches, so if any training run has not converged (rules.REGIME_CRITERION "
    f"on its held-out loss) the verdict is inconclusive.",
    literature="Shen et al. 2020 (PowerNorm, arXiv:2003.07845) find BatchNorm's batch "
    "statistics in NLP Transformers fluctuate strongly and mask padding in their PowerNorm "
    "code; Ba, Kiros & Hinton 2016 motivate LayerNorm by its independence of the batch; "
    "Ioffe & Szegedy 2015 define BatchNorm's statistics over all elements of a batch.",
    run=run,
    verdict=verdict,
)
