"""The whole run: one fresh measuring process per allocation mode, progress, the report.

Each mode runs in a subprocess (``python -m normlab.bench --worker MODE``) started with
that mode's environment (``environment.environment_for``): glibc reads its tunables at
process start, and a fresh process also makes normlab's first-call latency real. The
subprocess reports progress as JSON lines on stdout and writes its results to a file.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import normlab
from normlab.bench import cases, environment, gpu, measure, ratios, table, traffic
from normlab.bench.options import Settings

SCHEMA = "normlab-bench/1"

TIMING_METHOD = {
    "forward": (
        "time of the op call alone, with autograd recording (inputs, weight and bias "
        "require grad, as in training); outputs are dropped after the timed region"
    ),
    "backward": (
        "each run: an untimed forward, then torch.autograd.grad(outputs, (input[, residual], "
        "weight[, bias]), output grads) timed alone, on a fresh graph (no retain_graph), so "
        "every contender is charged its own backward only, gradient allocation included"
    ),
    "rounds": (
        "warm-up rounds, then timed rounds; in every round each contender (and both copy "
        "references) runs once, in a fresh random order; Python's GC is paused"
    ),
    "statistic": "median over the timed rounds; spread: interquartile range (q3 - q1)",
    "allocation": (
        "every contender allocates its outputs (and gradients) in every run through torch's "
        "CPU allocator; the allocation modes change only glibc's behaviour, for all alike"
    ),
}


class WorkerError(RuntimeError):
    """A measuring subprocess failed."""


def _child_environment(mode: str) -> dict[str, str]:
    env = environment.environment_for(mode)
    source = str(Path(normlab.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    return env


def run_mode_in_subprocess(mode: str, settings: Settings, on_event: Callable[[dict], None]) -> dict:
    """Measure one allocation mode in a fresh process with that mode's environment."""
    with tempfile.TemporaryDirectory(prefix="normlab-bench-") as folder:
        out = Path(folder) / "mode.json"
        errors = Path(folder) / "stderr.txt"
        command = [sys.executable, "-m", "normlab.bench", "--worker", mode]
        command += ["--worker-out", str(out), *settings.child_arguments()]
        with open(errors, "w") as stderr:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=_child_environment(mode),
            )
            assert process.stdout is not None
            for line in process.stdout:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(event, dict):
                    on_event({**event, "mode": mode})
            code = process.wait()
        if code != 0 or not out.exists():
            tail = errors.read_text()[-4000:]
            raise WorkerError(f"the {mode!r} measuring process exited with {code}:\n{tail}")
        return json.loads(out.read_text())


def assemble(settings: Settings, modes: dict[str, dict]) -> dict:
    """The report: machine, settings, models, method, and every mode with its ratios."""
    for mode in modes.values():
        ratios.add_ratios(mode)
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["normlab", "bench", *settings.command]),
        "machine": {**environment.machine(), "gpu": gpu.device_name(settings.device)},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": sorted({mode["torch_threads"] for mode in modes.values()}),
        "settings": {
            "grid": settings.grid,
            "only": settings.only,
            "repetitions": settings.repetitions,
            "warmup": settings.warmup,
            "threads": settings.threads,
            "alloc": settings.alloc,
            "compile": settings.compile,
            "seed": settings.seed,
            "device": settings.device,
            "dtype": "float32" if settings.device == "cpu" else "per case (float32, bfloat16)",
        },
        "traffic_model": traffic.MODEL,
        "timing_method": TIMING_METHOD,
        "ratio_definition": (
            "reference median time / contender median time (above 1: contender faster); "
            f"copy reference: {ratios.COPY_REFERENCE}; eager and compile references: the "
            "fastest contender of that role"
        ),
        "modes": modes,
    }


def _progress_console():
    from rich.console import Console

    console = Console(stderr=False)
    if not console.is_terminal:
        console = Console(width=200)
    return console


def run(settings: Settings, console=None) -> dict:
    """Measure every allocation mode, print the tables, write the JSON (and Markdown)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or _progress_console()
    selected = cases.select(settings.grid, settings.only)
    modes_wanted = settings.allocation_modes()
    total = len(selected) * len(traffic.DIRECTIONS) * len(modes_wanted)
    modes: dict[str, dict] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("starting", total=total)

        def on_event(event: dict) -> None:
            label = f"[{event['mode']}] {event.get('label', '')} {event.get('phase', '')}"
            progress.update(task, description=label.strip())
            if event.get("event") == "step":
                progress.advance(task)

        for mode in modes_wanted:
            progress.update(task, description=f"[{mode}] starting a measuring process")
            modes[mode] = run_mode_in_subprocess(mode, settings, on_event)
    report = assemble(settings, modes)
    table.print_report(report, console)
    if settings.fold:
        report["fold_batchnorm"] = _measure_fold(settings, console)
    if settings.models:
        report["models"] = _measure_models(settings, console)
    if settings.json_path:
        Path(settings.json_path).write_text(json.dumps(report, indent=1) + "\n")
        console.print(f"results: {settings.json_path}")
    if settings.markdown_path:
        text = table.markdown(report)
        if "models" in report:
            from normlab.bench import models

            text += "\n### Whole models: converted vs unconverted\n\n"
            text += models.markdown(report["models"])
        Path(settings.markdown_path).write_text(text)
        console.print(f"tables: {settings.markdown_path}")
    return report


def _measure_in_process(settings: Settings, console, module, what: str) -> dict:
    """One of the in-process timings (``fold_speed``, ``models``): ``module.measure`` at the
    bench's threads, grid and repetitions, then its table."""
    import torch

    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        with console.status(f"timing {what}"):
            results = module.measure(
                settings.grid, settings.repetitions, settings.warmup, settings.seed
            )
    finally:
        torch.set_num_threads(threads)
    module.print_table(results, console)
    return results


def _measure_fold(settings: Settings, console) -> dict:
    """fold_batchnorm's inference speed-up (``fold_speed``), in this process."""
    from normlab.bench import fold_speed

    return _measure_in_process(settings, console, fold_speed, "fold_batchnorm (small CNN, MLP)")


def _measure_models(settings: Settings, console) -> dict:
    """Whole models converted vs unconverted (``models``), in this process."""
    from normlab.bench import models

    what = "whole models (Llama, BERT, ConvNeXt-style CNN)"
    return _measure_in_process(settings, console, models, what)


def run_worker(mode: str, settings: Settings, out_path: str) -> int:
    """The measuring subprocess: progress as JSON lines on stdout, results to a file."""

    def emit(event: dict) -> None:
        print(json.dumps(event), flush=True)

    selected = cases.select(settings.grid, settings.only)
    result = measure.measure_mode(selected, settings, mode, emit)
    Path(out_path).write_text(json.dumps(result))
    return 0
