"""``normlab report``: run the claims, write the report, print the verdict table."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from normlab.lab.runner import PROFILES, load_claims, run_claims


def _kept(
    out: Path, profile_name: str, seed: int, claims: list, rerun: tuple[str, ...] = ()
) -> tuple[list, dict | None]:
    """--resume: the claims an earlier, interrupted run of this profile and seed finished in
    ``out`` (its results.json and figures), as results, except those named in ``rerun``;
    verdicts are re-derived from their numbers by the current rules."""
    from normlab.lab.runner import ClaimResult, Findings

    path = out / "results.json"
    if not path.exists():
        return [], None
    document = json.loads(path.read_text())
    meta = document["meta"]
    if meta["profile"] != profile_name or meta["seed"] != seed:
        return [], None
    by_key = {claim.key: claim for claim in claims}
    kept = []
    for recorded in document["claims"]:
        claim = by_key.get(recorded["key"])
        if claim is None or claim.key in rerun:
            continue
        figures = {
            name: (out / f"{claim.key}-{name}.png").read_bytes() for name in recorded["figures"]
        }
        findings = Findings(recorded["numbers"], recorded["what_was_run"])
        verdict = claim.verdict(findings.numbers)
        kept.append(ClaimResult(claim, findings, verdict, figures, recorded["seconds"]))
    resumed = {"kept": [f"({r.claim.letter})" for r in kept], "from": meta["date"]}
    if rerun:
        resumed["rerun"] = [f"({c.letter})" for c in claims if c.key in rerun]
    if meta.get("resumed"):  # that run was itself resumed: say where its claims came from
        resumed["earlier"] = meta["resumed"]
    return kept, resumed if kept else None


def main(
    profile_name: str,
    only: list[str] | None,
    out: str,
    seed: int,
    resume: bool = False,
    rerun: tuple[str, ...] = (),
) -> int:
    try:
        import matplotlib
        import tqdm  # noqa: F401
    except ImportError as missing:
        raise SystemExit(
            f"normlab report needs the lab extra ({missing.name} is missing): "
            "pip install 'normlab[lab]'"
        ) from None
    import matplotlib

    matplotlib.use("Agg")
    from normlab.lab.report import verdict_table_rows, write_report

    profile = PROFILES[profile_name]
    claims = load_claims(only)
    command = (
        f"normlab report --profile {profile_name}"
        + (f" --only {','.join(only)}" if only else "")
        + f" --seed {seed} --out {out}"
        + (" --resume" if resume else "")
        + (f" --rerun {','.join(rerun)}" if rerun else "")
    )
    load_start = os.getloadavg()
    start = time.perf_counter()

    unknown = [key for key in rerun if key not in {claim.key for claim in claims}]
    if unknown:
        raise SystemExit(
            f"--rerun: expected experiments of this run ({', '.join(c.key for c in claims)}), "
            f"got {', '.join(unknown)}"
        )
    kept, resumed = _kept(Path(out), profile_name, seed, claims, rerun) if resume else ([], None)
    done = {r.claim.key for r in kept}
    earlier = sum(r.seconds for r in kept)

    def write_so_far(finished):  # an interrupted long run keeps the claims it finished
        if len(kept) + len(finished) < len(claims):
            write_report(
                _in_order(kept + finished, claims),
                profile,
                seed,
                earlier + time.perf_counter() - start,
                Path(out),
                command,
                resumed=resumed,
            )

    results = run_claims([c for c in claims if c.key not in done], profile, seed, write_so_far)
    seconds = earlier + time.perf_counter() - start
    document = write_report(
        _in_order(kept + results, claims),
        profile,
        seed,
        seconds,
        Path(out),
        command,
        (load_start, os.getloadavg()),
        resumed,
    )
    width = max(len(row[0]) for row in verdict_table_rows(document))
    print(f"\n{'claim':<{width}}  {'verdict':<17} deciding number")
    for title, label, deciding, _ in verdict_table_rows(document):
        print(f"{title:<{width}}  {label:<17} {deciding}")
    print(f"\nreport: {Path(out) / 'report.html'} ({document['meta']['seconds']} s)")
    return 0


def _in_order(results: list, claims: list) -> list:
    order = {claim.key: i for i, claim in enumerate(claims)}
    return sorted(results, key=lambda r: order[r.claim.key])
