"""``normlab report``: run the claims, write the report, print the verdict table."""

from __future__ import annotations

import os
import time
from pathlib import Path

from normlab.lab.runner import PROFILES, load_claims, run_claims


def main(profile_name: str, only: list[str] | None, out: str, seed: int) -> int:
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
    )
    load_start = os.getloadavg()
    start = time.perf_counter()

    def write_so_far(done):  # an interrupted long run keeps the claims it finished
        if len(done) < len(claims):
            write_report(done, profile, seed, time.perf_counter() - start, Path(out), command)

    results = run_claims(claims, profile, seed, write_so_far)
    seconds = time.perf_counter() - start
    document = write_report(
        results, profile, seed, seconds, Path(out), command, (load_start, os.getloadavg())
    )
    width = max(len(row[0]) for row in verdict_table_rows(document))
    print(f"\n{'claim':<{width}}  {'verdict':<17} deciding number")
    for title, label, deciding, _ in verdict_table_rows(document):
        print(f"{title:<{width}}  {label:<17} {deciding}")
    print(f"\nreport: {Path(out) / 'report.html'} ({document['meta']['seconds']} s)")
    return 0
