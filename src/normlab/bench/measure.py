"""One allocation mode, measured in this process: every case, both directions, every
contender.

Per case: each contender is prepared with one first call (forward and backward, timed:
normlab's first-call latency, torch.compile's compile time), which also checks that it
runs and agrees with the baseline; then per direction all contenders that run, and the
two copy references, are timed in interleaved rounds (``timing.interleaved``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from normlab import backends
from normlab.bench import environment, gpu, timing, traffic
from normlab.bench.cases import Case
from normlab.bench.contenders import Implementation, Workload, build_workload
from normlab.bench.options import Settings

NORMLAB_BACKENDS = ("composite", "numba", "auto")
"""normlab's contenders, in the order of their first calls within a process: the forced
Numba backend pays the JIT compile (or cache load) before "auto" runs."""


def normlab_backends(device: str) -> tuple[str, ...]:
    """normlab's contenders on ``device``: the fused backend is Triton on CUDA."""
    return ("composite", gpu.FUSED_BACKEND[device], "auto")


COPY_INPLACE = "copy_"
COPY_CLONE = "clone"
TWO_PASS = "two-pass"  # BatchNorm training's bound on the CPU (``traffic.rereads``)
TORCH_COMPILE = "torch.compile"

Emit = Callable[[dict], None]


@dataclass
class Contender:
    """A prepared contender: how to call it, and what is known of it so far (``record``,
    written into the JSON: role, status, note, backend, first-call times)."""

    name: str
    role: str
    call: Callable[[], tuple[torch.Tensor, ...]] | None = None
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    record: dict = field(default_factory=dict)
    outputs: tuple[torch.Tensor, ...] | None = None

    @property
    def ok(self) -> bool:
        return self.record.get("status") == "ok"


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _first_call(contender: Contender, workload: Workload):
    """Run ``contender`` once forward and once backward, timed; returns the outputs and
    the backend normlab reported after the forward."""
    device = workload.differentiable[0].device.type
    with contender.context():
        forward_s, outputs = gpu.timed_once(contender.call, device)
        backend = backends.last_used()
        backward_s = None
        if not workload.case.inference:
            backward_s, _ = gpu.timed_once(
                lambda: torch.autograd.grad(
                    outputs, workload.differentiable, workload.output_grads
                ),
                device,
            )
    return outputs, backend, forward_s, backward_s


def _normlab_contender(workload: Workload, backend: str) -> Contender:
    contender = Contender(
        f"normlab {backend}",
        "normlab",
        workload.normlab.bind(),
        lambda: backends.use(backend),
        {"role": "normlab", "backend_requested": backend},
    )
    try:
        outputs, ran, forward_s, backward_s = _first_call(contender, workload)
    except ValueError as error:
        contender.record.update(status="unavailable", note=_short(error))
        return contender
    except Exception as error:  # a contender's failure must not end the run
        contender.record.update(status="failed", note=_short(error))
        return contender
    contender.record.update(first_forward_s=forward_s, first_backward_s=backward_s)
    contender.record["backend_ran"] = ran
    if backend in gpu.FUSED_BACKEND.values() and ran != backend:
        contender.record.update(
            status="unavailable",
            note=f"backend {backend!r} requested, normlab.backends.last_used() reported {ran!r}",
        )
        return contender
    contender.record["status"] = "ok"
    contender.outputs = gpu.kept_for_agreement(outputs)
    return contender


def _baseline_contender(name: str, implementation: Implementation, workload: Workload):
    contender = Contender(
        name, "eager", implementation.bind(), record={"role": "eager", "backend_ran": "torch"}
    )
    try:
        outputs, _, forward_s, backward_s = _first_call(contender, workload)
    except Exception as error:
        contender.record.update(status="failed", note=_short(error))
        return contender
    contender.record.update(status="ok", first_forward_s=forward_s, first_backward_s=backward_s)
    contender.outputs = gpu.kept_for_agreement(outputs)
    return contender


