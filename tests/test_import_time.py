"""``import normlab`` stays light: it imports torch and NumPy, not Triton, Numba, the
torch.compile stack (torch._dynamo, sympy) or the ONNX exporter; each is imported at its
first use. Measured in fresh interpreters: which modules ``import normlab`` adds to those
``import torch`` already loaded (the deterministic guard), and how long it takes (a loose
regression bound, not a benchmark: the machine may be busy)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import normlab

# Heavy modules that normlab imports lazily (only those torch itself did not import count).
LAZY = ("triton", "numba", "torch._dynamo", "torch._inductor", "sympy", "torch.onnx")
BOUND_S = 1.0  # normlab's own import is ~0.1-0.3 s on an idle 2-core CPU machine

PROBE = """
import json, sys, time
start = time.perf_counter()
import torch
torch_s = time.perf_counter() - start
before = set(sys.modules)
start = time.perf_counter()
import normlab
normlab_s = time.perf_counter() - start
added = sorted(set(sys.modules) - before)
print(json.dumps({"torch_s": torch_s, "normlab_s": normlab_s, "added": added}))
"""


def _probe() -> dict:
    env = dict(os.environ)
    src = str(Path(normlab.__file__).parents[1])  # this checkout's normlab first
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    env.pop("TRITON_INTERPRET", None)  # as a user imports it
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _top(modules, name):
    return [m for m in modules if m == name or m.startswith(name + ".")]


def test_import_normlab_is_light():
    runs = [_probe() for _ in range(3)]
    added = set(runs[0]["added"])
    assert "normlab" in added and "normlab.functional" in added  # the probe measured it
    heavy = {name: _top(added, name) for name in LAZY if _top(added, name)}
    assert not heavy, f"import normlab imported {heavy}"
    assert not _top(added, "normlab.kernels.cpu.runtime")  # the Numba kernels: first use
    assert not _top(added, "transformers")
    cost = statistics.median(run["normlab_s"] for run in runs)
    torch_cost = statistics.median(run["torch_s"] for run in runs)
    assert cost <= BOUND_S, (
        f"import normlab took {cost:.2f} s after import torch ({torch_cost:.2f} s); "
        f"runs: {json.dumps(runs)[:2000]}"
    )


def test_lazy_pieces_still_load_when_used():
    """The first PowerNorm call (torch._dynamo.disable, imported then) and the Numba kernels
    run as before in a fresh interpreter."""
    code = """
import sys, torch, normlab
assert "torch._dynamo" not in sys.modules
m = normlab.PowerNorm(4, warmup_iters=1)  # steps 2 and 3 take the approximate backward
m.train()
x = torch.randn(8, 4)
for _ in range(3):
    m(x).sum().backward()
assert "torch._dynamo" in sys.modules  # imported by the first power_norm_approx call
assert torch.isfinite(m.weight.grad).all()
x = torch.randn(64, 16, 64)  # > AUTO_MIN_ELEMENTS, batch statistics: the Numba kernels
y = normlab.functional.batch_norm(x, None, None, training=True)
assert torch.isfinite(y).all()
print("ok", normlab.backends.last_used())
"""
    env = dict(os.environ)
    src = str(Path(normlab.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "ok"
    if normlab.backends.numba_available():  # "auto" took the Numba kernels: loaded on use
        assert out.stdout.split()[1] == "numba"
