"""Fuzz the public API: ``normlab.functional`` and the module constructors, with arbitrary
shapes, dtypes, layouts and argument values.

A case is a valid call (``strategies.calls``) with up to three of its arguments replaced by
something arbitrary (a wrong shape, dtype, type or value), or a module built from arbitrary
constructor arguments and called on an input. The rule for every case:

- it raises a ValueError or TypeError whose message is not empty, raised by normlab's own
  checks (the functional, module, axes, masks and checks layers), before any kernel runs;
  an out-of-range axis is an IndexError from ``normlab.axes``, as in torch;
- or it succeeds, and then its outputs, updated running statistics and gradients equal the
  float64 reference (``tests/oracle.py``) of the same arguments.

Anything else is a finding: another exception type (a RuntimeError or IndexError from
torch or a kernel, an AttributeError...), an error raised inside ``normlab.ops`` or
``normlab.kernels``, an empty message, a wrong number, or a call the reference refuses.

CI runs a bounded number of cases (tests/test_fuzz_api.py); a campaign runs as

    python -m tests.fuzz_api --cases 5000 [--seconds 1800] [--backend auto]

and prints the number of cases run, how many succeeded and raised, and every finding.
"""

from __future__ import annotations

import argparse
import faulthandler
import inspect
import math
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))  # as a script: import the helpers beside it

import normlab
import oracle
import strategies as S
from normlab import backends
from normlab import functional as F
from tolerances import grad_tol, tol

SRC = Path(normlab.__file__).parent
# Where a user error may be raised: the API layers, never the ops or the kernels.
CHECK_LAYERS = ("functional", "modules", "axes.py", "masks.py", "checks.py", "backends")

# A backend's rounding errors grow with the conditioning of the call; the reference moved by
# a perturbation of the input of the accumulation dtype's epsilon, times this, bounds them.
CONDITIONING_FACTOR = 16


class Finding(AssertionError):
    """A case broke the rule (see the module docstring)."""


# ----------------------------------------------------------------------------------------------
# Checking one successful call against the reference


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _assert_close(actual, expected, tolerance, extra, what):
    if np.size(expected):  # beyond the dtype's range the value is an infinity there
        big = np.abs(expected) > torch.finfo(actual.dtype).max
        expected = np.where(big, np.sign(expected) * np.inf, expected)
    actual = oracle.f64(actual)
    if actual.shape != np.shape(expected):
        raise Finding(f"{what}: shape {actual.shape}, reference {np.shape(expected)}")
    atol = tolerance["atol"] + CONDITIONING_FACTOR * extra
    close = np.isclose(actual, expected, rtol=tolerance["rtol"], atol=atol, equal_nan=True)
    if not close.all():
        where = np.argwhere(~close)[0]
        raise Finding(
            f"{what}: {int((~close).sum())} of {close.size} differ from the reference, e.g. at "
            f"{tuple(int(i) for i in where)}: {actual[tuple(where)]!r} vs "
            f"{np.asarray(expected)[tuple(where)]!r} (atol {atol:.3g}, rtol {tolerance['rtol']})"
        )


def _spread(a, b):
    """The largest finite difference of two reference results (0 where either is absent)."""
    if a is None or b is None or np.size(a) == 0:
        return 0.0
    d = np.abs(np.asarray(a) - np.asarray(b))
    d = d[np.isfinite(d)]
    return float(d.max()) if d.size else 0.0


