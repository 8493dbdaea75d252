"""The fused kernels as torch custom ops ``normlab::<name>``, generated from one table.

Each forward op of ``FORWARD`` (and the backward op it calls) is built the same way:

- the custom op ``normlab::<name>`` with its schema from ``SCHEMAS`` (``torch.export``
  graphs hold these names and schemas: they do not change); its CUDA kernel is the Triton
  launcher of ``TRITON``, its CPU kernel the Numba launcher of the same name in
  ``normlab.kernels.cpu.launchers`` (or, in a compiled graph replayed
  while backend "triton" runs in Triton's interpreter, the Triton one: a graph holds the
  op, not the eager call's decision, so the replay decides from the backend in force);
- a fake (meta) implementation, statistics in ``stats_dtype(x)`` (float64 on the CPU,
  float32 on CUDA, for both families: the Triton launchers' float32 statistics are widened
  on the CPU);
- its autograd: ``save`` (what the backward keeps), ``gradients`` (the first-order backward
  through the backward op) and ``composite`` (the same function in composite form on the
  op's view, which ``double_backward`` differentiates for ``create_graph=True``);
- an eager twin, a torch.autograd.Function that calls the launcher of the family the
  registry chose (its last argument) directly: the custom-op dispatcher costs about 100 us a
  call in eager mode, more than the kernel on small inputs. ``torch.compile`` traces the op.

``ctx.family`` is the family the eager forward ran ("numba" | "triton"), None in a traced
graph; the backward op follows it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from normlab import backends
from normlab.kernels import composite
from normlab.kernels.cpu import launchers
from normlab.kernels.gpu import interpreting

# op name -> its schema (what torch.export graphs record).
SCHEMAS = {
    "row_norm": "(Tensor x, Tensor? weight, Tensor? bias, float eps, bool center)"
    " -> (Tensor, Tensor, Tensor)",
    "add_row_norm": "(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps,"
    " bool center) -> (Tensor, Tensor, Tensor, Tensor)",
    "row_norm_backward": "(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd,"
    " bool center, Tensor? extra) -> (Tensor, Tensor, Tensor)",
    "group_norm": "(Tensor x, Tensor? weight, Tensor? bias, SymInt groups, float eps,"
    " Tensor? mask) -> (Tensor, Tensor, Tensor, Tensor)",
    "group_norm_backward": "(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd,"
    " SymInt groups, Tensor? mask) -> (Tensor, Tensor, Tensor)",
    "batch_norm_train": "(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? mask)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "batch_norm_given": "(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var,"
    " float eps) -> (Tensor, Tensor, Tensor)",
    "batch_norm_backward": "(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd,"
    " Tensor? mask, Tensor count, bool stats_given) -> (Tensor, Tensor, Tensor)",
    "column_norm": "(Tensor x, Tensor? weight, Tensor? bias, float eps, bool center)"
    " -> (Tensor, Tensor, Tensor)",
    "column_norm_backward": "(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd,"
    " bool center) -> (Tensor, Tensor, Tensor)",
}

# op name -> (module of normlab.kernels.gpu, launcher): the Triton implementations. The
# ops missing here (column_norm*) are Numba-only: no CUDA kernel is registered for them.
TRITON = {
    "row_norm": ("rows", "row_norm_forward"),
    "add_row_norm": ("rows", "add_row_norm_forward"),
    "row_norm_backward": ("rows", "row_norm_backward"),
    "group_norm": ("groups", "group_norm_forward"),
    "group_norm_backward": ("groups", "group_norm_backward"),
    "batch_norm_train": ("channels", "batch_norm_train"),
    "batch_norm_given": ("channels", "batch_norm_given"),
    "batch_norm_backward": ("channels", "batch_norm_backward"),
}

# forward op name -> how many of its leading outputs are differentiable (the rest are
# statistics).
DIFFERENTIABLE = {
    "row_norm": 1,
    "add_row_norm": 2,
    "group_norm": 1,
    "batch_norm_train": 1,
    "batch_norm_given": 1,
    "column_norm": 1,
}

_implementations: dict[tuple[str, str], Any] = {}


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the statistics the ops return for ``x``'s device: float64 on the CPU,
    float32 on CUDA (the Triton kernels accumulate in float32)."""
    return torch.float64 if x.device.type == "cpu" else torch.float32


