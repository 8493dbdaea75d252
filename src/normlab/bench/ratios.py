"""Ratios from the recorded medians: how fast a contender is relative to a reference.

Every ratio is ``reference median time / contender median time`` (equivalently the
contender's GB/s over the reference's): above 1 the contender is faster. References, per
case and direction:

- ``copy``: ``src.clone()`` of half the traffic (the allocating copy, because every
  contender allocates its outputs; ``copy_`` into a preallocated buffer is reported too);
- ``eager``: the fastest plain-torch implementation (torch eager; for masked BatchNorm the
  faster plain-torch masked variant);
- ``compile``: the fastest ``torch.compile`` contender (of the same functions);
- ``two_pass``: BatchNorm training's two-pass bound on the CPU (``traffic.rereads``), where
  timed.
"""

from __future__ import annotations

from normlab.bench.measure import COPY_CLONE, COPY_INPLACE, TWO_PASS

COPY_REFERENCE = COPY_CLONE
COPIES = (COPY_INPLACE, COPY_CLONE, TWO_PASS)  # references, not contenders


def _fastest(timings: dict, contenders: dict, role: str) -> str | None:
    names = [n for n, r in contenders.items() if r.get("role") == role and n in timings]
    return min(names, key=lambda n: timings[n]["median_s"], default=None)


def direction_ratios(direction: dict, contenders: dict) -> None:
    """Add ``references`` and ``ratios`` to one direction's results, in place."""
    timings = direction["timings"]
    references = {
        "copy": COPY_REFERENCE,
        "eager": _fastest(timings, contenders, "eager"),
        "compile": _fastest(timings, contenders, "compile"),
        "two_pass": TWO_PASS if TWO_PASS in timings else None,
    }
    wanted = {"eager": ("copy",), "compile": ("copy", "eager"), "normlab": tuple(references)}
    ratios = {}
    for name, timing in timings.items():
        if name in COPIES:
            continue
        role = contenders[name]["role"]
        ratios[name] = {
            f"vs_{kind}": (
                None
                if references[kind] is None
                else timings[references[kind]]["median_s"] / timing["median_s"]
            )
            for kind in wanted[role]
        }
    direction["references"] = references
    direction["ratios"] = ratios


def allocation_check(mode: dict) -> float | None:
    """Median over cases and directions of ``copy_`` time / ``clone`` time: near 1 when
    allocating a fresh output costs nothing, well below 1 when its pages fault."""
    values = sorted(
        d["timings"][COPY_INPLACE]["median_s"] / d["timings"][COPY_CLONE]["median_s"]
        for case in mode["cases"]
        for d in case["directions"].values()
    )
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def add_ratios(mode: dict) -> dict:
    """Add the ratios of every case and direction of one mode's results, and its
    allocation check; returns ``mode``."""
    for case in mode["cases"]:
        for direction in case["directions"].values():
            direction_ratios(direction, case["contenders"])
    mode["clone_speed_vs_copy"] = allocation_check(mode)
    return mode
