"""The lab's runner: profiles, the Claim contract every experiment module fulfils, and the
loop that runs them with a progress bar and collects numbers, figures and verdicts.

An experiment module (``normlab.lab.claims.<name>``) defines ``CLAIM = Claim(...)`` with a
``run(ctx) -> Findings`` that measures, and a ``verdict(numbers) -> Verdict`` that decides
from the recorded numbers alone (written before looking at the results), so every verdict
in a report can be recomputed from its results.json.
"""

from __future__ import annotations

import importlib
import io
import multiprocessing
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

VERDICTS = ("supported", "partly supported", "contradicted", "inconclusive")
# Article order; each key names the module normlab.lab.claims.<key with _ for ->.
CLAIM_KEYS = (
    "definition",
    "gradients",
    "padding",
    "batch-size",
    "parallelism",
    "architecture",
    "position",
)


@dataclass(frozen=True)
class Profile:
    """How much to run: ``smoke`` (toy sizes, tests), ``quick`` (default, minutes on 2 CPU
    cores: a preview whose short training may not converge, so its training claims may answer
    "inconclusive"), ``full`` (trains until the regime checks pass, more seeds; under an hour
    on 2 cores). ``workers``: processes that run independent training runs in parallel, each
    on one thread."""

    name: str
    seeds: int
    workers: int = 1

    def pick(self, *, smoke, quick, full):
        """The value for this profile."""
        return {"smoke": smoke, "quick": quick, "full": full}[self.name]


PROFILES = {
    "smoke": Profile("smoke", seeds=2),
    "quick": Profile("quick", seeds=3, workers=2),
    "full": Profile("full", seeds=5, workers=2),
}


@dataclass(frozen=True)
class Verdict:
    label: str  # one of VERDICTS
    reason: str  # why, in one or two sentences with the numbers
    deciding: str  # the one number that decides it, as text

    def __post_init__(self):
        if self.label not in VERDICTS:
            raise ValueError(f"verdict label must be one of {VERDICTS}, got {self.label!r}")


@dataclass
class Findings:
    """What ``run`` returns: every number (JSON-serializable) and what was run."""

    numbers: dict[str, Any]
    what_was_run: str


@dataclass(frozen=True)
class Claim:
    letter: str  # "a".."g", as in SEED.md
    key: str  # CLI name: --only padding,batch-size
    title: str
    article: str  # the article's claim, in a sentence or two
    rule: str  # the verdict rule, in words (the code is ``verdict``)
    literature: str  # what published work says, to place beside the result
    run: Callable[[RunContext], Findings]
    verdict: Callable[[dict[str, Any]], Verdict]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a torch generator seeded the same."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (libraries that use the global state)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _worker_init() -> None:
    torch.set_num_threads(1)


def worker_pool(workers: int) -> Executor | None:
    """Processes for ``RunContext.map`` (None for one worker: runs stay in this process).
    Spawned, not forked: Numba's and OpenMP's thread pools are not fork-safe."""
    workers = min(workers, os.cpu_count() or 1)
    if workers <= 1:
        return None
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
    )


