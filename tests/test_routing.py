"""Which backend family each call is routed to, as a table (a routing change shows in the
diff), and the reasons a family's ``takes`` gives when it refuses a call."""

from __future__ import annotations

import pytest
import torch

from normlab import backends
from normlab import functional as F
from normlab.backends import registry
from normlab.spec import NormSpec, layout

# below AUTO_MIN_ELEMENTS (1 << 15); above it; above AUTO_TORCH_ELEMENTS's bounds (1 << 20)
SIZES = {"small": (4, 8, 4), "large": (16, 64, 64), "huge": (64, 64, 256)}
AUTO_DEFAULTS = {
    "AUTO_MIN_ELEMENTS": 1 << 15,
    "AUTO_TORCH_ELEMENTS": (1 << 18, 1 << 17, 1 << 19),
    "AUTO_TORCH_TRAINING_ELEMENTS": (1 << 22, 1 << 17, 1 << 22),
    "AUTO_TORCH_COLUMN_ELEMENTS": (1 << 15, 1 << 15),
    "AUTO_TORCH_GIVEN_ELEMENTS": 1 << 18,
}
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}


def _calls(n, c, length, dtype, device):
    """name -> a public call on an (n, c, length) input (or its 2-D (n * length, c) rows)."""

    def x(*shape):
        return torch.randn(*(shape or (n, c, length)), device=device).to(dtype)

    def ones(k):
        return torch.ones(k, device=device, dtype=dtype)

    def zeros(k):
        return torch.zeros(k, device=device, dtype=dtype)

    lengths = torch.full((n,), length - 1, device=device)
    lengths[0] = length
    rows = (n * length, c)
    return {
        "layer_norm": lambda: F.layer_norm(x(*rows), (c,), ones(c), zeros(c)),
        "layer_norm-no-affine": lambda: F.layer_norm(x(*rows), (c,)),
        "layer_norm-training": lambda: F.layer_norm(
            x(*rows), (c,), ones(c).requires_grad_(), zeros(c).requires_grad_()
        ),
        "layer_norm-dim1": lambda: F.layer_norm(x(), (c,), ones(c), zeros(c), dim=1),
        "layer_norm-non-contiguous": lambda: F.layer_norm(x(*rows).t(), (n * length,)),
        # every row's first c of 2c features (a split of a fused projection)
        "layer_norm-strided-rows": lambda: F.layer_norm(
            x(n * length, 2 * c)[:, :c], (c,), ones(c), zeros(c)
        ),
        "rms_norm-strided-rows-training": lambda: F.rms_norm(
            x(n * length, 2 * c)[:, :c], (c,), ones(c).requires_grad_()
        ),
        "rms_norm": lambda: F.rms_norm(x(*rows), (c,), ones(c)),
        "add_layer_norm": lambda: F.add_layer_norm(x(*rows), x(*rows), (c,), ones(c)),
        "group_norm": lambda: F.group_norm(x(), 4, ones(c), zeros(c)),
        "group_norm-masked": lambda: F.group_norm(x(), 4, ones(c), lengths=lengths),
        "instance_norm": lambda: F.instance_norm(x(), weight=ones(c)),
        "instance_norm-masked": lambda: F.instance_norm(x(), lengths=lengths),
        "instance_norm-given": lambda: F.instance_norm(
            x(), zeros(c), ones(c), use_input_stats=False
        ),
        "batch_norm": lambda: F.batch_norm(x(), None, None, ones(c), zeros(c), training=True),
        "batch_norm-channels-last": lambda: F.batch_norm(
            x(*rows), None, None, ones(c), training=True, dim=-1
        ),
        "batch_norm-masked": lambda: F.batch_norm(x(), None, None, training=True, lengths=lengths),
        "batch_norm-ghost": lambda: F.batch_norm(
            x(), None, None, training=True, virtual_batch_size=2
        ),
        "batch_norm-eval": lambda: F.batch_norm(x(), zeros(c), ones(c), ones(c)),
        "batch_norm-eval-float32-stats": lambda: F.batch_norm(
            x(), zeros(c).float(), ones(c).float()
        ),
        "batch_renorm": lambda: F.batch_renorm(x(), zeros(c), ones(c), training=True),
        "power_norm-eval": lambda: F.power_norm(x(*rows), ones(c), zeros(c)),
        "power_norm-warmup": lambda: F.power_norm(
            x(*rows), ones(c), zeros(c), training=True, warmup=True
        ),
        "power_norm": lambda: F.power_norm(x(*rows), ones(c), zeros(c), training=True),
    }


