"""The lab decides only what its experiments can carry: the regime (convergence) check, the
stated power, and the committed full-profile report re-derived from its numbers alone."""

import copy
import json
import math
import operator
from pathlib import Path

import pytest

from normlab.lab import rules
from normlab.lab.runner import PROFILES, RunContext, load_claims, worker_pool

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "lab" / "results.json"
TRAINING_CLAIMS = ("gradients", "padding", "batch-size", "architecture")


@pytest.fixture(scope="module")
def committed():
    if not RESULTS.exists():
        pytest.fail(f"{RESULTS} is missing: run normlab report --profile full --out docs/lab")
    return json.loads(RESULTS.read_text())


def test_committed_report_is_the_full_profile(committed):
    meta = committed["meta"]
    assert meta["profile"] == "full"
    assert meta["seeds"] >= 5
    assert "normlab report --profile full" in meta["command"]


def test_every_committed_verdict_is_rederived_from_its_numbers_alone(committed):
    """A fresh process, reading results.json: each verdict follows from the numbers."""
    claims = {claim.key: claim for claim in load_claims()}
    assert [c["key"] for c in committed["claims"]] == list(claims)
    for recorded in committed["claims"]:
        verdict = claims[recorded["key"]].verdict(recorded["numbers"])
        assert recorded["verdict"] == {
            "label": verdict.label,
            "reason": verdict.reason,
            "deciding": verdict.deciding,
        }, recorded["key"]


def _independent_plateau(steps: list[int], losses: list[float | None]) -> bool:
    """The regime criterion written again from its sentence in the report, not imported."""
    if not losses or any(v is None or not math.isfinite(v) for v in losses):
        return False
    cut = 0.8 * steps[-1]
    before = [v for s, v in zip(steps, losses, strict=True) if s <= cut]
    after = [v for s, v in zip(steps, losses, strict=True) if s > cut]
    if len(before) < 2 or not after:
        return False
    return (min(before) - min(after)) / min(before) < 0.01


def _curves(key: str, numbers: dict) -> dict[str, tuple[list[int], list[float | None]]]:
    """Every held-out loss curve a training claim's verdict depends on, by its regime name."""
    from normlab.lab.sequence_models import NORM_KINDS, NORM_LABELS

    if key == "gradients":
        runs = numbers["training"]["runs"]
        return {
            f"{norm} seed {seed}": (curves["held_out_steps"], curves["held_out_loss"])
            for norm in ("none", "BatchNorm", "LayerNorm")
            for seed, curves in zip(numbers["seeds"], runs[norm]["curves"], strict=True)
        }
    if key == "padding":
        return {
            f"{NORM_LABELS[kind]} seed {seed}": (run[kind]["eval_steps"], run[kind]["eval_loss"])
            for seed, run in numbers["training"]["seeds"].items()
            for kind in NORM_KINDS
        }
    if key == "architecture":
        names = {"pre": "Pre-LN", "post": "Post-LN"}
        return {
            f"{names[p]} {NORM_LABELS[k]} seed {seed}": (
                run[p][k]["eval_steps"],
                run[p][k]["eval_loss"],
            )
            for seed, run in numbers["training"]["seeds"].items()
            for p in names
            for k in NORM_KINDS
        }
    assert key == "batch-size"
    out = {}
    for arch in ("mlp", "cnn"):
        for norm in ("BatchNorm", "LayerNorm"):
            for batch in (numbers["small_batch"], numbers["reference_batch"]):
                cell = numbers["archs"][arch][norm][str(batch)]
                for i, seed in enumerate(numbers["seeds"]):
                    out[f"{arch.upper()} {norm} batch {batch} seed {seed}"] = (
                        cell["held_out_steps"][i],
                        cell["held_out_loss"][i],
                    )
    return out


def test_committed_regime_follows_from_the_loss_curves(committed):
    """numbers["regime"] agrees with the criterion applied afresh to the recorded curves, and a
    claim counts as converged exactly when every one of its runs did."""
    for claim in committed["claims"]:
        if claim["key"] not in TRAINING_CLAIMS:
            assert "regime" not in claim["numbers"]
            continue
        record = claim["numbers"]["regime"]
        curves = _curves(claim["key"], claim["numbers"])
        assert set(curves) == set(record["runs"]), claim["key"]
        for name, (steps, losses) in curves.items():
            expected = _independent_plateau(steps, losses)
            if claim["key"] == "batch-size":
                expected = expected and steps[-1] >= 100
            assert record["runs"][name]["converged"] == expected, (claim["key"], name)
        assert record["converged"] == all(r["converged"] for r in record["runs"].values())
        assert record["criterion"].strip()


