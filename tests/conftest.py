import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests import tolerances.py and helpers

from normlab import backends

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
def _seed_and_backend(backend):
    torch.manual_seed(0)
    with backends.use(backend):
        yield