def check_call(fn: str, args: dict, rng: np.random.Generator, backward: bool = True) -> None:
    """Run ``normlab.functional.<fn>(**args)`` and compare everything it produces with the
    reference. Raises Finding on a mismatch, or when the call succeeds on arguments the
    reference refuses; an exception of the call itself propagates."""
    x = args["input"]
    try:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        want = oracle.expected(fn, args)
        near = oracle.expected(fn, oracle.perturbed(args, torch.finfo(acc).eps, rng))
        refused = None
    except Exception as error:  # the call must refuse these arguments too
        refused = error
    result = _outputs(getattr(F, fn)(**args))
    if refused is not None:
        raise Finding(f"{fn} accepted arguments the reference refuses: {refused!r}")
    if len(result) != len(want.outputs):
        raise Finding(f"{fn} returned {len(result)} outputs, expected {len(want.outputs)}")
    for i, (out, ref, ref_near) in enumerate(zip(result, want.outputs, near.outputs, strict=True)):
        if out.dtype != x.dtype:
            raise Finding(f"{fn} output {i} has dtype {out.dtype}, input {x.dtype}")
        _assert_close(out, ref, tol(x.dtype), _spread(ref, ref_near), f"{fn} output {i}")
    for name, ref in want.buffers.items():
        buffer = args[name]
        _assert_close(buffer, ref, tol(buffer.dtype), _spread(ref, near.buffers.get(name)), name)
    differentiable = [
        name
        for name in ("input", "residual", "weight", "bias")
        if isinstance(args.get(name), torch.Tensor) and args[name].requires_grad
    ]
    if not backward or not differentiable or want.gradients is None:
        return
    dys = [torch.from_numpy(rng.standard_normal(tuple(out.shape))).to(out.dtype) for out in result]
    try:  # through the outputs that have a graph (add_*'s sum has none without input grads)
        torch.autograd.backward(
            [out for out in result if out.requires_grad],
            [dy for out, dy in zip(result, dys, strict=True) if out.requires_grad],
        )
    except Exception as error:
        raise Finding(f"{fn}: the forward succeeded, its backward raised {error!r}") from error
    upstream = [
        oracle.f64(dy) if out.requires_grad else 0 * oracle.f64(dy)
        for out, dy in zip(result, dys, strict=True)
    ]
    grads, grads_near = want.gradients(*upstream), near.gradients(*upstream)
    for name in differentiable:
        actual = args[name].grad
        if actual is None:
            raise Finding(f"{fn}: no gradient for {name}")
        extra = _spread(grads[name], grads_near[name])
        coarser = max(x.dtype, actual.dtype, key=lambda d: torch.finfo(d).eps)
        _assert_close(actual, grads[name], grad_tol(coarser), extra, f"{fn} gradient of {name}")
    for name, ref in want.after_backward.items():
        buffer = args[name]
        extra = _spread(ref, near.after_backward.get(name))
        _assert_close(buffer, ref, grad_tol(buffer.dtype), extra, f"{name} after backward")


def check_error(error: BaseException) -> None:
    """A refused call: a ValueError/TypeError (IndexError for an axis, from normlab.axes)
    with a message, raised by normlab's API layers. Anything else raises Finding."""
    if isinstance(error, Finding):
        raise error
    frames = traceback.extract_tb(error.__traceback__)
    origin = Path(frames[-1].filename) if frames else Path("?")
    where = f"{origin}:{frames[-1].lineno}" if frames else "?"
    try:
        layer = origin.resolve().relative_to(SRC.resolve()).parts[0]
    except ValueError:
        layer = None  # raised outside normlab: torch, NumPy, Numba, Python
    documented = isinstance(error, (ValueError, TypeError)) or (
        isinstance(error, IndexError) and layer == "axes.py"
    )
    if not documented or layer not in CHECK_LAYERS or not str(error).strip():
        raise Finding(f"{type(error).__name__} raised at {where}: {error}") from error


# ----------------------------------------------------------------------------------------------
# Arbitrary arguments

TENSOR_ARGS = (
    "input",
    "residual",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "running_phi",
    "running_grad_stat",
    "mask",
    "lengths",
)
FLOAT_ARGS = ("eps", "momentum", "r_max", "d_max", "alpha_bkw")
INT_ARGS = ("dim", "num_groups", "virtual_batch_size")
BOOL_ARGS = ("training", "use_input_stats", "warmup")