@dataclass
class RunContext:
    """Passed to ``Claim.run``: the profile, the base seed, figures, progress, and the
    worker processes that ``map`` runs independent runs on."""

    profile: Profile
    seed: int
    progress: Callable[[str], None] = lambda message: None
    figures: dict[str, bytes] = field(default_factory=dict)
    pool: Executor | None = None
    # Called with (label, done, total) as ``map`` completes runs (the bar with an ETA).
    steps: Callable[[str, int, int], None] = lambda label, done, total: None

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.profile.seeds)]

    def seed_everything(self, seed: int) -> torch.Generator:
        """Seed Python, NumPy and torch; returns a torch generator seeded the same."""
        return seed_everything(seed)

    def map(self, function: Callable, jobs: Sequence[tuple], label: str) -> list:
        """``[function(*job) for job in jobs]``, on the worker processes when there are
        some. ``function`` must be a module-level function that seeds itself: a run's
        numbers do not depend on the process or the order it runs in."""
        jobs = list(jobs)
        results: list = [None] * len(jobs)
        self.steps(label, 0, len(jobs))
        if self.pool is None or len(jobs) < 2:
            for index, job in enumerate(jobs):
                results[index] = function(*job)
                self.steps(label, index + 1, len(jobs))
            return results
        futures = {self.pool.submit(function, *job): index for index, job in enumerate(jobs)}
        for done, future in enumerate(as_completed(futures), start=1):
            results[futures[future]] = future.result()
            self.steps(label, done, len(jobs))
        return results

    def track(self, items: Iterable, label: str) -> Iterable:
        """Iterate ``items``, reporting ``label`` to the progress bar for each."""
        for item in items:
            self.progress(f"{label} {item}")
            yield item

    def figure(self, name: str, fig) -> None:
        """Keep a matplotlib figure as PNG (embedded in the HTML, a file beside the MD)."""
        import matplotlib.pyplot as plt

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.figures[name] = buffer.getvalue()


def load_claims(only: Iterable[str] | None = None) -> list[Claim]:
    """The claims in article order, optionally only those whose key is in ``only``."""
    keys = list(CLAIM_KEYS)
    if only is not None:
        wanted = {key.strip() for key in only if key.strip()}
        if unknown := wanted - set(CLAIM_KEYS):
            raise ValueError(
                f"--only: unknown experiment(s) {sorted(unknown)}; "
                f"expected some of {list(CLAIM_KEYS)}"
            )
        keys = [key for key in CLAIM_KEYS if key in wanted]
    modules = [
        importlib.import_module(f"normlab.lab.claims.{key.replace('-', '_')}") for key in keys
    ]
    return [module.CLAIM for module in modules]


@dataclass
class ClaimResult:
    claim: Claim
    findings: Findings
    verdict: Verdict
    figures: dict[str, bytes]
    seconds: float


def run_claims(
    claims: list[Claim],
    profile: Profile,
    seed: int,
    finished: Callable[[list[ClaimResult]], None] = lambda results: None,
) -> list[ClaimResult]:
    """Run each claim's experiments under a progress bar; returns their results.

    The lab's models are tiny: one thread is as fast as several on an idle machine, far
    faster on a loaded one (no thread oversubscription), and the numbers do not depend on
    the core count; independent runs go to ``profile.workers`` processes, one thread each.
    A second bar shows the runs of the current stage with their ETA. ``finished`` is called
    with the results so far after each claim. The caller's thread setting is restored
    afterwards."""
    from tqdm.auto import tqdm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = worker_pool(profile.workers)
    try:
        results = []
        with (
            tqdm(claims, desc="normlab report", unit="claim", position=0) as bar,
            tqdm(desc="runs", unit="run", position=1, leave=False) as runs_bar,
        ):

            def stage(label: str, done: int, total: int) -> None:
                if done == 0:
                    runs_bar.reset(total=total)
                    runs_bar.set_description_str(label)
                else:
                    runs_bar.update(done - runs_bar.n)

            for claim in bar:
                bar.set_postfix_str(f"({claim.letter}) {claim.key}")
                ctx = RunContext(
                    profile,
                    seed,
                    progress=lambda m, c=claim: bar.set_postfix_str(f"({c.letter}) {m}"),
                    pool=pool,
                    steps=lambda label, done, total, c=claim: stage(
                        f"({c.letter}) {label}", done, total
                    ),
                )
                start = time.perf_counter()
                findings = claim.run(ctx)
                seconds = time.perf_counter() - start
                verdict = claim.verdict(findings.numbers)
                results.append(ClaimResult(claim, findings, verdict, ctx.figures, seconds))
                finished(results)
        return results
    finally:
        if pool is not None:
            pool.shutdown()
        torch.set_num_threads(threads)