def routing_table(device: str = "cpu") -> dict[str, str]:
    """ "<call> <dtype> <size>" -> the family ``backends.last_used()`` reports under "auto"."""
    table = {}
    with backends.use("auto"):
        for size, shape in SIZES.items():
            for dtype_name, dtype in DTYPES.items():
                for name, call in _calls(*shape, dtype, device).items():
                    call()
                    table[f"{name} {dtype_name} {size}"] = backends.last_used()
    return table


# The CPU routing under "auto" (C: composite, N: numba, T: torch's own ops), per call, for
# f32 f64 bf16 at the small size, then at the large size, then at the huge size. LayerNorm/
# RMSNorm without a gradient take the rows (columns) kernel at every size (its plan
# launches it by address, faster than torch's op from one row on), as do BatchNorm eval and
# GroupNorm/InstanceNorm; the fused add stays with torch's op up to AUTO_TORCH_ELEMENTS,
# where the Numba kernels win. The Numba kernels take bf16 in the rows layout only
# (LayerNorm/RMSNorm/fused add over trailing axes).
CPU_ROUTES = {
    "layer_norm": "N N N N N N N N N",
    "layer_norm-no-affine": "N N N N N N N N N",
    # with a gradient: torch's half-precision backward is not exact enough, the kernel is
    # faster than the composite at any size; float32/float64 stay with torch's op up to
    # AUTO_TORCH_TRAINING_ELEMENTS (4M for LayerNorm)
    "layer_norm-training": "T T N T T N T T N",
    # channels-first LayerNorm without gradient: the column kernel by address at every size
    # (not bf16); with one, from AUTO_TORCH_COLUMN_ELEMENTS on
    "layer_norm-dim1": "N N T N N T N N T",
    # strided rows without gradient: the rows kernel by address, on one contiguous copy
    # (transposed here) or in place (evenly spaced rows of contiguous features)
    "layer_norm-non-contiguous": "N N N N N N N N N",
    "layer_norm-strided-rows": "N N N N N N N N N",
    # with a gradient as contiguous rows: the kernel on one copy from the training bound on
    "rms_norm-strided-rows-training": "T T N T T N N N N",
    "rms_norm": "N N N N N N N N N",
    "add_layer_norm": "T T T T T T N N N",
    # GroupNorm/InstanceNorm without mask and gradient: the groups kernel by address
    "group_norm": "N N T N N T N N T",
    "group_norm-masked": "C C C N N C N N C",
    "instance_norm": "N N T N N T N N T",
    "instance_norm-masked": "C C C N N C N N C",
    "instance_norm-given": "C C C C C C C C C",  # given statistics per instance: no layout
    "batch_norm": "C C C N N C N N C",
    "batch_norm-channels-last": "C C C N N C N N C",
    "batch_norm-masked": "C C C N N C N N C",
    "batch_norm-ghost": "C C C C C C C C C",  # two kept axes (virtual batch, channel)
    # BatchNorm eval without gradient: the channels kernel by address at every size; with
    # one, torch's op below AUTO_TORCH_GIVEN_ELEMENTS (1 << 18), the kernel above
    "batch_norm-eval": "N N T N N T N N T",
    "batch_norm-eval-float32-stats": "N C C N C C N C C",  # statistics of another dtype
    "batch_renorm": "C C C N N C N N C",
    "power_norm-eval": "C C C N N C N N C",  # a quadratic mean, no mean: not torch's BatchNorm
    "power_norm-warmup": "T T T T T T T T T",  # RMS over the batch axis: torch's op, moved axis
    "power_norm": "C C C N N C N N C",
}
KERNEL = {name for name, routes in CPU_ROUTES.items() if "N" in routes}


def _expected_cpu() -> dict[str, str]:
    names = {"C": "composite", "T": "torch"}
    names["N"] = "numba" if backends.numba_available() else "composite"
    table = {}
    for name, routes in CPU_ROUTES.items():
        families = iter(routes.split())
        for size in SIZES:
            for dtype_name in DTYPES:
                table[f"{name} {dtype_name} {size}"] = names[next(families)]
    return table


def _auto_defaults(monkeypatch):
    for name, value in AUTO_DEFAULTS.items():  # conftest sets 0
        monkeypatch.setattr(backends, name, value)


