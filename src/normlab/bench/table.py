"""The bench's tables, as rich tables for the terminal and as Markdown for the docs.

One builder makes header and rows (strings); ``rich_tables`` and ``markdown`` render them.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from normlab.bench import gpu, traffic
from normlab.bench.measure import COPY_CLONE, COPY_INPLACE

DIRECTION_SHORT = {"forward": "fwd", "backward": "bwd"}

THROUGHPUT_NOTES = [
    "GB/s = minimal traffic / median time; (n%) = interquartile range of the times as a "
    "percentage of the median.",
    "copy: copy_ into a preallocated buffer / clone (allocating), of half the traffic; "
    "ratios use clone, since every contender allocates its outputs.",
    "eager: torch.nn.functional (fused add: x + r, then the norm); † masked BatchNorm: the "
    "faster plain-torch masked implementation (torch has none); compile: torch.compile of "
    "that same function, steady state.",
    "x copy / x eager / x compile: reference median time / normlab auto median time "
    "(above 1: normlab faster).",
    "x two-pass (BatchNorm training, CPU): the time of summing the tensors a two-pass "
    "BatchNorm reads twice (forward x; backward x and dy) plus the copy, over normlab auto's.",
    "n/a: backend unavailable for this case; skipped/failed: see the JSON note.",
]


def _gbps_cell(timings: dict, name: str | None) -> str:
    if name is None or name not in timings:
        return "-"
    t = timings[name]
    spread = 100.0 * t["iqr_s"] / t["median_s"] if t["median_s"] else 0.0
    return f"{t['gbps']:.3g} ({spread:.0f}%)"


def _status_cell(case: dict, name: str) -> str:
    record = case["contenders"].get(name)
    if record is None:
        return "-"
    return {"unavailable": "n/a", "failed": "failed", "skipped": "skipped"}.get(
        record.get("status"), "-"
    )


def _contender_cell(case: dict, direction: dict, name: str | None) -> str:
    if name is not None and name in direction["timings"]:
        return _gbps_cell(direction["timings"], name)
    return _status_cell(case, name) if name else "-"


def _ratio_cell(direction: dict, name: str, kind: str) -> str:
    value = direction.get("ratios", {}).get(name, {}).get(f"vs_{kind}")
    return "-" if value is None else f"{value:.3g}"


def _reference_name(case: dict, role: str, direction: dict) -> str | None:
    """The contender shown in a role's column: the ratio's reference when it ran, else the
    first contender of that role (to show its status)."""
    chosen = direction.get("references", {}).get(role)
    if chosen is not None:
        return chosen
    return next((n for n, r in case["contenders"].items() if r.get("role") == role), None)


THROUGHPUT_HEADER = [
    "case",
    "dir",
    "copy_ / clone",
    "eager",
    "compile",
    "normlab composite",
    "normlab numba",
    "normlab auto",
    "auto ran",
    "x copy",
    "x eager",
    "x compile",
    "x two-pass",
]


def _normlab_backends(mode: dict) -> list[str]:
    """normlab's contenders in this mode (the fused one is "triton" on CUDA)."""
    return mode.get("normlab_backends", ["composite", "numba", "auto"])


def throughput_header(mode: dict) -> list[str]:
    """``THROUGHPUT_HEADER`` with this mode's normlab backends."""
    backends = [f"normlab {b}" for b in _normlab_backends(mode)]
    return THROUGHPUT_HEADER[:5] + backends + THROUGHPUT_HEADER[8:]


def throughput_rows(mode: dict) -> list[list[str]]:
    """One row per case and direction: GB/s of each contender, normlab auto's ratios."""
    rows = []
    for case in mode["cases"]:
        masked = case["padding"] > 0
        for direction_name, direction in case["directions"].items():
            timings = direction["timings"]
            copies = f"{timings[COPY_INPLACE]['gbps']:.3g} / {timings[COPY_CLONE]['gbps']:.3g}"
            eager = _contender_cell(case, direction, _reference_name(case, "eager", direction))
            compiled = _contender_cell(case, direction, _reference_name(case, "compile", direction))
            if masked:
                eager, compiled = f"{eager} †", f"{compiled} †"
            auto = case["contenders"]["normlab auto"]
            rows.append(
                [
                    case["label"],
                    DIRECTION_SHORT[direction_name],
                    copies,
                    eager,
                    compiled,
                    *(
                        _contender_cell(case, direction, f"normlab {backend}")
                        for backend in _normlab_backends(mode)
                    ),
                    str(auto.get("backend_ran") or "-"),
                    *(
                        _ratio_cell(direction, "normlab auto", kind)
                        for kind in ("copy", "eager", "compile", "two_pass")
                    ),
                ]
            )
    return rows


FIRST_CALL_HEADER = ["op", "backend", "ran", "first fwd ms", "first bwd ms", "steady fwd ms"]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def first_call_rows(mode: dict) -> list[list[str]]:
    """normlab's first call per op and backend (JIT compile or cache load included)."""
    return [
        [
            row["op"],
            row["backend_requested"],
            str(row["backend_ran"] or "-") if row["status"] == "ok" else row["status"],
            _ms(row["first_forward_s"]),
            _ms(row["first_backward_s"]),
            _ms(row["steady_forward_s"]),
        ]
        for row in mode["first_calls"]
    ]