def _compiled_contender(name: str, implementation: Implementation, workload: Workload):
    compiled_name = TORCH_COMPILE if name == "torch eager" else f"{TORCH_COMPILE} {name}"
    record = {"role": "compile", "backend_ran": "torch.compile (inductor)", "compiles": name}
    contender = Contender(compiled_name, "compile", record=record)
    try:
        contender.call = implementation.bind(torch.compile(implementation.fn, dynamic=False))
        outputs, _, forward_s, backward_s = _first_call(contender, workload)
    except Exception as error:
        contender.record.update(
            status="failed", note=f"torch.compile failed, skipped: {_short(error)}"
        )
        return contender
    contender.record.update(status="ok", compile_forward_s=forward_s, compile_backward_s=backward_s)
    contender.outputs = gpu.kept_for_agreement(outputs)
    return contender


def _check_agreement(contenders: list[Contender]) -> None:
    """Record each contender's largest difference from the first baseline's output."""
    reference = next((c for c in contenders if c.role == "eager" and c.ok), None)
    if reference is None:
        return
    expected = reference.outputs
    for contender in contenders:
        if contender.ok and contender is not reference:
            diffs = [
                float((got.detach() - want.detach()).abs().max()) if got.numel() else 0.0
                for got, want in zip(contender.outputs, expected, strict=True)
            ]
            contender.record["max_abs_diff"] = max(diffs)
            contender.record["compared_with"] = reference.name
    for contender in contenders:
        contender.outputs = None  # free them before timing


def prepare(workload: Workload, settings: Settings) -> list[Contender]:
    """Every contender of ``workload``, first-called (normlab in ``NORMLAB_BACKENDS``
    order, the baselines, then their torch.compile versions unless disabled)."""
    inference = workload.case.inference
    with torch.inference_mode() if inference else contextlib.nullcontext():
        contenders = [
            _normlab_contender(workload, backend) for backend in normlab_backends(settings.device)
        ]
        for name, implementation in workload.baselines.items():
            contenders.append(_baseline_contender(name, implementation, workload))
        for name, implementation in workload.baselines.items():
            if settings.compile:
                contenders.append(_compiled_contender(name, implementation, workload))
            else:
                compiled = TORCH_COMPILE if name == "torch eager" else f"{TORCH_COMPILE} {name}"
                record = {"role": "compile", "status": "skipped", "note": "--no-compile"}
                contenders.append(Contender(compiled, "compile", record=record))
    _check_agreement(contenders)
    if inference:
        for contender in contenders:
            contender.context = _in_inference_mode(contender.context)
    return contenders


def _in_inference_mode(context):
    """``context`` entered inside ``torch.inference_mode`` (an inference case's timing)."""

    @contextlib.contextmanager
    def both():
        with torch.inference_mode(), context():
            yield

    return both