def fake_stats(shape, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(shape, dtype=stats_dtype(x))


def implementation(family: str, name: str):
    """The launcher of op ``name`` in ``family`` ("numba" | "triton")."""
    found = _implementations.get((family, name))
    if found is not None:
        return found
    if family == "numba":
        found = getattr(launchers, name)
    else:
        module, launcher = TRITON[name]
        found = getattr(importlib.import_module(f"normlab.kernels.gpu.{module}"), launcher)
        if name in DIFFERENTIABLE:
            found = _stats_as_stats_dtype(found, DIFFERENTIABLE[name])
    _implementations[(family, name)] = found
    return found


def _stats_as_stats_dtype(launcher, differentiable: int):
    def run(x, *args):
        out = launcher(x, *args)
        return *out[:differentiable], *(t.to(stats_dtype(x)) for t in out[differentiable:])

    return run


def _family_at_run(x: torch.Tensor, name: str) -> str:
    """The family a custom op called by a compiled graph runs (see the module docstring)."""
    if x.device.type != "cpu":
        return "triton"
    if name not in TRITON:
        return "numba"
    return "triton" if backends.get_backend() == "triton" and interpreting() else "numba"


def _custom_op(name: str, fake):
    op = torch.library.custom_op(
        f"normlab::{name}",
        getattr(launchers, name),
        mutates_args=(),
        device_types="cpu",
        schema=SCHEMAS[name],
    )

    def on_cpu(*args):
        return implementation(_family_at_run(args[0], name), name)(*args)

    op.register_kernel("cpu", on_cpu)
    if name in TRITON:
        op.register_kernel("cuda", lambda *args: implementation("triton", name)(*args))
    op.register_fake(fake)
    return op


class BackwardOp:
    """A backward launcher as the custom op ``normlab::<name>`` (what compiled graphs
    record) and, eager, the launcher of the family the forward ran."""

    def __init__(self, name: str, fake):
        self.name, self.op = name, _custom_op(name, fake)

    def __call__(self, ctx, *args):
        if ctx.family is None:
            return self.op(*args)
        return implementation(ctx.family, self.name)(*args)


def double_backward(ctx, dy, forward, inputs):
    """create_graph=True: differentiate ``forward(*inputs)`` (the composite forward) so the
    gradients carry a graph. ``inputs`` are the tensors whose gradients are returned, in
    the order of ``ctx.needs_input_grad`` (None entries allowed)."""
    needs = ctx.needs_input_grad[: len(inputs)]
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need and t is not None]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(forward(*inputs), wanted, dy, create_graph=True))
    return tuple(
        next(grads) if need and t is not None else None
        for t, need in zip(inputs, needs, strict=True)
    )


@dataclass(frozen=True)
class Entry:
    """One forward op of the table: its fake, what its backward keeps (``save(inputs,
    outputs) -> (tensors, config)``), its first-order ``gradients(ctx, grads, saved)`` and
    its ``composite(ctx, grads, saved) -> (dy, forward, inputs)`` for double backward."""

    fake: Any
    save: Any
    gradients: Any
    composite: Any


class KernelOp:
    """A forward op of the table, callable as ``op(*args, family)``: the custom op while
    ``torch.compile`` traces, the eager twin otherwise; ``.op`` is the custom op."""

    def __init__(self, name: str, entry: Entry):
        differentiable = DIFFERENTIABLE[name]
        self.op = _custom_op(name, entry.fake)
        n_inputs = SCHEMAS[name].split("->")[0].count(",") + 1

        def set_up(ctx, inputs, output):
            ctx.mark_non_differentiable(*output[differentiable:])
            tensors, ctx.config = entry.save(inputs, output)
            ctx.save_for_backward(*tensors)

        def backward(ctx, *grads):
            saved = ctx.saved_tensors
            if torch.is_grad_enabled():  # create_graph=True
                result = double_backward(ctx, *entry.composite(ctx, grads, saved))
            else:
                result = entry.gradients(ctx, grads, saved)
            return *result, *(None,) * (n_inputs - len(result))

        def set_up_traced(ctx, inputs, output):
            ctx.family = None  # each op of the compiled graph decides when it runs
            set_up(ctx, inputs, output)

        self.op.register_autograd(backward, setup_context=set_up_traced)

        def forward(ctx, *args):  # ctx-style forward: no per-call signature binding
            ctx.family = args[-1]
            output = implementation(ctx.family, name)(*args[:-1])
            set_up(ctx, args[:-1], output)
            return output

        def eager_backward(ctx, *grads):
            return *backward(ctx, *grads), None

        self.eager = type(
            f"{name}_eager",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(eager_backward)},
        )

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args[:-1])
        return self.eager.apply(*args)


