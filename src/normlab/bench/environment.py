"""The machine and the allocation modes.

glibc serves allocations above ``M_MMAP_THRESHOLD`` (128 KiB, raised dynamically up to
32 MiB) with fresh ``mmap`` and gives freed heap tops back above ``M_TRIM_THRESHOLD``: on
these VMs a tensor-sized output is then new memory each time, and its first touch
page-faults. The bench measures in two environments, each in its own fresh process:

- ``default``: glibc's defaults (any ``GLIBC_TUNABLES``/``MALLOC_*`` settings inherited
  from the caller are removed), which is what a user's training script gets;
- ``retained``: glibc tunables set so freed memory stays in the process (no mmap for
  large blocks, no trimming, a large top pad), so allocation is not the bottleneck.

In both, every contender allocates its outputs through torch's CPU allocator in every run;
only the preallocated ``copy_`` reference does not, and it is never used for a ratio.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

ALLOCATION_MODES = ("default", "retained")

RETAINED_TUNABLES = (
    "glibc.malloc.mmap_max=0"
    ":glibc.malloc.trim_threshold=68719476736"  # 64 GiB: never give the heap top back
    ":glibc.malloc.top_pad=268435456"  # grow the heap 256 MiB at a time
)

_MALLOC_VARIABLES = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_ARENA_MAX",
)

DESCRIPTION = {
    "default": "glibc defaults: large freed blocks go back to the OS, fresh outputs page-fault",
    "retained": f"GLIBC_TUNABLES={RETAINED_TUNABLES}: freed memory stays in the process",
}


def _without_malloc_tunables(tunables: str) -> str:
    kept = [t for t in tunables.split(":") if t and not t.startswith("glibc.malloc.")]
    return ":".join(kept)


def environment_for(mode: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The process environment for allocation ``mode``, derived from ``base``
    (default: this process's environment)."""
    if mode not in ALLOCATION_MODES:
        raise ValueError(f"allocation mode must be one of {ALLOCATION_MODES}, got {mode!r}")
    env = dict(os.environ if base is None else base)
    for name in _MALLOC_VARIABLES:
        env.pop(name, None)
    other = _without_malloc_tunables(env.pop("GLIBC_TUNABLES", ""))
    if mode == "retained":
        other = f"{other}:{RETAINED_TUNABLES}" if other else RETAINED_TUNABLES
    if other:
        env["GLIBC_TUNABLES"] = other
    return env


def allocation_settings() -> dict[str, str | None]:
    """The allocator-related variables this process runs with."""
    names = ("GLIBC_TUNABLES", *_MALLOC_VARIABLES)
    return {name: os.environ.get(name) for name in names if os.environ.get(name) is not None}


def cpu_model() -> str:
    """The ``model name`` of /proc/cpuinfo (else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _transparent_hugepages() -> str | None:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return None


def source_revision() -> dict[str, object] | None:
    """The git commit of the normlab source tree and whether it has uncommitted changes
    (None outside a git checkout)."""
    import subprocess

    import normlab

    folder = Path(normlab.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "."],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "uncommitted_changes": bool(status.stdout.strip())}


def machine() -> dict[str, object]:
    """What the numbers depend on: CPU, cores, library versions, glibc, huge pages."""
    import torch

    import normlab

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    glibc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": _version("numba"),
        "numpy": _version("numpy"),
        "normlab": normlab.__version__,
        "normlab_source": source_revision(),
        "glibc": glibc,
        "kernel": platform.release(),
        "transparent_hugepages": _transparent_hugepages(),
    }
