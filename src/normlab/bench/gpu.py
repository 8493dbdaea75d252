"""``normlab bench`` on a CUDA device: what differs from the CPU bench, in one place.

On CUDA (``--device cuda``, the default when a GPU is present) the bench runs the ``gpu``
grid of ``cases`` (the issue's: 32768 rows x {1024, 4096, 16384, 65536, 262144} features,
float32 and bfloat16, LayerNorm, RMSNorm and the fused adds) with the same contenders
(torch eager, torch.compile, normlab composite / "triton" / auto, a device copy) and the
same tables. The differences:

- timing with CUDA events around the timed region (``forward_runner``, ``backward_runner``,
  ``copy_runners``); first calls synchronize before reading the clock;
- the copy reference copies at most ``COPY_CAP_BYTES`` and its time is scaled to the full
  size (device copy bandwidth is flat far below that; a full-size copy of the largest cases
  would not fit next to the workload);
- cases whose working set (``working_set_bytes``) exceeds the free device memory are
  skipped, with the reason in the report (float32 x 262144 features needs about 200 GB);
  the agreement check keeps the first rows of each contender's outputs only;
- one allocation mode: glibc's tunables do not touch device memory.
"""

from __future__ import annotations

import contextlib
import math

import torch

from normlab.bench import timing, traffic
from normlab.bench.cases import Case

COPY_CAP_BYTES = 1 << 31

FUSED_BACKEND = {"cpu": "numba", "cuda": "triton"}
"""The fused-kernel backend normlab is timed with on each device."""

COPY_MODEL = (
    f"on CUDA the copies move min(half the traffic, {COPY_CAP_BYTES >> 30} GiB) and their "
    "times are scaled to half the traffic"
)


def resolve_device(name: str) -> str:
    """ "auto": "cuda" when a CUDA device is present, else "cpu"."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return name


def device_name(device: str) -> str | None:
    """The GPU's name and memory, for the report's machine line (None on the CPU)."""
    if device != "cuda":
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"


def working_set_bytes(case: Case) -> int:
    """A case's peak memory, roughly: its inputs and incoming gradients, one contender's
    outputs and input gradients, and two tensors of margin (saved statistics, compiled
    buffers, the allocator's rounding)."""
    fused = case.op in traffic.FUSED_ADD_OPS
    tensors = (4 if fused else 2) + 2 * (2 if fused else 1) + 2
    return tensors * math.prod(case.shape) * case.element_size


def fitting(cases: list[Case], device: str) -> tuple[list[Case], list[dict]]:
    """(the cases that fit in the free device memory, the others with the reason)."""
    if device != "cuda":
        return cases, []
    free, _ = torch.cuda.mem_get_info()
    kept, skipped = [], []
    for case in cases:
        needed = working_set_bytes(case)
        if needed > 0.9 * free:
            reason = f"needs about {needed / 1e9:.0f} GB, {free / 1e9:.0f} GB free"
            skipped.append({"label": case.label, "reason": reason})
        else:
            kept.append(case)
    return kept, skipped


AGREEMENT_ELEMENTS = 1 << 22


def kept_for_agreement(outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """What a contender keeps of its first outputs until they are compared with torch
    eager's: all of them on the CPU; on CUDA their first ``AGREEMENT_ELEMENTS`` elements
    (whole rows; rows are independent), since five contenders' full outputs of the largest
    cases would not fit in device memory next to the inputs."""
    if not outputs or outputs[0].device.type != "cuda":
        return outputs
    return tuple(t.detach().reshape(-1)[:AGREEMENT_ELEMENTS].clone() for t in outputs)


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def forward_runner(call: timing.Call, context: timing.ContextFactory, device: str, inner=1):
    """``timing.forward_runner``, timed with CUDA events on CUDA (one call a run there)."""
    if device != "cuda":
        return timing.forward_runner(call, context, inner)

    def run() -> float:
        start, end = _events()
        with context():
            start.record()
            outputs = call()
            end.record()
        end.synchronize()
        del outputs
        return start.elapsed_time(end) / 1e3

    return run


def backward_runner(
    call, inputs, output_grads, context: timing.ContextFactory, device: str, inner=1
):
    """``timing.backward_runner``, timed with CUDA events on CUDA (one call a run there)."""
    if device != "cuda":
        return timing.backward_runner(call, inputs, output_grads, context, inner)

    def run() -> float:
        start, end = _events()
        with context():
            outputs = call()
            start.record()
            grads = torch.autograd.grad(outputs, inputs, output_grads)
            end.record()
        end.synchronize()
        del grads, outputs
        return start.elapsed_time(end) / 1e3

    return run


def copy_runners(
    copy_bytes: int, device: str, inner: int = 1
) -> tuple[timing.Runner, timing.Runner]:
    """The two copy references of ``copy_bytes`` on ``device``: ``copy_`` into a
    preallocated buffer and ``clone``; on CUDA capped at ``COPY_CAP_BYTES`` and scaled."""
    if device != "cuda":
        source = torch.randn(max(1, copy_bytes // 4))
        return timing.copy_runner(source, torch.empty_like(source), inner), timing.copy_runner(
            source, None, inner
        )
    elements = min(copy_bytes, COPY_CAP_BYTES) // 4
    scale = copy_bytes / (4 * elements)
    source = torch.randn(elements, device=device)
    destination = torch.empty_like(source)

    def runner(copy) -> timing.Runner:
        def run() -> float:
            start, end = _events()
            start.record()
            result = copy()
            end.record()
            end.synchronize()
            del result
            return start.elapsed_time(end) / 1e3 * scale

        return run

    return runner(lambda: destination.copy_(source)), runner(source.clone)


def timed_once(fn, device: str):
    """``timing.timed_once``, waiting for the device before reading the clock."""
    if device != "cuda":
        return timing.timed_once(fn)
    torch.cuda.synchronize()

    def synchronized():
        result = fn()
        torch.cuda.synchronize()
        return result

    return timing.timed_once(synchronized)


@contextlib.contextmanager
def released(device: str):
    """Return the case's device memory to the driver after it (the next case may need
    most of it)."""
    try:
        yield
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