def _grads(needs, dx, dweight, dbias, weight, bias):
    return (
        dx if needs[0] else None,
        dweight if weight is not None and needs[1] else None,
        dbias if bias is not None and needs[2] else None,
    )


def _on(shape, t):
    return None if t is None else t.reshape(shape)


# --- rows: LayerNorm / RMSNorm over (R, N), the fused residual add ---------------------------


def _rows_composite(eps, center):
    def forward(x, weight, bias):
        return composite.normalize_forward(x, weight, bias, (1,), eps, center)[0]

    return forward


def _fake_row_norm(x, weight, bias, eps, center):
    return torch.empty_like(x), fake_stats(x.shape[0], x), fake_stats(x.shape[0], x)


def _fake_add_row_norm(x, residual, weight, bias, eps, center):
    stats = fake_stats(x.shape[0], x), fake_stats(x.shape[0], x)
    return torch.empty_like(x), torch.empty_like(x), *stats


def _fake_param_grads(dy, x, *_):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c), x.new_empty(c)


row_norm_backward = BackwardOp("row_norm_backward", _fake_param_grads)
group_norm_backward = BackwardOp("group_norm_backward", _fake_param_grads)
batch_norm_backward = BackwardOp("batch_norm_backward", _fake_param_grads)


def _rows_gradients(ctx, grads, saved):
    x, weight, bias, mean, rstd = saved
    _, center = ctx.config
    dx, dweight, dbias = row_norm_backward(
        ctx, grads[0].contiguous(), x, weight, mean, rstd, center, None
    )
    return _grads((True, *ctx.needs_input_grad[1:3]), dx, dweight, dbias, weight, bias)


def _add_gradients(ctx, grads, saved):
    _, _, total, weight, bias, mean, rstd = saved
    _, center = ctx.config
    dy, dtotal = grads[0], grads[1]
    dtotal = None if dtotal is None else dtotal.contiguous()
    dx, dweight, dbias = row_norm_backward(
        ctx, dy.contiguous(), total, weight, mean, rstd, center, dtotal
    )
    needs = ctx.needs_input_grad
    _, dweight, dbias = _grads((True, needs[2], needs[3]), dx, dweight, dbias, weight, bias)
    return dx, dx, dweight, dbias


def _add_composite(ctx, grads, saved):
    x, residual, _, weight, bias, _, _ = saved
    dy, dtotal = grads[0], grads[1]
    normalize = _rows_composite(*ctx.config)

    def forward(x, residual, weight, bias):  # the op's two outputs, one scalar product
        s = x + residual
        out = (normalize(s, weight, bias) * dy).sum()
        return out if dtotal is None else out + (s * dtotal).sum()

    return torch.ones((), dtype=dy.dtype), forward, (x, residual, weight, bias)


# --- groups: GroupNorm / InstanceNorm over (N, C, S) -----------------------------------------


