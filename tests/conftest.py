"""Shared test setup: every test starts from seed 0 on its backend; some modules run on two
backends. Without a CUDA device, TRITON_INTERPRET=1 is set here, before anything imports
Triton (it reads the variable when its kernels are defined), so that the Triton kernels run
on CPU tensors in Triton's interpreter and their tests (test_triton_*.py) run in CI."""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # tests import tolerances.py and helpers

from normlab import backends
from normlab.backends import plans

# These modules specify the numbers every backend must produce: they run twice, once on
# "auto" (the Numba kernels wherever they take the call) and once on "composite".
BOTH_BACKENDS = {
    "test_against_reference_and_torch",
    "test_masked",
    "test_gradcheck",
    "test_batch_variants",
    "test_running_stats",
}


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__ in BOTH_BACKENDS and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", ["auto", "composite"], indirect=True)


@pytest.fixture
def backend(request):
    return getattr(request, "param", "auto")


@pytest.fixture(autouse=True)
def _seed_and_backend(backend, monkeypatch):
    """Every test starts from seed 0 on its backend. "auto" takes the kernels on inputs of
    any size here (the tests' inputs are small; the size rule has its own test)."""
    torch.manual_seed(0)
    monkeypatch.setattr(backends, "AUTO_MIN_ELEMENTS", 0)
    monkeypatch.setattr(backends, "AUTO_TORCH_ELEMENTS", (0, 0, 0))
    monkeypatch.setattr(backends, "AUTO_TORCH_TRAINING_ELEMENTS", (0, 0, 0))
    monkeypatch.setattr(backends, "AUTO_TORCH_COLUMN_ELEMENTS", (0, 0))
    monkeypatch.setattr(backends, "AUTO_TORCH_GIVEN_ELEMENTS", 0)
    plans.clear()  # a test may change what a family takes (availability, thresholds)
    with backends.use(backend):
        yield