COMPILE_HEADER = ["case", "compiled", "compile fwd s", "first bwd s", "status"]


def compile_rows(mode: dict) -> list[list[str]]:
    """torch.compile's compile time per case (first forward, first backward)."""
    rows = []
    for case in mode["cases"]:
        for name, record in case["contenders"].items():
            if record.get("role") != "compile" or record["status"] == "skipped":
                continue
            fwd, bwd = record.get("compile_forward_s"), record.get("compile_backward_s")
            rows.append(
                [
                    case["label"],
                    record.get("compiles", name),
                    "-" if fwd is None else f"{fwd:.2f}",
                    "-" if bwd is None else f"{bwd:.2f}",
                    record["status"] if record["status"] == "ok" else record.get("note", ""),
                ]
            )
    return rows


def _machine_line(report: dict) -> str:
    m = report["machine"]
    gpu = f"{m['gpu']}; " if m.get("gpu") else ""
    return (
        f"{gpu}{m['cpu_model']}, {m['usable_cpus']} usable CPUs, torch {m['torch']} "
        f"({', '.join(str(t) for t in report['torch_threads'])} threads), numba {m['numba']}, "
        f"{m['glibc']}"
    )


def _device_lines(mode: dict) -> list[str]:
    """On CUDA: how the copies are scaled, and the cases that did not fit."""
    if mode.get("device") != "cuda":
        return []
    skipped = [f"skipped {s['label']}: {s['reason']}" for s in mode.get("skipped_cases", [])]
    return [f"{gpu.COPY_MODEL}.", *skipped]


def _load_line(mode: dict) -> str:
    load = mode.get("load_average") or {}
    start, end = load.get("start"), load.get("end")
    if not start or not end:
        return ""
    fmt = ", ".join
    return (
        f"Load average (1, 5, 15 min) at the start: {fmt(f'{v:.2f}' for v in start)}; "
        f"at the end: {fmt(f'{v:.2f}' for v in end)}."
    )


def _source_line(report: dict) -> str:
    source = report["machine"].get("normlab_source")
    if not source:
        return ""
    dirty = " with uncommitted changes" if source["uncommitted_changes"] else ""
    return f"normlab source: commit {source['commit'][:12]}{dirty}."


def _mode_title(mode: dict) -> str:
    check = mode.get("clone_speed_vs_copy")
    verified = "" if check is None else f"; clone runs at {check:.2f}x copy_ speed"
    return f"allocation: {mode['mode']} ({mode['description']}{verified})"


def _rich_table(title: str, header: list[str], rows: list[list[str]], right_from: int):
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for index, column in enumerate(header):
        table.add_column(column, justify="right" if index >= right_from else "left")
    for row in rows:
        table.add_row(*row)
    return table


def print_report(report: dict, console: Console) -> None:
    """The throughput, first-call and compile tables of every mode, on ``console``."""
    console.print(f"[bold]normlab bench[/bold]: {_machine_line(report)}")
    for mode in report["modes"].values():
        header = throughput_header(mode)
        console.print(_rich_table(_mode_title(mode), header, throughput_rows(mode), 2))
        for line in [_load_line(mode), *_device_lines(mode)]:
            if line:
                console.print(f"  {line}", style="dim")
    for note in THROUGHPUT_NOTES:
        console.print(f"  {note}", style="dim")
    for name, text in traffic.MODEL.items():
        console.print(f"  traffic, {name}: {text}", style="dim")
    for mode in report["modes"].values():
        title = f"first calls in a fresh process ({mode['mode']} allocation)"
        console.print(_rich_table(title, FIRST_CALL_HEADER, first_call_rows(mode), 3))
        compiles = compile_rows(mode)
        if compiles:
            title = f"torch.compile time ({mode['mode']} allocation)"
            console.print(_rich_table(title, COMPILE_HEADER, compiles, 2))


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The same tables as Markdown, with the machine, command and models."""
    parts = [
        f"Machine: {_machine_line(report)}.",
        f"Command: `{report['command']}` ({report['created']}).",
    ]
    if _source_line(report):
        parts.append(_source_line(report))
    for mode in report["modes"].values():
        throughput = _markdown_table(throughput_header(mode), throughput_rows(mode))
        parts += [f"### {_mode_title(mode)}", throughput]
        if _load_line(mode):
            parts.append(_load_line(mode))
        parts += _device_lines(mode)
    parts.append("\n".join(f"- {note}" for note in THROUGHPUT_NOTES))
    parts.append("\n".join(f"- traffic, {name}: {text}" for name, text in traffic.MODEL.items()))
    for mode in report["modes"].values():
        parts += [
            f"### First calls in a fresh process ({mode['mode']} allocation)",
            _markdown_table(FIRST_CALL_HEADER, first_call_rows(mode)),
        ]
        compiles = compile_rows(mode)
        if compiles:
            parts += [
                f"### torch.compile time ({mode['mode']} allocation)",
                _markdown_table(COMPILE_HEADER, compiles),
            ]
    return "\n\n".join(parts) + "\n"