def _runners(contenders, workload: Workload, case: Case, direction: str, device: str):
    moved = traffic.traffic_bytes(case, direction)
    inner = timing.inner_calls(moved) if device == "cpu" else 1
    runners = {}
    for c in contenders:
        if not c.ok:
            continue
        if direction == "forward":
            runners[c.name] = gpu.forward_runner(c.call, c.context, device, inner)
        else:
            runners[c.name] = gpu.backward_runner(
                c.call, workload.differentiable, workload.output_grads, c.context, device, inner
            )
    # The references: a copy of half the traffic (read n bytes, write n bytes).
    runners[COPY_INPLACE], runners[COPY_CLONE] = gpu.copy_runners(moved // 2, device, inner)
    reread = traffic.rereads(case, direction) * math.prod(case.shape) * case.element_size
    if reread and device == "cpu":  # a second read of the input: the two-pass bound
        runners[TWO_PASS] = timing.two_pass_runner(
            torch.randn(reread // 4), torch.randn(max(1, moved // 8)), inner
        )
    return runners


def measure_direction(contenders, workload, case, direction, settings, seed) -> dict:
    """Interleaved timing of every running contender and both copies in ``direction``."""
    apply_threads(settings)
    runners = _runners(contenders, workload, case, direction, settings.device)
    samples = timing.interleaved(runners, settings.repetitions, settings.warmup, seed)
    moved = traffic.traffic_bytes(case, direction)
    results = {}
    for name, seconds in samples.items():
        summary = timing.summarize(seconds)
        summary["gbps"] = moved / summary["median_s"] / 1e9
        summary["times_s"] = seconds
        results[name] = summary
    return {
        "torch_threads": torch.get_num_threads(),  # in effect at the end of the timing
        "calls_per_run": timing.inner_calls(moved) if settings.device == "cpu" else 1,
        "traffic_bytes": moved,
        "traffic_model": traffic.MODEL[traffic.model_name(case, direction)],
        "timings": results,
    }


def measure_case(case: Case, settings: Settings, seed: int, emit: Emit) -> dict:
    """One case: prepare the contenders, time both directions."""
    torch.compiler.reset()  # each case compiles afresh (and stays under dynamo's cache limit)
    emit({"event": "phase", "label": case.label, "phase": "first calls and compile"})
    workload = build_workload(case, settings.seed, settings.device)
    contenders = prepare(workload, settings)
    result = {
        "op": case.op,
        "label": case.label,
        "shape": list(case.shape),
        "variant": case.variant,
        "dtype": case.dtype,
        "layout": case.layout,
        "channel_dim": case.channel_dim,
        "training": case.training,
        "inference": case.inference,  # forward only, under torch.inference_mode
        "padding": case.padding,
        "contenders": {c.name: c.record for c in contenders},
        "copies": {
            COPY_INPLACE: "dst.copy_(src), preallocated destination",
            COPY_CLONE: "src.clone(), allocating (as every contender allocates its outputs)",
            TWO_PASS: traffic.MODEL["two-pass bound"] + " (BatchNorm training on the CPU)",
        },
        "directions": {},
    }
    for direction in ("forward",) if case.inference else traffic.DIRECTIONS:
        emit({"event": "phase", "label": case.label, "phase": direction})
        result["directions"][direction] = measure_direction(
            contenders, workload, case, direction, settings, seed
        )
        emit({"event": "step", "label": case.label, "direction": direction})
    return result


def _first_calls(case_results: list[dict], normlab: tuple[str, ...]) -> list[dict]:
    """Per op, normlab's first calls in this process (the first case of each op), for the
    ``normlab`` backends."""
    rows, seen = [], set()
    for case in case_results:
        if case["op"] in seen:
            continue
        seen.add(case["op"])
        for backend in normlab:
            record = case["contenders"][f"normlab {backend}"]
            rows.append(
                {
                    "op": case["op"],
                    "case": case["label"],
                    "backend_requested": backend,
                    "backend_ran": record.get("backend_ran"),
                    "status": record["status"],
                    "first_forward_s": record.get("first_forward_s"),
                    "first_backward_s": record.get("first_backward_s"),
                    "steady_forward_s": case["directions"]["forward"]["timings"]
                    .get(f"normlab {backend}", {})
                    .get("median_s"),
                }
            )
    return rows


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: other work on the machine during the run."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _threads_used(case_results: list[dict]) -> int:
    """The thread count of the timings (the largest, should they differ)."""
    counts = [d["torch_threads"] for c in case_results for d in c["directions"].values()]
    return max(counts, default=torch.get_num_threads())


def apply_threads(settings: Settings) -> None:
    """Set torch's thread count to ``settings.threads`` (if given). Applied again before
    each timing: starting a Numba OpenMP pool can reset the OpenMP thread count that
    torch reads."""
    if settings.threads is not None and torch.get_num_threads() != settings.threads:
        torch.set_num_threads(settings.threads)


def measure_mode(cases: list[Case], settings: Settings, mode: str, emit: Emit | None = None):
    """Measure ``cases`` in this process, labelling the result with allocation ``mode``
    (the caller is responsible for this process's environment matching it)."""
    emit = emit or (lambda event: None)
    apply_threads(settings)
    load_before = _load_average()
    cases, skipped = gpu.fitting(cases, settings.device)
    case_results = []
    for index, case in enumerate(cases):
        with gpu.released(settings.device):
            case_results.append(measure_case(case, settings, settings.seed + index, emit))
    normlab = normlab_backends(settings.device)
    return {
        "mode": mode,
        "device": settings.device,
        "gpu": gpu.device_name(settings.device),
        "normlab_backends": list(normlab),
        "skipped_cases": skipped,
        "description": environment.DESCRIPTION.get(mode, mode),
        "allocation_settings": environment.allocation_settings(),
        "torch_threads": _threads_used(case_results),
        "load_average": {"start": load_before, "end": _load_average()},
        "first_calls": _first_calls(case_results, normlab),
        "cases": case_results,
    }
