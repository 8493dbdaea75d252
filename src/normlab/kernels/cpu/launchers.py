"""The Numba kernels' launchers: torch tensors in, new torch tensors out.

The CPU counterparts of the Triton launchers in ``normlab.kernels.gpu`` (same arguments and
outputs), registered as the CPU implementations of the custom ops in
``normlab.ops.kernel_ops``. They take contiguous float32/float64 views in the layouts of
``normlab.spec.Layout`` (rows: (R, N); groups: (N, C, S); channels: (A, C, B)); the rows
launchers also float16/bfloat16 (weight and bias of the same dtype, outputs and parameter
gradients of that dtype, computed in float32 and rounded once), weight and
bias as (features,) or None, masks as uint8 views; they allocate the outputs, hand the
kernels NumPy views of the tensors' memory (no copy) and run them with as many threads as
torch uses.

Statistics are float64 whatever the input dtype: the saved mean of a float32 input with a
large offset (1e4 + 1e-3 noise) would otherwise lose the noise.
"""

import sys

import numpy as np
import torch

NO_MASK = np.zeros((0, 0), dtype=np.uint8)


def _kernels(family: str):
    """The kernel module ``normlab.kernels.cpu.<family>`` (imports Numba at first use)."""
    module = sys.modules.get(f"normlab.kernels.cpu.{family}")
    if module is None:
        import importlib

        module = importlib.import_module(f"normlab.kernels.cpu.{family}")
    return module


# Half tensors reach the kernels as integer views of their bits (``normlab.kernels.cpu.half``:
# Numba has no float16 or bfloat16), one integer dtype per format.
HALF_BITS = {torch.bfloat16: np.uint16, torch.float16: np.int16}