def _unconverged(record: dict) -> dict:
    """The regime record with its first run replaced by one whose loss still falls."""
    steps = list(range(100, 2100, 100))
    falling = rules.plateau(steps, [3.0 - 0.05 * i for i in range(len(steps))])
    assert not falling["converged"]
    runs = dict(record["runs"])
    runs[next(iter(runs))] = falling
    return rules.regime(runs, record["criterion"])


@pytest.mark.parametrize("key", TRAINING_CLAIMS)
def test_an_unconverged_run_makes_each_training_claim_inconclusive(committed, key):
    """On the committed numbers with a synthetic regime: every run converged, the rule
    decides; one run whose loss still falls, the claim is inconclusive."""
    claim = next(c for c in load_claims([key]))
    numbers = copy.deepcopy(next(c for c in committed["claims"] if c["key"] == key)["numbers"])
    converged = {"converged": True, "relative_improvement": 0.0, "steps": 2000}
    runs = {name: dict(converged) for name in numbers["regime"]["runs"]}
    numbers["regime"] = rules.regime(runs, numbers["regime"]["criterion"])
    decided = claim.verdict(numbers)
    assert not decided.reason.startswith("Not decided")
    assert f"All {len(runs)} runs that enter the verdict converged" in decided.reason
    numbers["regime"] = _unconverged(numbers["regime"])
    verdict = claim.verdict(numbers)
    assert verdict.label == "inconclusive"
    assert verdict.reason.startswith("Not decided")
    assert "had not converged" in verdict.reason
    assert f"would read '{decided.label}'" in verdict.reason


@pytest.mark.parametrize("key", TRAINING_CLAIMS)
def test_training_claims_state_the_regime_and_the_power(committed, key):
    recorded = next(c for c in committed["claims"] if c["key"] == key)
    assert "runs converged" in recorded["verdict"]["deciding"]
    assert "smallest detectable effect" in recorded["verdict"]["reason"]


def test_a_falling_loss_has_not_converged_a_flat_or_rising_one_has():
    steps = list(range(10, 210, 10))
    assert not rules.plateau(steps, [2.0 - 0.01 * i for i in range(20)])["converged"]
    assert rules.plateau(steps, [2.0] * 20)["converged"]
    assert rules.plateau(steps, [1.0 + 0.01 * i for i in range(20)])["converged"]
    assert not rules.plateau(steps, [2.0] * 19 + [None])["converged"]
    assert not rules.plateau([10, 20], [2.0, 2.0])["converged"]  # too few evaluations


def test_apply_regime_keeps_the_label_only_when_every_run_converged():
    done = rules.regime({"a": {"converged": True}, "b": {"converged": True}})
    label, _, deciding = rules.apply_regime(done, "contradicted", "why", "x")
    assert label == "contradicted" and deciding.endswith("2/2 runs converged")
    half = rules.regime({"a": {"converged": True}, "b": {"converged": False}})
    label, reason, _ = rules.apply_regime(half, "contradicted", "why", "x")
    assert label == "inconclusive" and "'contradicted'" in reason


def test_power_two_standard_errors_and_seeds_needed():
    assert rules.detectable([1.0, 3.0]) == pytest.approx(2 * 2**0.5 / 2**0.5)
    assert rules.resolved([1.0, 1.1, 0.9]) and not rules.resolved([0.1, -0.2, 0.15])
    assert rules.seeds_needed([0.1, -0.2, 0.15]) > 3
    assert "below the smallest detectable effect" in rules.power_text([0.1, -0.2, 0.15])
    assert "below" not in rules.power_text([1.0, 1.1, 0.9])
    # With three seeds, a mean just above the spread is still within 2 standard errors.
    assert not rules.consistent_effect([0.1, 1.0, 1.9])


def test_worker_processes_return_what_one_process_computes():
    pool = worker_pool(2)
    try:
        ctx = RunContext(PROFILES["quick"], 0, pool=pool)
        jobs = [(i, i + 1) for i in range(5)]
        assert ctx.map(operator.mul, jobs, "test") == [a * b for a, b in jobs]
    finally:
        if pool is not None:
            pool.shutdown()
