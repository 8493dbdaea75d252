"""(d) Training stability: is LayerNorm insensitive to batch size while BatchNorm's small
batches give inaccurate statistics and worse training? Digits with an MLP and a small CNN
over batch sizes 2..128, seven norms, the same samples seen at every batch size."""

from __future__ import annotations

import torch
from torch import nn

import normlab
from normlab.lab import digits
from normlab.lab.rules import (
    REGIME_CRITERION,
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

NORMS = ("BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm", "none", "BatchRenorm", "GhostBN")
BATCH_DEPENDENT = ("BatchNorm", "BatchRenorm", "GhostBN")  # train and eval modes differ
# The full profile's norms: the verdict's pair, Wu & He's GroupNorm, and BatchRenorm.
FULL_NORMS = ("BatchNorm", "LayerNorm", "GroupNorm", "BatchRenorm")
ARCHS = ("mlp", "cnn")
REFERENCE_BATCH = 32  # Wu & He's largest per-GPU batch; errors are compared against it
BASE_LR = 0.1  # SGD lr at the reference batch; lr = BASE_LR * batch / 32 (linear scaling)
MOMENTUM = 0.9
VIRTUAL_BATCH = 4  # GhostBN's statistics batch, run where the batch is larger
LN_TOLERANCE = 0.01  # LN "insensitive": its error does not rise by > 1 pp in every seed
EVALUATIONS = 20  # held-out loss evaluations per run (the regime check's curve)
# The full profile's training, fixed before its data: 15 epochs left 5 of 40 deciding runs
# still improving (the previous full report), so runs may now go on to FULL_MAX_EPOCHS and
# stop at the first held-out evaluation after FULL_MIN_EPOCHS (and SETTLED_STEPS) at which
# the curve meets the regime criterion; evaluations every 1/20 of FULL_EPOCHS' steps.
FULL_EPOCHS = 15
FULL_MAX_EPOCHS = 30
FULL_MIN_EPOCHS = 5
# Running statistics (momentum 0.1) average over ~10 batches; a run must also have taken this
# many steps, so that they settled over many batches of the trained weights.
SETTLED_STEPS = 100
CRITERION = (
    f"{REGIME_CRITERION}; here also at least {SETTLED_STEPS} steps, so that the running "
    "statistics that eval mode uses have averaged many batches"
)

# Wu & He 2018 (Group Normalization), Table 2: ResNet-50 ImageNet val error (%) by images
# per GPU.
WU_HE = {
    "batch_per_gpu": [32, 16, 8, 4, 2],
    "BatchNorm": [23.6, 23.7, 24.8, 27.3, 34.7],
    "GroupNorm": [24.1, 24.2, 24.0, 24.2, 24.1],
}


def _sample_range(archs: dict) -> str:
    """The fewest and most samples a run saw, e.g. '6400-38400'."""
    seen = [
        steps * int(batch)
        for norms in archs.values()
        for cells in norms.values()
        for batch, cell in cells.items()
        for steps in cell["steps"]
    ]
    return f"{min(seen)}-{max(seen)}"


def _applies(norm: str, batch: int) -> bool:
    return norm != "GhostBN" or batch > VIRTUAL_BATCH


def _train_one(
    arch: str,
    norm: str,
    batch: int,
    samples: int,
    gap_samples: int,
    seed: int,
    max_samples: int | None = None,
    min_samples: int | None = None,
) -> dict:
    """One training run (a job for ``RunContext.map``): ``samples`` sets the evaluation
    interval (1/EVALUATIONS of its steps) and BatchRenorm's warmup; with ``min_samples`` the
    run may go on to ``max_samples`` and stops early by the regime criterion."""
    data = digits.load_digits()
    generator = seed_everything(seed)
    steps = samples // batch
    max_steps = (max_samples or samples) // batch
    factory = digits.norm_factory(norm, virtual_batch_size=VIRTUAL_BATCH, renorm_warmup=steps // 10)
    model = digits.mlp(factory) if arch == "mlp" else digits.cnn(factory)
    shape = (lambda x: x) if arch == "mlp" else digits.Digits.images
    x_train, x_test = shape(data.x_train), shape(data.x_test)
    outcome = digits.train(
        model,
        x_train,
        data.y_train,
        x_test,
        data.y_test,
        batch_size=batch,
        lr=BASE_LR * batch / REFERENCE_BATCH,
        momentum=MOMENTUM,
        epochs=-(-max_steps * batch // digits.TRAIN_SIZE),
        max_steps=max_steps,
        generator=generator,
        eval_every=max(1, steps // EVALUATIONS),
        early_stop_after=(
            None if min_samples is None else max(SETTLED_STEPS, min_samples // batch)
        ),
    )
    result = {
        "steps": outcome.steps,
        "test_error": outcome.test_error,
        "train_error": outcome.train_error,
        "final_loss": outcome.final_loss,
        "diverged": outcome.diverged,
        "held_out_steps": outcome.held_out_steps,
        "held_out_loss": outcome.held_out_loss,
    }
    if norm in BATCH_DEPENDENT:
        # The same test data through the same weights, normalized with the statistics of
        # each test batch (of the training batch size) instead of the running ones.
        x, y = x_test[:gap_samples], data.y_test[:gap_samples]
        eval_mode = digits.error_rate(model, x, y)
        train_mode = digits.error_rate(model, x, y, train_mode=True, batch_size=batch)
        result["train_eval_gap"] = train_mode - eval_mode
    else:
        result["train_eval_gap"] = 0.0  # no batch statistics: both modes are one function
    return result


def _bn_output_spread(ctx: RunContext, batch_sizes, samples: int, draws: int) -> dict:
    """How much one fixed sample's normalized output moves when only its batch-mates change:
    the standard deviation over ``draws`` random sets of mates, averaged over 64 features
    and ``samples`` fixed test samples. Features: a seeded random Linear(64, 64) of the
    digits (a first hidden layer at initialization)."""
    data = digits.load_digits()
    result = {norm: {} for norm in ("BatchNorm", "BatchRenorm", "LayerNorm")}
    for seed in ctx.seeds:
        generator = ctx.seed_everything(seed)
        with torch.no_grad():
            layer = nn.Linear(64, 64)
            pool = layer(data.x_train)
            fixed = layer(data.x_test[:samples])
            # BatchRenorm with running statistics of the whole pool, and momentum 0 so that
            # they stay put: in training it corrects each batch towards them (r, d clipped).
            renorm = normlab.BatchRenorm1d(64, momentum=0.0, affine=False).train()
            renorm.running_mean.copy_(pool.mean(0))
            renorm.running_var.copy_(pool.var(0))
            for batch in batch_sizes:
                mates = pool[
                    torch.randint(len(pool), (samples, draws, batch - 1), generator=generator)
                ]
                batches = torch.cat(
                    [fixed[:, None, None, :].expand(samples, draws, 1, 64), mates], dim=2
                )
                flat = batches.reshape(-1, 64)
                # Ghost batches of size `batch`: one call normalizes every drawn batch alone.
                bn = normlab.BatchNorm1d(64, affine=False, virtual_batch_size=batch).train()
                outputs = {
                    "BatchNorm": bn(flat).reshape(samples, draws, batch, 64)[:, :, 0],
                    "LayerNorm": normlab.LayerNorm(64, elementwise_affine=False)(flat).reshape(
                        samples, draws, batch, 64
                    )[:, :, 0],
                    "BatchRenorm": torch.stack(
                        [
                            torch.stack([renorm(batches[s, d])[0] for d in range(draws)])
                            for s in range(samples)
                        ]
                    ),
                }
                for norm, out in outputs.items():
                    value = float(out.std(dim=1).mean())
                    result[norm].setdefault(str(batch), []).append(value)
    return result


def _error_figure(ctx: RunContext, archs: dict, batch_sizes) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    colours = dict(zip(NORMS, plt.cm.tab10.colors, strict=False))
    norms = [n for n in NORMS if archs["mlp"][n]]  # the norms this profile ran
    for ax, arch in zip(axes[:2], ARCHS, strict=True):
        for i, norm in enumerate(norms):
            sizes = [b for b in batch_sizes if _applies(norm, b)]
            values = [archs[arch][norm][str(b)]["test_error"] for b in sizes]
            jitter = 1 + 0.025 * (i - len(NORMS) / 2)  # keep error bars apart
            ax.errorbar(
                [b * jitter for b in sizes],
                [100 * mean(v) for v in values],
                yerr=[100 * spread(v) for v in values],
                fmt="o-",
                ms=3,
                capsize=2,
                color=colours[norm],
                label=norm if norm != "GhostBN" else f"GhostBN (v={VIRTUAL_BATCH})",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.set_xlabel("batch size (lr scaled linearly, same samples seen)")
        ax.set_ylabel("test error % (eval mode), mean ± seed std")
        ax.set_title(f"Digits, {arch.upper()}")
    axes[0].legend(fontsize=7)
    ax = axes[2]
    for norm, colour in (("BatchNorm", colours["BatchNorm"]), ("GroupNorm", colours["GroupNorm"])):
        ax.plot(WU_HE["batch_per_gpu"], WU_HE[norm], "s-", color=colour, label=norm)
    ax.set_xscale("log", base=2)
    ax.set_xticks(WU_HE["batch_per_gpu"], [str(b) for b in WU_HE["batch_per_gpu"]])
    ax.set_xlabel("images per GPU")
    ax.set_ylabel("ImageNet val error %")
    ax.set_title("Wu & He 2018, Table 2 (ResNet-50)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    ctx.figure("test-error", fig)


def _spread_figure(ctx: RunContext, spreads: dict, archs: dict, batch_sizes) -> None:
    import matplotlib.pyplot as plt

    fig, (spread_ax, gap_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    sizes = sorted(int(b) for b in spreads["BatchNorm"])
    for norm, style in (("BatchNorm", "o-"), ("BatchRenorm", "s-")):
        values = [spreads[norm][str(b)] for b in sizes]
        line = spread_ax.plot(
            sizes, [mean(v) for v in values], style, label=f"{norm} (training mode), mean"
        )[0]
        for b, v in zip(sizes, values, strict=True):  # each seed, as a dot
            spread_ax.plot([b] * len(v), v, ".", color=line.get_color(), alpha=0.5)
    reference = mean(spreads["BatchNorm"][str(sizes[-1])]) * (sizes[-1] ** 0.5)
    spread_ax.plot(sizes, [reference / b**0.5 for b in sizes], "k:", label="∝ 1/sqrt(batch)")
    layer = max(max(v) for v in spreads["LayerNorm"].values())
    spread_ax.set_title(
        f"One sample's output over random batch-mates (LayerNorm: {fmt(layer)})", fontsize=10
    )
    spread_ax.set_xscale("log", base=2)
    spread_ax.set_yscale("log")
    spread_ax.set_xticks(sizes, [str(b) for b in sizes])
    spread_ax.set_xlabel("batch size")
    spread_ax.set_ylabel("std of the output over batch-mates")
    spread_ax.legend(fontsize=8)
    for arch, style in (("mlp", "-"), ("cnn", "--")):
        for norm in [n for n in BATCH_DEPENDENT if archs[arch][n]]:
            bs = [b for b in batch_sizes if _applies(norm, b)]
            values = [archs[arch][norm][str(b)]["train_eval_gap"] for b in bs]
            gap_ax.plot(
                bs, [100 * mean(v) for v in values], "o" + style, ms=3, label=f"{norm} {arch}"
            )
    gap_ax.axhline(0, color="grey", lw=0.8)
    gap_ax.set_xscale("log", base=2)
    gap_ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    gap_ax.set_xlabel("batch size")
    gap_ax.set_ylabel("test error: train mode - eval mode (pp)")
    gap_ax.set_title("Batch statistics vs running statistics on the same test data")
    gap_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    ctx.figure("bn-spread", fig)


def run(ctx: RunContext) -> Findings:
    # full trains FULL_EPOCHS times longer than quick; to keep it within the hour on 2 cores
    # it leaves out batch sizes 4 and 16 (batch 2 alone is half the cost) and the norms
    # outside FULL_NORMS.
    batch_sizes = ctx.profile.pick(
        smoke=[2, 32], quick=[2, 4, 8, 16, 32, 128], full=[2, 8, 32, 128]
    )
    norms = ctx.profile.pick(smoke=NORMS, quick=NORMS, full=FULL_NORMS)
    # Samples seen, the same at every batch size: one epoch in quick, a fraction in smoke,
    # FULL_EPOCHS epochs in full.
    samples = ctx.profile.pick(
        smoke=128, quick=digits.TRAIN_SIZE, full=FULL_EPOCHS * digits.TRAIN_SIZE
    )
    gap_samples = ctx.profile.pick(smoke=64, quick=256, full=digits.TEST_SIZE)
    archs: dict = {arch: {norm: {} for norm in NORMS} for arch in ARCHS}
    cells = [
        (arch, norm, batch)
        for arch in ARCHS
        for norm in norms
        for batch in batch_sizes
        if _applies(norm, batch)
    ]
    max_samples = ctx.profile.pick(smoke=None, quick=None, full=FULL_MAX_EPOCHS * digits.TRAIN_SIZE)
    min_samples = ctx.profile.pick(smoke=None, quick=None, full=FULL_MIN_EPOCHS * digits.TRAIN_SIZE)
    jobs = [
        (*cell, samples, gap_samples, seed, max_samples, min_samples)
        for cell in cells
        for seed in ctx.seeds
    ]
    outcomes = ctx.map(
        _train_one,
        jobs,
        f"digits runs, {samples} samples each"
        if max_samples is None
        else f"digits runs, up to {max_samples} samples each",
    )
    for cell in cells:
        per_seed = [o for job, o in zip(jobs, outcomes, strict=True) if job[:3] == cell]
        arch, norm, batch = cell
        archs[arch][norm][str(batch)] = {key: [r[key] for r in per_seed] for key in per_seed[0]}
    ctx.progress("BN output spread")
    fixed_digits = ctx.profile.pick(smoke=2, quick=4, full=8)
    spreads = _bn_output_spread(ctx, batch_sizes, samples=fixed_digits, draws=32)
    small = min(batch_sizes)
    sensitivity = {
        arch: {
            norm: [
                hi - lo
                for hi, lo in zip(
                    archs[arch][norm][str(small)]["test_error"],
                    archs[arch][norm][str(REFERENCE_BATCH)]["test_error"],
                    strict=True,
                )
            ]
            for norm in norms
            if _applies(norm, small)
        }
        for arch in ARCHS
    }
    _error_figure(ctx, archs, batch_sizes)
    _spread_figure(ctx, spreads, archs, batch_sizes)
    numbers = {
        "regime": training_regime(archs, small, ctx.seeds),
        "batch_sizes": batch_sizes,
        "small_batch": small,
        "reference_batch": REFERENCE_BATCH,
        "base_lr": BASE_LR,
        "samples_seen": samples,
        "max_samples": max_samples,
        "min_samples_before_stopping": min_samples,
        "virtual_batch_size": VIRTUAL_BATCH,
        "seeds": ctx.seeds,
        "archs": archs,
        "error_change_small_minus_reference": sensitivity,
        "bn_output_spread": spreads,
        "wu_he_2018": WU_HE,
    }

    def change(arch, norm):
        return f"{100 * mean(sensitivity[arch][norm]):+.1f}"

    def gap(arch, norm, batch):
        return f"{100 * mean(archs[arch][norm][str(batch)]['train_eval_gap']):+.1f}"

    numbers["summary"] = (
        f"test-error change from batch {REFERENCE_BATCH} to {small} (pp, mean over seeds): "
        + "; ".join(
            f"{arch.upper()} " + ", ".join(f"{n} {change(arch, n)}" for n in sensitivity[arch])
            for arch in ARCHS
        )
        + f". BN output spread over batch-mates at batch {small}/{REFERENCE_BATCH}: "
        f"{fmt(mean(spreads['BatchNorm'][str(small)]))}/"
        f"{fmt(mean(spreads['BatchNorm'][str(REFERENCE_BATCH)]))}. Train-mode minus "
        f"eval-mode test error at batch {small} (pp): "
        + ", ".join(
            f"{norm} {arch.upper()} {gap(arch, norm, small)}"
            for norm in ("BatchNorm", "BatchRenorm")
            for arch in ARCHS
        )
        + (
            f"; GhostBN (v={VIRTUAL_BATCH}) at batch {max(batch_sizes)}: "
            + ", ".join(
                f"{arch.upper()} {gap(arch, 'GhostBN', max(batch_sizes))}" for arch in ARCHS
            )
            if "GhostBN" in norms and _applies("GhostBN", max(batch_sizes))
            else ""
        )
        + ". Wu & He: BN +11.1, GN 0.0."
    )
    return Findings(
        numbers,
        (
            f"Digits (fixed split, {digits.TRAIN_SIZE} train / {digits.TEST_SIZE} test, "
            f"standardized). MLP: 64 -> [Linear 64 -> norm -> ReLU] x2 -> 10. CNN on 8x8 "
            f"images: conv3x3 8 -> norm -> ReLU -> conv3x3/2 16 -> norm -> ReLU -> Linear. "
            f"Norms (normlab): {', '.join(norms)}; for the CNN LayerNorm and RMSNorm cover "
            f"(C, H, W) of one sample, GroupNorm uses 4 groups, GhostBN is BatchNorm with "
            f"virtual_batch_size={VIRTUAL_BATCH} (only for batches > {VIRTUAL_BATCH}), "
            f"BatchRenorm r_max=3, d_max=5 after 10% of the steps as plain BN. Batch sizes "
            f"{batch_sizes}, SGD momentum {MOMENTUM}, lr = {BASE_LR} x batch/{REFERENCE_BATCH} "
            f"(constant), "
            + (
                f"{samples} samples seen at every batch size ({digits.TRAIN_SIZE} = one epoch). "
                if max_samples is None
                else f"at most {max_samples} samples ({digits.TRAIN_SIZE} = one epoch), "
                f"stopping at the first held-out evaluation after {min_samples} samples (and "
                f"{SETTLED_STEPS} steps) at which the held-out curve meets the regime "
                f"criterion (runs took {_sample_range(archs)} samples). "
            )
            + f"Held-out (test) loss in eval mode every {samples // EVALUATIONS} samples for "
            f"the regime check. Test error in eval mode (running statistics); the first "
            f"{gap_samples} test digits in train mode (statistics of test batches of the "
            f"training batch size) minus in eval mode give the "
            f"train/eval gap. Seeds {ctx.seeds}. Spread: each of {fixed_digits} fixed test "
            f"digits' output through "
            f"a random Linear(64, 64) and a training-mode BatchNorm1d (or BatchRenorm1d with "
            f"running statistics of the whole training set), std over 32 random sets of "
            f"batch-mates, mean over features and fixed digits, per seed. Note: BatchNorm2d "
            f"averages over batch x H x W, so in the CNN a batch of 2 still gives 128 and 32 "
            f"values per channel; in the MLP only the batch is averaged."
        ),
    )


def training_regime(archs: dict, small: int, seeds: list[int]) -> dict:
    """``numbers["regime"]``: BatchNorm and LayerNorm at the small and the reference batch,
    both models, every seed (the runs the verdict compares)."""
    runs = {}
    for arch in ARCHS:
        for norm in ("BatchNorm", "LayerNorm"):
            for batch in (small, REFERENCE_BATCH):
                cell = archs[arch][norm][str(batch)]
                for i, seed in enumerate(seeds):
                    record = plateau(cell["held_out_steps"][i], cell["held_out_loss"][i])
                    record["converged"] = record["converged"] and (
                        cell["held_out_steps"][i][-1] >= SETTLED_STEPS
                    )
                    runs[f"{arch.upper()} {norm} batch {batch} seed {seed}"] = record
    return regime(runs, CRITERION)


def _arch_state(numbers: dict, arch: str) -> dict:
    change = numbers["error_change_small_minus_reference"][arch]
    excess = [b - n for b, n in zip(change["BatchNorm"], change["LayerNorm"], strict=True)]
    return {
        "excess": excess,
        "bn_worse_than_ln": consistent_effect(excess),
        "ln_insensitive": not consistent_effect([d - LN_TOLERANCE for d in change["LayerNorm"]]),
    }


def _describe(arch: str, state: dict, change: dict) -> str:
    bn, ln = 100 * mean(change["BatchNorm"]), 100 * mean(change["LayerNorm"])
    if state["bn_worse_than_ln"]:
        bn_part = "BatchNorm consistently hurt more than LayerNorm"
    else:
        bn_part = "BatchNorm not consistently hurt more than LayerNorm"
    ln_part = (
        "LayerNorm insensitive"
        if state["ln_insensitive"]
        else f"LayerNorm also worse by > {100 * LN_TOLERANCE:g} pp in every seed"
    )
    return f"{arch.upper()}: BN {bn:+.1f} pp, LN {ln:+.1f} pp ({bn_part}; {ln_part})"


def verdict(numbers: dict) -> Verdict:
    decided = _decide(numbers)
    return Verdict(
        *apply_regime(numbers["regime"], decided.label, decided.reason, decided.deciding)
    )


def _decide(numbers: dict) -> Verdict:
    """The rule on the test errors, before the regime check."""
    small, ref = numbers["small_batch"], numbers["reference_batch"]
    states = {arch: _arch_state(numbers, arch) for arch in ARCHS}
    change = numbers["error_change_small_minus_reference"]
    spreads = numbers["bn_output_spread"]["BatchNorm"]
    deciding = f"BN's test-error rise from batch {ref} to {small} minus LN's: " + ", ".join(
        f"{arch.upper()} {100 * mean(s['excess']):+.1f} ± {100 * spread(s['excess']):.1f} pp"
        for arch, s in states.items()
    )
    details = (
        f"Test-error change from batch {ref} to {small}: "
        + "; ".join(_describe(arch, states[arch], change[arch]) for arch in ARCHS)
        + ". BN's rise minus LN's: "
        + "; ".join(
            f"{arch.upper()} {power_text(s['excess'], scale=100, unit=' pp')}"
            for arch, s in states.items()
        )
        + f". A sample's BN output moves by {fmt(mean(spreads[str(small)]))} (std over "
        f"batch-mates) at batch {small} vs {fmt(mean(spreads[str(ref)]))} at {ref}. "
        f"Wu & He 2018 (ResNet-50, ImageNet, 32 -> 2 images/GPU): BN +11.1 pp, GN +0.0 pp."
    )
    holds = [arch for arch, s in states.items() if s["bn_worse_than_ln"] and s["ln_insensitive"]]
    if len(holds) == len(ARCHS):
        label = "supported"
    elif holds or any(s["bn_worse_than_ln"] for s in states.values()):
        label = "partly supported"
    elif all(mean(s["excess"]) <= 0 for s in states.values()):
        label = "contradicted"
    else:
        label = "inconclusive"
    return Verdict(label, details, deciding)


CLAIM = Claim(
    letter="d",
    key="batch-size",
    title="Training stability: sensitivity to batch size",
    article="LayerNorm's statistics depend only on the current sample, so it is insensitive "
    "to batch size; BatchNorm's small batches give inaccurate mean and variance and unstable "
    "training.",
    rule=(
        "For each model (MLP, CNN) and seed: the eval-mode test error at the smallest batch "
        f"minus at batch {REFERENCE_BATCH}, for BatchNorm and LayerNorm, and BN's change minus "
        "LN's ('excess'). In a model the claim holds if the excess is a consistent_effect over "
        "seeds (BN hurt more than LN, every seed, mean beyond the spread) and LN's change is "
        f"not consistently above {100 * LN_TOLERANCE:g} pp. Supported if it holds in both "
        "models; partly supported if it holds in one, or BN is consistently hurt more but LN "
        "also degrades; contradicted if the mean excess is <= 0 in both; otherwise "
        "inconclusive. GroupNorm, RMSNorm, none, BatchRenorm and GhostBN, the train/eval gap "
        "and the output spread are reported for context. Regime first: if a BatchNorm or "
        "LayerNorm run at either batch size has not converged (rules.REGIME_CRITERION on its "
        f"held-out loss, evaluated {EVALUATIONS} times per base training length, and at least "
        f"{SETTLED_STEPS} steps), inconclusive."
    ),
    literature=(
        "Wu & He 2018 (Group Normalization), Table 2, ResNet-50 on ImageNet, val error at "
        "32/16/8/4/2 images per GPU: BN 23.6/23.7/24.8/27.3/34.7, GN 24.1/24.2/24.0/24.2/"
        "24.1 (drawn beside our result). Ioffe 2017 (Batch Renormalization) and Hoffer et al. "
        "2017 (ghost batches) address BN's batch dependence; Goyal et al. 2017 give the "
        "linear learning-rate scaling used here."
    ),
    run=run,
    verdict=verdict,
)
