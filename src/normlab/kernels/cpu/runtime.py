"""What every Numba kernel shares: the on-disk cache location, the thread count, the
compile flags and the fixed partial-sum chunking that makes reductions deterministic."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _writable(path: Path) -> bool:
    """True if a file can be created in ``path`` (created if missing)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def _choose_cache_dir() -> str | None:
    """Numba caches next to the source (``__pycache__``), else in the user's cache
    directory. When the package is installed read-only and the home directory is not
    writable either (containers, shared installs) caching would fail at the first call, so
    fall back to a per-user folder in the temporary directory. None: Numba's own choice."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    if _writable(Path(__file__).parent / "__pycache__"):
        return None
    user_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    for candidate in (
        user_cache / "normlab" / "numba",
        Path(tempfile.gettempdir()) / f"normlab-numba-{os.getuid()}",
    ):
        if _writable(candidate):
            return str(candidate)
    return None


_CACHE_DIR = _choose_cache_dir()
if _CACHE_DIR is not None:
    os.environ["NUMBA_CACHE_DIR"] = _CACHE_DIR

import numba  # noqa: E402  (after NUMBA_CACHE_DIR is decided)

if _CACHE_DIR is not None:
    numba.config.CACHE_DIR = _CACHE_DIR

# No "nnan"/"ninf": NaN and Inf in the input must propagate. "reassoc" lets LLVM vectorize
# the reductions (the order is fixed at compile time, so results stay deterministic).
FASTMATH = {"reassoc", "contract"}

# Reductions across rows (dweight, dbias, BatchNorm's per-channel sums) are split into at
# most CHUNKS fixed blocks of rows, each summed by one thread, then the partial sums are
# added in block order: the result does not depend on the thread count or scheduling.
CHUNKS = 64


def kernel(fn):
    """A parallel, cached Numba kernel with the shared flags."""
    return numba.njit(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)(fn)


def serial(fn):
    """A serial helper inlined into kernels (same flags, no parallel region)."""
    return numba.njit(cache=True, fastmath=FASTMATH, nogil=True, inline="always")(fn)


def serial_kernel(fn):
    """A cached Numba kernel that runs on the calling thread (same flags, no parallel
    region): for inputs too small to pay for waking the pool."""
    return numba.njit(cache=True, fastmath=FASTMATH, nogil=True)(fn)


# Below this many elements a kernel runs on one thread: waking the others costs more than
# the work (and much more on a loaded machine, where a sleeping thread delays the barrier).
PARALLEL_MIN_ELEMENTS = 1 << 15


_launched = False


def _launch_pool_keeping_torch_threads(torch) -> None:
    """Start Numba's thread pool once, explicitly. With the OpenMP layer (the one torch
    also uses) starting the pool calls omp_set_num_threads(NUMBA_NUM_THREADS), which would
    silently undo the user's ``torch.set_num_threads``: put it back."""
    global _launched
    if _launched:
        return
    from numba.np.ufunc import parallel

    threads = torch.get_num_threads()
    parallel._launch_threads()
    torch.set_num_threads(threads)
    _launched = True


def sync_threads(elements: int | None = None) -> int:
    """Numba uses as many threads as torch (``torch.set_num_threads``), capped by the
    threads Numba started with; one thread for a kernel over fewer than
    ``PARALLEL_MIN_ELEMENTS`` elements. Returns the count in use."""
    import torch

    _launch_pool_keeping_torch_threads(torch)
    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if elements is not None and elements < PARALLEL_MIN_ELEMENTS:
        wanted = 1
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    return wanted


def chunk_bounds(rows: int, chunks: int = CHUNKS):
    """(count, size): rows split into ``count`` blocks of ``size`` rows (the last shorter)."""
    size = max(1, -(-rows // chunks))
    return -(-rows // size) if rows else 0, size
