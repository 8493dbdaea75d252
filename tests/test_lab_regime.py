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


def _independent_plateau(
    steps: list[int], losses: list[float | None], constant_from: int = 0
) -> bool:
    """The regime criterion written again from its sentence in the report, not imported:
    the window (last 20% of the steps) lies where the learning rate is constant, at least two
    finite evaluations before it and one in it, and its best is < 1% below the best before."""
    if not losses or any(v is None or not math.isfinite(v) for v in losses):
        return False
    cut = 0.8 * steps[-1]
    if cut < constant_from:
        return False
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
        # The sequence models' learning rate is constant from this step (0: always).
        constant_from = (
            claim["numbers"]["training"].get("schedule", {}).get("constant_from", 0)
            if claim["key"] in ("padding", "architecture")
            else 0
        )
        for name, (steps, losses) in curves.items():
            expected = _independent_plateau(steps, losses, constant_from)
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
def test_no_committed_verdict_stands_on_unconverged_runs(committed, key):
    """A training claim is decided (anything but inconclusive) only if its runs converged,
    and the report prints the criterion."""
    recorded = next(c for c in committed["claims"] if c["key"] == key)
    regime = recorded["numbers"]["regime"]
    assert isinstance(regime["converged"], bool) and regime["criterion"].strip()
    if not regime["converged"]:
        assert recorded["verdict"]["label"] == "inconclusive"
        assert recorded["verdict"]["reason"].startswith("Not decided")
    report = RESULTS.with_name("report.md").read_text()
    assert rules.PLATEAU_TOLERANCE == regime["tolerance"]
    assert regime["criterion"][:80] in report


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


def test_a_plateau_while_the_rate_still_decays_does_not_count():
    steps = list(range(100, 2100, 100))
    flat = [2.0] * len(steps)
    assert rules.plateau(steps, flat, constant_from=1600)["converged"]  # window 1600-2000
    assert not rules.plateau(steps, flat, constant_from=1700)["converged"]
    assert rules.stop_now(steps, flat, 1600) and not rules.stop_now(steps, flat, 1700)


def test_schedule_warms_up_decays_to_its_floor_and_stays():
    from normlab.lab.sequence_models import Schedule

    schedule = Schedule(lr=0.01, max_steps=100, eval_every=10, warmup=10, decay_end=50, floor=0.1)
    assert schedule.rate(5) == pytest.approx(0.5) and schedule.rate(10) == pytest.approx(1.0)
    assert schedule.rate(30) == pytest.approx(0.55)  # half-way down the cosine
    assert schedule.rate(50) == schedule.rate(99) == pytest.approx(0.1)
    assert schedule.constant_from == 50
    assert Schedule(lr=0.01, max_steps=10, eval_every=2).rate(7) == 1.0


def test_early_stopping_ends_a_run_at_its_first_plateau():
    """A model that cannot learn (zero learning rate) plateaus at once: it stops at the first
    evaluation whose window lies after the decay, and its curve meets the criterion."""
    import torch

    from normlab.lab.sequence_models import Schedule, TokenMLP, train_next_token

    torch.manual_seed(0)
    tokens = torch.randint(1, 90, (4, 12))
    lengths = torch.full((4,), 12)
    schedule = Schedule(
        lr=0.0, max_steps=200, eval_every=5, warmup=5, decay_end=40, floor=0.1, early_stop=True
    )
    curves = train_next_token(
        TokenMLP(97, "layer"), lambda: (tokens, lengths), [(tokens, lengths)], schedule
    )
    assert curves.eval_steps[-1] == 50  # the first step s with 0.8 s >= 40
    assert rules.plateau(curves.eval_steps, curves.eval_loss, 40)["converged"]


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