def array(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a NumPy array (no copy; the tensor must be contiguous);
    float16/bfloat16 as the integer view of ``HALF_BITS``."""
    bits = HALF_BITS.get(t.dtype)
    if bits is not None:
        return t.detach().view(torch.int16).numpy().view(bits)
    return t.detach().numpy()


def param(t: torch.Tensor | None, n: int, fill: float, like: torch.Tensor) -> np.ndarray:
    """A (n,) parameter array: the tensor, or ones/zeros (of ``like``'s dtype) when the norm
    has none."""
    if t is None:
        return array(torch.full((n,), fill, dtype=like.dtype))
    return array(t.reshape(n).contiguous())


def stats(shape, x: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float64, device=x.device)


def launch(kernel, *args) -> None:
    """Run a Numba kernel on ``args`` (tensors as NumPy views of their memory, None as an
    absent mask) with as many threads as torch uses (one for small inputs; the first
    argument is the kernel's input)."""
    from normlab.kernels.cpu import runtime

    args = [array(a) if isinstance(a, torch.Tensor) else NO_MASK if a is None else a for a in args]
    runtime.sync_threads(args[0].size)
    kernel(*args)


# --- rows: LayerNorm / RMSNorm, the fused residual add -------------------------------------


def row_norm(x, weight, bias, eps, center):
    """(y, mean, rstd) of LayerNorm (center) or RMSNorm over each row; statistics float64."""
    n_rows, n = x.shape
    y, mean, rstd = torch.empty_like(x), stats(n_rows, x), stats(n_rows, x)
    w, b = param(weight, n, 1.0, x), param(bias, n, 0.0, x)
    launch(_kernels("rows").row_norm_forward, x, w, b, eps, center, y, mean, rstd)
    return y, mean, rstd


# The element type each dtype's kernels read (a scalar of it: ``pointers``' witness).
WITNESS = {
    torch.float32: np.float32(0),
    torch.float64: np.float64(0),
    torch.bfloat16: np.uint16(0),
    torch.float16: np.int16(0),
}


# Below this many elements ``norm_inference`` runs on the calling thread: 2026-12-08, 2
# cores, LayerNorm on rows of 4096 float32 by address: 4 and 8 rows 6.0/5.8 us serial
# against 7.8/9.0 us on the pool, even at 16 rows (9.6/9.5), 32 rows 25/19 us.
INFERENCE_SERIAL_BELOW = 1 << 16


def _by_address(family, name, view, dtype, addresses, *example):
    """(entry point, pool, ones, zeros) of the by-address kernel ``name`` of ``family``: its
    ``_serial`` version below ``INFERENCE_SERIAL_BELOW`` elements of ``view`` (pool: the
    element count to sync threads for, else None), compiled (or loaded) for ``addresses``
    integer addresses, ``view``'s sizes and ``example``'s types; ones and zeros stand for an
    absent weight and bias (view[1] elements of ``dtype``)."""
    from normlab.kernels.cpu import pointers

    elements = int(np.prod(view, dtype=np.int64))
    pool = elements if elements >= INFERENCE_SERIAL_BELOW else None
    kernel = getattr(_kernels(family), name if pool else name + "_serial")
    entry = pointers.direct(kernel, *(0,) * addresses, *view, *example)
    c = view[1]
    return entry, pool, torch.ones(c, dtype=dtype), torch.zeros(c, dtype=dtype)


def norm_inference(kind, view, dtype, center, step=None, copy=False):
    """A runner ``(x, weight, bias, eps) -> y`` of LayerNorm (``center``) or RMSNorm without
    statistics, for inputs whose memory is ``view``: (rows, N) normalized along N
    (``kind`` "rows", any kernel dtype) or (A, C, B) normalized along C ("columns",
    float32/float64); C-contiguous, of ``dtype``, on the CPU, with weight and bias of
    view[1] elements of that dtype or None: what a plan's key guarantees
    (``normlab.backends.plans``). Rows only: ``step``, the bytes from one row's start to
    the next's where x is not C-contiguous (each row's N elements contiguous; the key then
    holds x's strides); ``copy``: x has other strides, the kernel reads a contiguous copy.
    A decode-size call costs little more than its work: the tensors go to the kernel as
    addresses (``pointers``), through its compiled entry point, no statistics are written,
    the serial kernel runs below ``INFERENCE_SERIAL_BELOW`` elements (no thread pool to
    wake); the output is C-contiguous, as torch's ops give."""
    from normlab.kernels.cpu import runtime

    witness, center = WITNESS[dtype], bool(center)
    if kind == "columns":
        kernel, pool, ones, zeros = _by_address(
            kind, "column_norm_inference", view, dtype, 4, 0.0, center, witness
        )
        between = ()
    else:
        kernel, pool, ones, zeros = _by_address(
            kind, "row_norm_inference", view, dtype, 5, 0.0, center, witness
        )
        between = (view[1] * witness.itemsize if step is None else step,)
    new = torch.empty_like if step is None else _contiguous_like

    def run(x, weight, bias, eps):
        if copy:
            x = x.contiguous()
        weight = ones if weight is None else weight.contiguous()
        bias = zeros if bias is None else bias.contiguous()
        y = new(x)
        if pool:
            runtime.sync_threads(pool)
        x_at, w_at, b_at, y_at = x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr()
        kernel(x_at, *between, w_at, b_at, y_at, *view, eps, center, witness)
        return y

    return run


def _contiguous_like(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def add_row_norm(x, residual, weight, bias, eps, center):
    """(y, s, mean, rstd) with s = x + residual and y the norm of s, in one pass."""
    n_rows, n = x.shape
    y, total = torch.empty_like(x), torch.empty_like(x)
    mean, rstd = stats(n_rows, x), stats(n_rows, x)
    w, b = param(weight, n, 1.0, x), param(bias, n, 0.0, x)
    launch(
        _kernels("rows").add_row_norm_forward, x, residual, w, b, eps, center, y, total, mean, rstd
    )
    return y, total, mean, rstd


def row_norm_backward(dy, x, weight, mean, rstd, center, extra):
    """(dx, dweight, dbias); ``extra`` (the fused add's gradient of s) is added to dx."""
    n = x.shape[1]
    dx, dweight, dbias = torch.empty_like(x), x.new_empty(n), x.new_empty(n)
    extra = extra if extra is not None else x.new_empty((0, n))
    w = param(weight, n, 1.0, x)
    launch(
        _kernels("rows").row_norm_backward, dy, x, w, mean, rstd, center, extra, dx, dweight, dbias
    )
    return dx, dweight, dbias


# --- groups: GroupNorm / InstanceNorm ------------------------------------------------------


def group_norm(x, weight, bias, groups, eps, mask):
    """(y, mean, var, rstd), statistics (N, groups) in float64 over real positions."""
    n, c, _ = x.shape
    y = torch.empty_like(x)
    mean, var, rstd = (stats((n, groups), x) for _ in range(3))
    w, b = param(weight, c, 1.0, x), param(bias, c, 0.0, x)
    launch(_kernels("groups").group_norm_forward, x, w, b, groups, eps, mask, y, mean, var, rstd)
    return y, mean, var, rstd


def group_norm_inference(view, dtype, groups):
    """A runner ``(x, weight, bias, eps) -> y`` of ``group_norm``'s y without a mask for
    inputs whose memory is ``view`` = (B, C, S), C-contiguous, of ``dtype`` (float32 or
    float64), weight and bias of C elements of it or None, on the CPU: what a plan's key
    guarantees. By address, as ``norm_inference``."""
    from normlab.kernels.cpu import runtime

    witness = WITNESS[dtype]
    kernel, pool, ones, zeros = _by_address(
        "groups", "group_norm_inference", view, dtype, 4, groups, 0.0, witness
    )

    def run(x, weight, bias, eps):
        weight = ones if weight is None else weight.contiguous()
        bias = zeros if bias is None else bias.contiguous()
        y = torch.empty_like(x)
        if pool:
            runtime.sync_threads(pool)
        x_at, y_at = x.data_ptr(), y.data_ptr()
        kernel(x_at, weight.data_ptr(), bias.data_ptr(), y_at, *view, groups, eps, witness)
        return y

    return run


def group_norm_backward(dy, x, weight, mean, rstd, groups, mask):
    c = x.shape[1]
    dx, dweight, dbias = torch.empty_like(x), x.new_empty(c), x.new_empty(c)
    w = param(weight, c, 1.0, x)
    launch(
        _kernels("groups").group_norm_backward,
        dy,
        x,
        w,
        mean,
        rstd,
        groups,
        mask,
        dx,
        dweight,
        dbias,
    )
    return dx, dweight, dbias


# --- channels: BatchNorm (training, given statistics), PowerNorm ---------------------------


def channel_apply(x, scale, shift) -> torch.Tensor:
    """y = x * scale + shift per channel of the (A, C, B) view, scale and shift float64
    (C,) (so a large mean cancels exactly)."""
    y = torch.empty_like(x)
    launch(_kernels("channels").channel_apply, x, scale, shift, y)
    return y


def _apply(x, weight, bias, mean, rstd) -> torch.Tensor:
    """y = (x - mean) * rstd * weight + bias as x * scale + shift."""
    c = x.shape[1]
    scale = rstd if weight is None else rstd * weight.reshape(c).double()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.reshape(c).double()
    return channel_apply(x, scale, shift)


def batch_norm_train(x, weight, bias, eps, mask):
    """(y, mean, var, rstd, count): batch statistics (float64, biased var) over the real
    elements of each channel, and every element normalized with them."""
    c = x.shape[1]
    mean, var, count = stats(c, x), stats(c, x), stats(1, x)
    launch(_kernels("channels").channel_statistics, x, mask, mean, var, count)
    rstd = torch.rsqrt(var + eps)
    return _apply(x, weight, bias, mean, rstd), mean, var, rstd, count


def batch_norm_given(x, weight, bias, mean, var, eps):
    """(y, mean, rstd) with the given statistics (eval mode), which are constants; y =
    (x - mean) * rstd * weight + bias in float64 (``channels.given_apply``, the kernel of
    ``batch_norm_given_inference`` too)."""
    c = x.shape[1]
    y = torch.empty_like(x)
    w, b = param(weight, c, 1.0, x), param(bias, c, 0.0, x)
    launch(_kernels("channels").given_apply, x, w, b, mean.contiguous(), var.contiguous(), eps, y)
    return y, mean.to(torch.float64, copy=True), torch.rsqrt(var.double() + eps)


def batch_norm_given_inference(view, dtype):
    """A runner ``(x, weight, bias, eps, mean, var) -> y`` of ``batch_norm_given``'s y for
    inputs whose memory is ``view`` = (A, C, B), C-contiguous, of ``dtype`` (float32 or
    float64), weight and bias of C elements of it or None, mean and var of C elements of
    it, on the CPU: what a plan's key guarantees. By address, as
    ``norm_inference``."""
    from normlab.kernels.cpu import runtime

    witness = WITNESS[dtype]
    kernel, pool, ones, zeros = _by_address(
        "channels", "given_inference", view, dtype, 6, 0.0, witness
    )

    def run(x, weight, bias, eps, mean, var):
        weight = ones if weight is None else weight.contiguous()
        bias = zeros if bias is None else bias.contiguous()
        mean, var = mean.contiguous(), var.contiguous()
        y = torch.empty_like(x)
        if pool:
            runtime.sync_threads(pool)
        x_at, y_at, w_at, b_at = x.data_ptr(), y.data_ptr(), weight.data_ptr(), bias.data_ptr()
        kernel(x_at, w_at, b_at, mean.data_ptr(), var.data_ptr(), y_at, *view, eps, witness)
        return y

    return run


def batch_norm_backward(dy, x, weight, mean, rstd, mask, count, stats_given):
    c = x.shape[1]
    dx, dweight, dbias = torch.empty_like(x), x.new_empty(c), x.new_empty(c)
    w = param(weight, c, 1.0, x)
    launch(
        _kernels("channels").channel_backward,
        dy,
        x,
        mean,
        rstd,
        w,
        mask,
        count,
        stats_given,
        dx,
        dweight,
        dbias,
    )
    return dx, dweight, dbias


def _power_rstd(phi, eps):
    return torch.rsqrt(phi.reshape(-1).double() + eps)


def power_norm_forward(layout, x, weight, bias, phi, eps):
    """PowerNorm after warmup: y = x * rstd * weight + bias on the channels view
    ``layout.view``, rstd = 1 / sqrt(phi + eps) from the running quadratic mean."""
    c = layout.view[1]
    scale = _power_rstd(phi, eps)
    if weight is not None:
        scale = scale * weight.reshape(-1).double()
    shift = torch.zeros(c, dtype=torch.float64) if bias is None else bias.reshape(-1).double()
    return channel_apply(x.reshape(layout.view), scale, shift).reshape(x.shape)


def power_norm_backward(layout, dy, x, weight, bias, phi, nu, eps, alpha_bkw, mask):
    """The approximate backward in one pass; returns (dx, dweight, dbias, new_nu)."""
    c = layout.view[1]
    rstd = _power_rstd(phi, eps)
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.reshape(-1).double()
    m = layout.kernel_mask(x, mask)
    dx = torch.empty_like(x)
    sums = torch.empty(4, c, dtype=torch.float64)
    launch(
        _kernels("power_norm").power_norm_backward,
        dy.contiguous().reshape(layout.view),
        x.reshape(layout.view),
        rstd,
        w,
        nu.reshape(-1).double(),
        m,
        dx.view(layout.view),
        sums,
    )
    count = layout.view[0] * layout.view[2] if m is None else int(m.sum())
    gamma, lam = sums[2] / count, sums[3] / count
    new_nu = nu.reshape(-1).double() * (1 - (1 - alpha_bkw) * gamma) + (1 - alpha_bkw) * lam
    dweight = None if weight is None else sums[0].to(weight.dtype).reshape(weight.shape)
    dbias = None if bias is None else sums[1].to(bias.dtype).reshape(bias.shape)
    return dx, dweight, dbias, new_nu


# --- columns: LayerNorm / RMSNorm over a non-trailing axis (channels-first) ----------------


def column_norm(x, weight, bias, eps, center):
    """(y, mean, rstd) of LayerNorm (center) or RMSNorm over axis 1 of the (A, C, B) view,
    per (a, b); y in x's layout, statistics (A, B) float64."""
    a, c, b = x.shape
    y, mean, rstd = torch.empty_like(x), stats((a, b), x), stats((a, b), x)
    w, bb = param(weight, c, 1.0, x), param(bias, c, 0.0, x)
    launch(_kernels("columns").column_norm_forward, x, w, bb, eps, center, y, mean, rstd)
    return y, mean, rstd


def column_norm_backward(dy, x, weight, mean, rstd, center):
    """(dx, dweight, dbias) of ``column_norm``."""
    c = x.shape[1]
    dx, dweight, dbias = torch.empty_like(x), x.new_empty(c), x.new_empty(c)
    w = param(weight, c, 1.0, x)
    launch(
        _kernels("columns").column_norm_backward, dy, x, w, mean, rstd, center, dx, dweight, dbias
    )
    return dx, dweight, dbias
