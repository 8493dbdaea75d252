"""Write the lab's report: results.json (every number), report.md (figures beside it) and a
self-contained report.html (figures embedded), verdict table first."""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import time
from pathlib import Path

import torch

import normlab
from normlab.lab.runner import ClaimResult, Profile

VERDICT_COLOURS = {
    "supported": "#1b7f3b",
    "partly supported": "#b36b00",
    "contradicted": "#b3261e",
    "inconclusive": "#555555",
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def results_document(
    results: list[ClaimResult],
    profile: Profile,
    seed: int,
    seconds: float,
    command: str = "",
    load: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    resumed: dict | None = None,
) -> dict:
    return {
        "meta": {
            "command": command,
            "cpu": _cpu_model(),
            "platform": platform.platform(),
            # 1-minute load average at the start and the end: other work on the machine
            # slows the run (seconds), not its numbers.
            "load_average": {"start": load[0], "end": load[1]} if load else None,
            "workers": profile.workers,
            "normlab": normlab.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_cores": os.cpu_count(),
            "torch_threads": 1,  # run_claims runs every experiment on one thread
            "profile": profile.name,
            "seeds": profile.seeds,
            "seed": seed,
            "seconds": round(seconds, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            # --resume: the claims kept from an earlier run of the same profile and seed.
            **({"resumed": resumed} if resumed else {}),
        },
        "claims": [
            {
                "letter": r.claim.letter,
                "key": r.claim.key,
                "title": r.claim.title,
                "article": r.claim.article,
                "what_was_run": r.findings.what_was_run,
                "rule": r.claim.rule,
                "literature": r.claim.literature,
                "verdict": {
                    "label": r.verdict.label,
                    "reason": r.verdict.reason,
                    "deciding": r.verdict.deciding,
                },
                "numbers": r.findings.numbers,
                "figures": sorted(r.figures),
                "seconds": round(r.seconds, 1),
            }
            for r in results
        ],
    }


def write_report(
    results: list[ClaimResult],
    profile: Profile,
    seed: int,
    seconds: float,
    out: Path,
    command: str = "",
    load: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    resumed: dict | None = None,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    document = results_document(results, profile, seed, seconds, command, load, resumed)
    # Compact: a full-profile run records ~10^5 numbers (curves), indentation would double it.
    (out / "results.json").write_text(json.dumps(document, default=_jsonable))
    figures = {(r.claim.key, name): png for r in results for name, png in r.figures.items()}
    for (key, name), png in figures.items():
        (out / f"{key}-{name}.png").write_bytes(png)
    (out / "report.md").write_text(_markdown(document))
    (out / "report.html").write_text(_html(document, figures))
    return document


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def _abbreviated(value, longest: int = 40):
    """``value`` with every list longer than ``longest`` replaced by a note (the HTML's
    "All numbers" stays readable; results.json keeps every value)."""
    if isinstance(value, dict):
        return {key: _abbreviated(item, longest) for key, item in value.items()}
    if isinstance(value, list | tuple):
        if len(value) > longest:
            return f"<{len(value)} values: see results.json>"
        return [_abbreviated(item, longest) for item in value]
    return value


def verdict_table_rows(document: dict) -> list[tuple[str, str, str, str]]:
    return [
        (f"({c['letter']}) {c['title']}", c["verdict"]["label"], c["verdict"]["deciding"], c["key"])
        for c in document["claims"]
    ]


def _resumed_text(resumed: dict) -> str:
    """The report header's account of --resume (and --rerun): which claims come from which
    recorded run."""
    reran = resumed.get("rerun")
    earlier = resumed.get("earlier")
    return (
        f" Resumed: claims {', '.join(resumed['kept'])} were kept from the run recorded at "
        f"{resumed['from']} (same profile and seed"
        + (
            f"; that run had itself kept {', '.join(earlier['kept'])} from {earlier['from']}"
            if earlier
            else ""
        )
        + ")"
        + (
            f"; {', '.join(reran)} ran again by request (--rerun)"
            if reran
            else "; the others ran again"
        )
        + "; the seconds are those of all claims together."
    )


def header(meta: dict) -> str:
    """The report's first lines: how it was made and on what."""
    load = meta.get("load_average")
    load_text = (
        f"; load average {load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end"
        if load
        else ""
    )
    command = f"`{meta['command']}`: " if meta.get("command") else ""
    preview = (
        " The quick profile is a preview: its short training may not reach the regime "
        "checks, so its training claims may answer inconclusive; the full profile decides."
        if meta["profile"] != "full"
        else ""
    )
    resumed = meta.get("resumed")
    resumed_text = _resumed_text(resumed) if resumed else ""
    return (
        f"{command}profile `{meta['profile']}` ({meta['seeds']} seeds from {meta['seed']}), "
        f"{meta['seconds']} s on {meta.get('cpu', meta['machine'])}, {meta['cpu_cores']} "
        f"cores, {meta.get('workers', 1)} worker process(es) with one torch thread each"
        f"{load_text}; normlab {meta['normlab']}, torch {meta['torch']}, Python "
        f"{meta['python']}, {meta.get('platform', meta['machine'])}, {meta['date']}."
        f"{resumed_text}{preview}"
    )


def regime_line(numbers: dict) -> str | None:
    """The regime check of a training claim, for the report; None for the others."""
    record = numbers.get("regime")
    if not record:
        return None
    runs = record["runs"]
    done = len(runs) - len(record["unconverged"])
    state = "converged" if record["converged"] else "NOT converged"
    steps = [run["steps"] for run in runs.values() if "steps" in run]
    length = (
        ""
        if not steps
        else f", after {min(steps)} steps"
        if min(steps) == max(steps)
        else f", after {min(steps)}-{max(steps)} steps (median {sorted(steps)[len(steps) // 2]})"
    )
    return (
        f"{state}: {done} of {len(runs)} runs converged{length}. Criterion: {record['criterion']}."
    )


def _markdown(document: dict) -> str:
    meta = document["meta"]
    lines = [
        "# normlab report: why Transformers use LayerNorm, not BatchNorm",
        "",
        header(meta),
        "",
        "| claim | verdict | deciding number |",
        "| --- | --- | --- |",
        *(f"| [{t}](#{k}) | **{v}** | {d} |" for t, v, d, k in verdict_table_rows(document)),
        "",
    ]
    for c in document["claims"]:
        lines += [
            f"## ({c['letter']}) {c['title']}",
            f'<a id="{c["key"]}"></a>',
            "",
            f"**The article:** {c['article']}",
            "",
            f"**What was run:** {c['what_was_run']}",
            "",
            *(f"![{name}]({c['key']}-{name}.png)\n" for name in c["figures"]),
            f"**Numbers:** {_numbers_summary(c['numbers'])} (every number: `results.json` → "
            f"`{c['key']}`)",
            "",
            f"**Literature:** {c['literature']}",
            "",
            f"**Rule:** {c['rule']}",
            "",
            *(
                [f"**Regime:** {regime_line(c['numbers'])}", ""]
                if regime_line(c["numbers"])
                else []
            ),
            f"**Verdict: {c['verdict']['label']}.** {c['verdict']['reason']}",
            "",
        ]
    return "\n".join(lines)


def _numbers_summary(numbers: dict) -> str:
    summary = numbers.get("summary")
    return summary if isinstance(summary, str) else ""


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;
line-height:1.45;color:#222}table{border-collapse:collapse;width:100%}
td,th{border:1px solid #ccc;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.verdict{font-weight:bold}img{max-width:100%;height:auto}
section{border-top:2px solid #ddd;margin-top:2em;padding-top:.5em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em;max-height:24em}
.meta{color:#555;font-size:.9em}
"""


def _html(document: dict, figures: dict) -> str:
    meta, esc = document["meta"], html.escape
    rows = "".join(
        f'<tr><td><a href="#{k}">{esc(t)}</a></td>'
        f'<td class="verdict" style="color:{VERDICT_COLOURS[v]}">{esc(v)}</td>'
        f"<td>{esc(d)}</td></tr>"
        for t, v, d, k in verdict_table_rows(document)
    )
    sections = []
    for c in document["claims"]:
        images = "".join(
            f'<p><img alt="{esc(name)}" src="data:image/png;base64,'
            f'{base64.b64encode(figures[(c["key"], name)]).decode()}"></p>'
            for name in c["figures"]
        )
        verdict = c["verdict"]
        sections.append(
            f'<section id="{c["key"]}"><h2>({c["letter"]}) {esc(c["title"])}</h2>'
            f"<p><b>The article:</b> {esc(c['article'])}</p>"
            f"<p><b>What was run:</b> {esc(c['what_was_run'])}</p>{images}"
            f"<p><b>Literature:</b> {esc(c['literature'])}</p>"
            f"<p><b>Rule:</b> {esc(c['rule'])}</p>"
            + (
                f"<p><b>Regime:</b> {esc(regime_line(c['numbers']))}</p>"
                if regime_line(c["numbers"])
                else ""
            )
            + f'<p><b>Verdict: <span style="color:{VERDICT_COLOURS[verdict["label"]]}">'
            f"{esc(verdict['label'])}</span>.</b> {esc(verdict['reason'])}</p>"
            f"<details><summary>All numbers ({c['seconds']} s)</summary>"
            f"<pre>{esc(json.dumps(_abbreviated(c['numbers']), indent=1, default=_jsonable))}"
            f"</pre>"
            f"</details></section>"
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>normlab report</title><style>{_CSS}</style></head><body>"
        "<h1>normlab report: why Transformers use LayerNorm, not BatchNorm</h1>"
        f"<p class='meta'>{esc(header(meta))}</p>"
        "<table><tr><th>claim</th><th>verdict</th><th>deciding number</th></tr>"
        f"{rows}</table>{''.join(sections)}</body></html>"
    )
