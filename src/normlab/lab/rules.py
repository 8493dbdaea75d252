"""Small statistics shared by the verdict rules: effects over seeds, their spread and the
smallest effect the seeds can resolve, and the regime (convergence) check of training runs.

Rules are written before the results are seen and use only recorded numbers."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence


def mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values))


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation over seeds (0 for a single seed)."""
    return float(statistics.stdev(values)) if len(values) > 1 else 0.0


def detectable(values: Sequence[float]) -> float:
    """The smallest mean effect these seeds resolve: 2 standard errors of the mean,
    2 * spread / sqrt(n) (about a 95% interval that excludes 0)."""
    return 2 * spread(values) / math.sqrt(len(values)) if values else math.inf


def resolved(values: Sequence[float]) -> bool:
    """The mean effect is larger than the smallest one the seeds resolve."""
    return bool(values) and abs(mean(values)) > detectable(values)


def consistent_effect(differences: Sequence[float]) -> bool:
    """An effect holds if its sign is the same in every seed, its mean exceeds the seed
    spread, and the mean is resolved (beyond 2 standard errors): all differences > 0,
    mean > standard deviation and mean > 2 * standard deviation / sqrt(n)."""
    return (
        bool(differences)
        and all(d > 0 for d in differences)
        and (mean(differences) > spread(differences))
        and resolved(differences)
    )


def seeds_needed(values: Sequence[float]) -> int | None:
    """How many seeds would resolve the observed mean at the observed spread (2 SE below
    |mean|); None if the mean is 0."""
    centre, sd = abs(mean(values)), spread(values)
    if centre == 0:
        return None
    return max(2, math.floor((2 * sd / centre) ** 2) + 1)


def power_text(values: Sequence[float], scale: float = 1.0, unit: str = "") -> str:
    """An effect with its power: 'mean ± sd (n seeds; detectable ≥ 2 SE)', and, when the
    mean is below what the seeds resolve, how many seeds would resolve it."""
    n = len(values)
    text = (
        f"{fmt(scale * mean(values))}{unit} ± {fmt(scale * spread(values))}{unit} over {n} "
        f"seeds (smallest detectable effect, 2 SE: {fmt(scale * detectable(values))}{unit})"
    )
    if not resolved(values):
        needed = seeds_needed(values)
        text += ", below the smallest detectable effect" + (
            f" (about {needed} seeds would resolve a mean this size)" if needed else ""
        )
    return text


def fmt(value: float, digits: int = 3) -> str:
    """A number for the report: fixed for moderate magnitudes, scientific otherwise."""
    if value == 0 or 1e-3 <= abs(value) < 1e4 or not math.isfinite(value):
        return f"{value:.{digits}g}"
    return f"{value:.{digits - 1}e}"


# The regime check, fixed before the full-profile data (an early-stopping patience rule):
# a training run has converged when its held-out loss stopped reaching new lows, i.e. the
# best held-out loss of the last 20% of its steps is less than 1% below the best before.
PLATEAU_WINDOW = 0.2
PLATEAU_TOLERANCE = 0.01
REGIME_CRITERION = (
    "a run has converged when the lowest held-out loss among its evaluations in the last "
    f"{PLATEAU_WINDOW:.0%} of its steps is less than {PLATEAU_TOLERANCE:.0%} below the lowest "
    "before them (relative), with every evaluation finite and at least two evaluations before "
    "the window and one in it, and, where the learning rate decays, the window wholly where it "
    "has reached its constant floor (a decaying rate alone cannot flatten the curve): training "
    "longer no longer found a better model. A run may stop early at the first evaluation at "
    "which its curve so far meets this criterion. A claim's runs "
    "converged when every run that enters its verdict did"
)


