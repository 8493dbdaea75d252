"""``normlab report``: run the claims, write the report, print the verdict table."""

from __future__ import annotations

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
    start = time.perf_counter()
    results = run_claims(claims, profile, seed)
    document = write_report(results, profile, seed, time.perf_counter() - start, Path(out))
    width = max(len(row[0]) for row in verdict_table_rows(document))
    print(f"\n{'claim':<{width}}  {'verdict':<17} deciding number")
    for title, label, deciding, _ in verdict_table_rows(document):
        print(f"{title:<{width}}  {label:<17} {deciding}")
    print(f"\nreport: {Path(out) / 'report.html'} ({document['meta']['seconds']} s)")
    return 0