inf = float("inf")
ARBITRARY_FLOATS = (
    0.0,
    -1.0,
    -1e-5,
    float("nan"),
    inf,
    -inf,
    1e30,
    1e-30,
    2,
    True,
    None,
    "0.1",
    np.float32(0.1),
    torch.tensor(0.1),
    torch.tensor([0.1, 0.2]),
    1 + 1j,
)
ARBITRARY_INTS = (0, 1, -1, 2, -2, 3, 5, 100, -100, 1.0, 2.5, True, False, None, "1", (1,), [0, 1])
ARBITRARY_INTS += (np.int64(1), torch.tensor(1))
ARBITRARY_SHAPES = ((), 0, -1, (0,), (2, 3), [3], torch.Size([3]), 3.0, "3", None, (True,))
ARBITRARY_SHAPES += (np.int64(3), (1, 1, 1, 1, 1), (3, -3), [[3]])
ARBITRARY_BOOLS = (0, 1, None, "yes", torch.tensor(True), np.bool_(True), 2.0)
OTHER_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
    torch.complex64,
)


@st.composite
def arbitrary_tensor(draw, like, nan=True):
    """Something in place of a tensor argument: not a tensor, another dtype, rank or size,
    a 0-dim or empty tensor, NaN values."""
    rng = np.random.default_rng(draw(S.seeds))
    shape = list(like.shape) if isinstance(like, torch.Tensor) else [3]
    kind = draw(
        st.sampled_from(
            ["none", "list", "numpy", "scalar", "dtype", "rank", "size", "0-dim", "empty"]
            + ["nan"] * nan
        )
    )
    values = lambda s: np.asarray(rng.standard_normal(tuple(s)) + 1.5)  # noqa: E731
    dtype = like.dtype if isinstance(like, torch.Tensor) else torch.float32
    if kind == "none":
        return None
    if kind == "list":
        return values(shape).tolist()
    if kind == "numpy":
        return values(shape)
    if kind == "scalar":
        return 1.5
    if kind == "dtype":
        dtype = draw(st.sampled_from(OTHER_DTYPES))
        return torch.from_numpy(np.abs(values(shape)) * 3).to(dtype)
    if kind == "rank":
        shape = shape[1:] if shape and draw(st.booleans()) else [*shape, draw(st.integers(1, 3))]
    elif kind == "size" and shape:
        axis = draw(st.integers(0, len(shape) - 1))
        shape[axis] = draw(st.sampled_from([0, 1, shape[axis] + 1, 2 * shape[axis] + 3]))
    elif kind == "0-dim":
        shape = []
    elif kind == "empty":
        shape = [*shape[:-1], 0] if shape else [0]
    t = torch.from_numpy(values(shape))
    if kind == "nan" and t.numel():
        t.view(-1)[0] = float("nan")
    if dtype == torch.bool:
        return t > 1.5
    return t.to(dtype)


def _is_equal(value, number) -> bool:
    return isinstance(value, float) and value == number


def _replacement(draw, name, current):
    if name in TENSOR_ARGS:
        # Not NaN in PowerNorm's nu: at padded positions the backward selects nu * xhat
        # away where the reference multiplies it by 0 (NaN either way is garbage in).
        return draw(arbitrary_tensor(current, nan=name != "running_grad_stat"))
    if name == "momentum":  # an infinite factor gives inf - inf: NaN or inf, both garbage
        finite = [v for v in ARBITRARY_FLOATS if not (isinstance(v, float) and math.isinf(v))]
        return draw(st.sampled_from(finite))
    if name == "offset":  # 1e30 + weight overflows a half output: garbage in, as such a weight
        return draw(st.sampled_from([v for v in ARBITRARY_FLOATS if not _is_equal(v, 1e30)]))
    if name in FLOAT_ARGS:
        return draw(st.sampled_from(ARBITRARY_FLOATS))
    if name in INT_ARGS:
        return draw(st.sampled_from(ARBITRARY_INTS))
    if name == "normalized_shape":
        return draw(st.sampled_from(ARBITRARY_SHAPES))
    return draw(st.sampled_from(ARBITRARY_BOOLS))