def plateau(
    eval_steps: Sequence[int], losses: Sequence[float | None], constant_from: int = 0
) -> dict:
    """The regime evidence of one run from its held-out loss curve (see REGIME_CRITERION).
    ``constant_from``: the step from which the learning rate is constant (0 if it always
    is); the window of the last 20% of steps must start at or after it."""
    if not losses or any(v is None or not math.isfinite(v) for v in losses):
        return {"converged": False, "why": "a non-finite held-out loss"}
    total = eval_steps[-1]
    cut = (1 - PLATEAU_WINDOW) * total
    if cut < constant_from:
        return {
            "converged": False,
            "why": f"the learning rate was still decaying in the last {PLATEAU_WINDOW:.0%}",
            "steps": total,
        }
    before = [v for s, v in zip(eval_steps, losses, strict=True) if s <= cut]
    window = [v for s, v in zip(eval_steps, losses, strict=True) if s > cut]
    if len(before) < 2 or not window:
        return {"converged": False, "why": "too few evaluations to tell", "steps": total}
    best_before, best_after = min(before), min(window)
    improvement = (best_before - best_after) / abs(best_before)
    return {
        "converged": improvement < PLATEAU_TOLERANCE,
        "relative_improvement": improvement,
        "best_before": best_before,
        "best_last_20": best_after,
        "final": losses[-1],
        "steps": total,
    }


def stop_now(
    eval_steps: Sequence[int], losses: Sequence[float | None], constant_from: int = 0
) -> bool:
    """Early stopping by the regime criterion itself: a run stops at the first evaluation
    at which its curve so far passes ``plateau`` (the run's regime evidence is then that of
    the curve it ends with)."""
    return plateau(eval_steps, losses, constant_from)["converged"]


def regime(runs: Mapping[str, dict], criterion: str = REGIME_CRITERION) -> dict:
    """``numbers["regime"]`` of a claim from its runs' ``plateau`` evidence (name -> dict)."""
    unconverged = [name for name, run in runs.items() if not run["converged"]]
    return {
        "converged": not unconverged,
        "criterion": criterion,
        "tolerance": PLATEAU_TOLERANCE,
        "runs": dict(runs),
        "unconverged": unconverged,
    }


def regime_text(regime_record: dict) -> str:
    """For a verdict's reason: how many runs converged, and the worst of the rest."""
    runs = regime_record["runs"]
    bad = regime_record["unconverged"]
    if not bad:
        worst = max((r.get("relative_improvement", 0.0) for r in runs.values()), default=0.0)
        return (
            f"All {len(runs)} runs that enter the verdict converged (largest improvement of "
            f"the best held-out loss in the last 20% of steps: {worst:.2%})."
        )
    improvements = [
        runs[name]["relative_improvement"] for name in bad if "relative_improvement" in runs[name]
    ]
    worst = (
        f"; the best held-out loss still fell by up to {max(improvements):.1%} in the last "
        f"{PLATEAU_WINDOW:.0%} of the steps, where the criterion allows {PLATEAU_TOLERANCE:.0%}"
        if improvements
        else ""
    )
    steps = sorted({runs[name]["steps"] for name in bad if "steps" in runs[name]})
    after = (
        f" after {steps[0]} steps"
        if len(steps) == 1
        else f" after {steps[0]}-{steps[-1]} steps"
        if steps
        else ""
    )
    return (
        f"{len(bad)} of {len(runs)} runs that enter the verdict had not converged{after} (e.g. "
        f"{', '.join(bad[:3])}{worst}), so the experiment cannot decide the claim: it needs "
        f"longer training."
    )


def apply_regime(
    regime_record: dict, label: str, reason: str, deciding: str
) -> tuple[str, str, str]:
    """The verdict once the regime is known: the rule's label if every run that enters it
    converged, else "inconclusive", with what the unconverged runs showed so far. The
    deciding number gains the count of converged runs."""
    runs = regime_record["runs"]
    converged = len(runs) - len(regime_record["unconverged"])
    deciding = f"{deciding}; {converged}/{len(runs)} runs converged"
    if regime_record["converged"]:
        return label, f"{reason} {regime_text(regime_record)}", deciding
    return (
        "inconclusive",
        f"Not decided: {regime_text(regime_record)} On these runs the rule would read "
        f"'{label}', which is not a finding before convergence: {reason}",
        deciding,
    )