def test_routing_table_on_cpu(monkeypatch):
    _auto_defaults(monkeypatch)
    assert routing_table("cpu") == _expected_cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_routing_table_on_cuda(monkeypatch):
    """On CUDA, "auto" runs Triton on float32/bfloat16 inputs of any size in a layout its
    kernels take; else torch's ops where they take the call (as on the CPU at the small
    size), else the composite."""
    _auto_defaults(monkeypatch)
    table = routing_table("cuda")

    def family(key):
        name, dtype = key.split()[:2]
        kernel = name in KERNEL and dtype != "f64" and backends.triton_available()
        if name == "batch_norm-eval-float32-stats":  # statistics of another dtype but f32
            kernel = kernel and dtype == "f32"
        if kernel:
            return "triton"
        small_routes = CPU_ROUTES[name].split()[: len(DTYPES)]
        return "torch" if small_routes[list(DTYPES).index(dtype)] == "T" else "composite"

    expected = {key: family(key) for key in table}
    assert table == expected


# --- takes(): the refusals and their reasons ------------------------------------------------


def _call(x, spec, weight=None, bias=None, **tensors):
    return registry.Call(spec, x, weight, bias, 1e-5, **tensors)


ROWS = NormSpec((1,), (1,))
CHANNELS = NormSpec((0, 2), (1,))


@pytest.mark.skipif(not backends.numba_available(), reason="numba not installed")
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            lambda: _call(torch.randn(6, 4, 5).to(torch.bfloat16), CHANNELS),
            "input dtype torch.bfloat16: the numba kernels take half precision in the rows "
            "layout only (LayerNorm/RMSNorm over trailing axes), not the channels layout",
        ),
        (
            lambda: _call(
                torch.randn(2, 4, 8, 3).half(),
                NormSpec((2, 3), (1,)),
                torch.ones(1, 4, 1, 1, dtype=torch.float16),
            ),
            "input dtype torch.float16: the numba kernels take half precision in the rows "
            "layout only (LayerNorm/RMSNorm over trailing axes), not the groups layout",
        ),
        (
            lambda: _call(torch.randn(4, 8).to(torch.int32), ROWS),
            "input dtype torch.int32, the numba kernels take float32, float64, float16, bfloat16",
        ),
        (
            lambda: _call(torch.randn(5, 4, 6).transpose(0, 2), CHANNELS),
            "input is not contiguous (the Numba kernels take strided rows only)",
        ),
        (lambda: _call(torch.randn(0, 8), ROWS), "empty input"),
        (
            lambda: _call(torch.randn(4, 8), ROWS, torch.ones(1, 8, dtype=torch.float64)),
            "parameters or statistics of another dtype, device or rank than the input",
        ),
        (
            lambda: _call(torch.randn(4, 8, 3), NormSpec((1,), (1,), stats="given")),
            "the reduction axes are not the trailing axes",
        ),
        (
            lambda: _call(torch.randn(4, 8, 3), NormSpec((1,), (1,), masked=True)),
            "column kernels take neither given statistics nor a mask",
        ),
        (
            lambda: _call(torch.randn(4, 8, 3), NormSpec((0, 2), (1,), center=False)),
            "channel kernels compute centred statistics (PowerNorm uses the composite)",
        ),
        (
            lambda: _call(torch.randn(2, 4, 8, 3), NormSpec((2, 3), (1,), stats="given")),
            "rows kernels take neither given statistics nor a mask; group kernels compute "
            "centred statistics themselves; not a per-channel (BatchNorm) layout",
        ),
        (
            lambda: _call(torch.randn(2, 4, 8, 3), NormSpec((1, 3), (0, 2))),
            "not a per-channel (BatchNorm) layout",
        ),
        (
            lambda: _call(torch.randn(4, 8), ROWS, residual=torch.randn(8, 4).t()),
            registry.ADD_REASON,
        ),
    ],
)
def test_numba_refuses_with_the_reason(make, reason):
    assert reason in registry.NUMBA.takes(make())


def test_numba_takes_strided_rows():
    """Rows of any strides: read in place (evenly spaced rows, without gradient, once
    planned) or as one contiguous copy."""
    if not backends.numba_available():
        pytest.skip("numba is not installed")
    for x in (torch.randn(8, 4).t(), torch.randn(4, 16)[:, :8], torch.randn(8).expand(4, 8)):
        call = _call(x, ROWS)
        assert registry.NUMBA.takes(call) is None
        assert call.layout.kind == "rows"