@st.composite
def fuzz_calls(draw, max_size=6, long_axis=200):
    """A valid call (any dtype, layout, shape up to a long axis) with 0-3 of its arguments,
    any of the functional's parameters, replaced by something arbitrary."""
    fn, args = draw(S.calls(max_size=max_size, long_axis=long_axis))
    parameters = list(inspect.signature(getattr(F, fn)).parameters)
    for name in draw(st.lists(st.sampled_from(parameters), max_size=3, unique=True)):
        args[name] = _replacement(draw, name, args.get(name))
    return fn, args


def run_call(fn: str, args: dict, seed: int) -> str:
    """One fuzz case of the functional API: "ok" (matches the reference) or "refused" (a
    documented error); raises Finding otherwise."""
    rng = np.random.default_rng(seed)
    try:
        check_call(fn, args, rng)
    except Exception as error:
        check_error(error)
        return "refused"
    return "ok"


# ----------------------------------------------------------------------------------------------
# The campaign: python -m tests.fuzz_api --cases N


def _describe(fn, args):
    def show(v):
        if isinstance(v, torch.Tensor):
            return f"tensor({list(v.shape)}, {v.dtype}, stride={v.stride()}, values={v.tolist()})"
        return repr(v)

    return f"{fn}(" + ", ".join(f"{k}={show(v)}" for k, v in args.items()) + ")"


def campaign(cases: int, seconds: float, backend: str, chunk: int = 250) -> dict:
    """Run up to ``cases`` fuzz cases (or until ``seconds`` pass) on ``backend``, without
    stopping at findings; returns the counts and the findings (first case of each kind)."""
    from hypothesis import HealthCheck, Phase, given, settings

    counts = {"ok": 0, "refused": 0, "finding": 0}
    findings: dict[str, dict] = {}
    start = time.monotonic()

    def on_alarm(signum, frame):
        raise TimeoutError("a fuzz case ran for more than 5 minutes (hang?)")

    signal.signal(signal.SIGALRM, on_alarm)

    def one(case, seed):
        fn, args = case
        described = _describe(fn, args)
        signal.alarm(300)
        try:
            counts[run_call(fn, args, seed)] += 1
        except Finding as finding:
            counts["finding"] += 1
            kind = f"{fn}: {str(finding).split(':')[0]} {type(finding.__cause__).__name__}"
            entry = findings.setdefault(kind, {"count": 0, "message": str(finding)})
            entry["count"] += 1
            entry.setdefault("case", f"seed={seed}: {described}")
        finally:
            signal.alarm(0)

    run_settings = settings(
        max_examples=chunk,
        deadline=None,
        derandomize=False,
        database=None,
        phases=[Phase.generate],  # findings are recorded, not raised: nothing to shrink
        suppress_health_check=list(HealthCheck),
    )
    with backends.use(backend):
        while sum(counts.values()) < cases and time.monotonic() - start < seconds:
            before = sum(counts.values())
            settings(run_settings, max_examples=min(chunk, cases - before))(
                given(case=fuzz_calls(), seed=S.seeds)(one)
            )()
    counts["seconds"] = round(time.monotonic() - start)
    return {"counts": counts, "findings": findings}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=float("inf"))
    parser.add_argument("--backend", default="auto", choices=backends.BACKENDS)
    options = parser.parse_args(argv)
    faulthandler.enable()  # a segfault prints where it happened
    warnings.simplefilter("ignore")  # NumPy's warnings on NaN/inf arguments
    backends.AUTO_MIN_ELEMENTS = 0  # the kernels take every size, as in the tests
    result = campaign(options.cases, options.seconds, options.backend)
    counts = result["counts"]
    total = counts["ok"] + counts["refused"] + counts["finding"]
    print(
        f"fuzz_api: {total} cases on backend {options.backend!r} in {counts['seconds']} s: "
        f"{counts['ok']} matched the reference, {counts['refused']} refused with a documented "
        f"error, {counts['finding']} findings ({len(result['findings'])} kinds)"
    )
    for kind, entry in result["findings"].items():
        print(f"\n[{entry['count']}x] {kind}\n  {entry['message']}\n  first: {entry['case']}")
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