def _groups_composite(groups, eps, mask):
    """The composite on the grouped view (N, G, C/G, S) of the (N, C, S) view."""

    def forward(x, weight, bias):
        n, c, s = x.shape
        params = (1, groups, c // groups, 1)
        y, *_ = composite.normalize_forward(
            x.reshape(n, groups, c // groups, s),
            _on(params, weight),
            _on(params, bias),
            (2, 3),
            eps,
            True,
            mask=None if mask is None else mask.bool().reshape(n, 1, 1, s),
        )
        return y.reshape(x.shape)

    return forward


def _fake_group_norm(x, weight, bias, groups, eps, mask):
    shape = (x.shape[0], groups)
    return (torch.empty_like(x), *(fake_stats(shape, x) for _ in range(3)))


def _groups_gradients(ctx, grads, saved):
    x, weight, bias, mean, rstd, mask = saved
    groups, _ = ctx.config
    dx, dweight, dbias = group_norm_backward(
        ctx, grads[0].contiguous(), x, weight, mean, rstd, groups, mask
    )
    return _grads(ctx.needs_input_grad, dx, dweight, dbias, weight, bias)


# --- channels: BatchNorm over (A, C, B), training and given statistics -----------------------


def _channels_composite(eps, mask, mean=None, var=None):
    """The composite on the (A, C, B) view."""

    def forward(x, weight, bias):
        a, c, b = x.shape
        shape = (1, c, 1)
        m = None if mask is None else mask.bool().reshape(a, 1, b)
        args = (_on(shape, weight), _on(shape, bias), (0, 2), eps, True)
        return composite.normalize_forward(x, *args, _on(shape, mean), _on(shape, var), m)[0]

    return forward


def _fake_train(x, weight, bias, eps, mask):
    c = x.shape[1]
    return (torch.empty_like(x), *(fake_stats(c, x) for _ in range(3)), fake_stats(1, x))


def _fake_given(x, weight, bias, mean, var, eps):
    c = x.shape[1]
    return torch.empty_like(x), fake_stats(c, x), fake_stats(c, x)


def _channels_gradients(ctx, grads, saved):
    x, weight, bias, mean, rstd, mask, count = saved[:7]
    stats_given = mask is None and count is None
    if stats_given:
        count = torch.ones(1, dtype=torch.float64)
    dx, dweight, dbias = batch_norm_backward(
        ctx, grads[0].contiguous(), x, weight, mean, rstd, mask, count, stats_given
    )
    return _grads(ctx.needs_input_grad, dx, dweight, dbias, weight, bias)


# --- columns: LayerNorm / RMSNorm over axis 1 of (A, C, B) (channels-first) ------------------


def _columns_composite(eps, center):
    def forward(x, weight, bias):
        c = x.shape[1]
        shape = (1, c, 1)
        return composite.normalize_forward(
            x, _on(shape, weight), _on(shape, bias), (1,), eps, center
        )[0]

    return forward


def _fake_column_norm(x, weight, bias, eps, center):
    shape = (x.shape[0], x.shape[2])
    return torch.empty_like(x), fake_stats(shape, x), fake_stats(shape, x)


column_norm_backward = BackwardOp("column_norm_backward", _fake_param_grads)


def _columns_gradients(ctx, grads, saved):
    x, weight, bias, mean, rstd = saved
    _, center = ctx.config
    dx, dweight, dbias = column_norm_backward(
        ctx, grads[0].contiguous(), x, weight, mean, rstd, center
    )
    return _grads((True, *ctx.needs_input_grad[1:3]), dx, dweight, dbias, weight, bias)


FORWARD = {
    "row_norm": Entry(
        fake=_fake_row_norm,
        save=lambda inputs, out: ((*inputs[:3], out[1], out[2]), inputs[3:5]),
        gradients=_rows_gradients,
        composite=lambda ctx, grads, saved: (grads[0], _rows_composite(*ctx.config), saved[:3]),
    ),
    "add_row_norm": Entry(
        fake=_fake_add_row_norm,
        save=lambda inputs, out: ((*inputs[:2], out[1], *inputs[2:4], *out[2:]), inputs[4:6]),
        gradients=_add_gradients,
        composite=_add_composite,
    ),
    "group_norm": Entry(
        fake=_fake_group_norm,
        save=lambda inputs, out: ((*inputs[:3], out[1], out[3], inputs[5]), inputs[3:5]),
        gradients=_groups_gradients,
        composite=lambda ctx, grads, saved: (
            grads[0],
            _groups_composite(*ctx.config, saved[5]),
            saved[:3],
        ),
    ),
    "batch_norm_train": Entry(
        fake=_fake_train,
        save=lambda inputs, out: ((*inputs[:3], out[1], out[3], inputs[4], out[4]), inputs[3]),
        gradients=_channels_gradients,
        composite=lambda ctx, grads, saved: (
            grads[0],
            _channels_composite(ctx.config, saved[5]),
            saved[:3],
        ),
    ),
    "batch_norm_given": Entry(
        fake=_fake_given,
        # mask and count None: the backward of given statistics
        save=lambda inputs, out: ((*inputs[:3], *out[1:], None, None, *inputs[3:5]), inputs[5]),
        gradients=_channels_gradients,
        composite=lambda ctx, grads, saved: (
            grads[0],
            _channels_composite(ctx.config, None, saved[7], saved[8]),
            saved[:3],
        ),
    ),
    "column_norm": Entry(
        fake=_fake_column_norm,
        save=lambda inputs, out: ((*inputs[:3], out[1], out[2]), inputs[3:5]),
        gradients=_columns_gradients,
        composite=lambda ctx, grads, saved: (
            grads[0],
            _columns_composite(*ctx.config),
            saved[:3],
        ),
    ),
}

row_norm = KernelOp("row_norm", FORWARD["row_norm"])
add_row_norm = KernelOp("add_row_norm", FORWARD["add_row_norm"])
group_norm = KernelOp("group_norm", FORWARD["group_norm"])
batch_norm_train = KernelOp("batch_norm_train", FORWARD["batch_norm_train"])
batch_norm_given = KernelOp("batch_norm_given", FORWARD["batch_norm_given"])
column_norm = KernelOp("column_norm", FORWARD["column_norm"])