def test_numba_takes_sets_the_layout():
    call = _call(torch.randn(6, 4, 5), CHANNELS, torch.ones(1, 4, 1))
    if not backends.numba_available():
        pytest.skip("numba not installed")
    assert registry.NUMBA.takes(call) is None
    assert call.layout == layout(CHANNELS, (6, 4, 5), True)
    assert call.layout.view == (6, 4, 5)


def test_triton_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(registry, "interpreting", lambda: False)
    monkeypatch.setattr(backends, "triton_available", lambda: True)
    reason = registry.TRITON.takes(_call(torch.randn(4, 8), ROWS))
    assert reason == "input on cpu, the Triton kernels run on CUDA (or with TRITON_INTERPRET=1)"


def test_triton_refuses_float64(monkeypatch):
    monkeypatch.setattr(registry, "interpreting", lambda: True)
    monkeypatch.setattr(backends, "triton_available", lambda: True)
    reason = registry.TRITON.takes(_call(torch.randn(4, 8, dtype=torch.float64), ROWS))
    assert reason == "input dtype torch.float64, the triton kernels take float32, float16, bfloat16"


def test_the_composite_takes_every_call():
    assert registry.COMPOSITE.takes(_call(torch.randn(8, 4).t(), ROWS)) is None


def test_layout_is_computed_from_the_spec_and_the_shape():
    group = NormSpec((2, 3), (1, 2))
    assert layout(group, (2, 4, 3, 5), affine=True).view == (2, 12, 5)
    # without parameters GroupNorm's grouped view is rows of C/G * S features
    assert layout(group, (2, 4, 3, 5), affine=False).view == (8, 15)
    masked = NormSpec((2, 3), (1, 2), masked=True)
    assert layout(masked, (2, 4, 3, 5), affine=False).view == (2, 4, 15)
    assert layout(NormSpec((0, 1), (0, 1)), (1, 1, 2), affine=True) == (
        "the reduction axes are not the trailing axes; not a (N, G, *reduced) layout; "
        "the parameters or statistics do not have one entry per channel; "
        "not one reduced axis before the last"
    )


# --- the custom ops: names and schemas that torch.export graphs hold -------------------------

SCHEMAS = [
    (
        "normlab::row_norm(Tensor x, Tensor? weight, Tensor? bias, float eps, bool center) -> "
        "(Tensor, Tensor, Tensor)"
    ),
    (
        "normlab::add_row_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, "
        "bool center) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    (
        "normlab::row_norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool center, Tensor? extra) -> (Tensor, Tensor, Tensor)"
    ),
    (
        "normlab::group_norm(Tensor x, Tensor? weight, Tensor? bias, SymInt groups, float eps, "
        "Tensor? mask) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    (
        "normlab::group_norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor "
        "rstd, SymInt groups, Tensor? mask) -> (Tensor, Tensor, Tensor)"
    ),
    (
        "normlab::batch_norm_train(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? mask)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    (
        "normlab::batch_norm_given(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var,"
        " float eps) -> (Tensor, Tensor, Tensor)"
    ),
    (
        "normlab::batch_norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor "
        "rstd, Tensor? mask, Tensor count, bool stats_given) -> (Tensor, Tensor, Tensor)"
    ),
    (
        "normlab::power_norm_train(Tensor x, Tensor? weight, Tensor? bias, Tensor phi, Tensor nu, "
        "Tensor step, SymInt warmup_iters, SymInt[] reduction_dims, float eps, float alpha_bkw, "
        "Tensor? mask) -> (Tensor, Tensor, Tensor)"
    ),
    (
        "normlab::power_norm_train_backward(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, "
        "Tensor phi, Tensor(a5!) nu, Tensor step, SymInt warmup_iters, SymInt[] reduction_dims, "
        "float eps, float alpha_bkw, Tensor? mask) -> (Tensor, Tensor, Tensor)"
    ),
]


def test_custom_op_names_and_schemas_are_unchanged():
    import normlab.ops.power_norm  # noqa: F401  (registers normlab::power_norm_train*)

    for schema in SCHEMAS:
        name = schema.split("(")[0].removeprefix("normlab::")
        assert str(getattr(torch.ops.normlab, name).default._schema) == schema
