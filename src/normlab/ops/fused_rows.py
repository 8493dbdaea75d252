"""LayerNorm / RMSNorm over rows, and the fused residual add, as torch custom ops on the
Numba kernels of ``normlab.kernels.cpu.rows`` (CPU) and the Triton kernels of
``normlab.kernels.gpu.rows`` (CUDA; see ``fused_common`` for which runs). x arrives as a
contiguous (rows, features) view; weight and bias as (features,) or None."""

import torch

from normlab.kernels import composite
from normlab.ops.fused_common import (
    array,
    backward_op,
    differentiable_backward,
    fake_stats,
    fused_op,
    launch,
    param,
    stats,
    stats_dtype,
)


def _rows():
    from normlab.kernels.cpu import rows

    return rows


def _row_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) of LayerNorm (center) or RMSNorm over each row; statistics float64."""
    n_rows, n = x.shape
    y, mean, rstd = torch.empty_like(x), stats(n_rows, x), stats(n_rows, x)
    launch(
        _rows().row_norm_forward,
        array(x),
        param(weight, n, 1.0, x),
        param(bias, n, 0.0, x),
        eps,
        center,
        array(y),
        array(mean),
        array(rstd),
    )
    return y, mean, rstd


def _add_row_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, mean, rstd) with s = x + residual and y the norm of s, in one pass."""
    n_rows, n = x.shape
    y, total = torch.empty_like(x), torch.empty_like(x)
    mean, rstd = stats(n_rows, x), stats(n_rows, x)
    launch(
        _rows().add_row_norm_forward,
        array(x),
        array(residual),
        param(weight, n, 1.0, x),
        param(bias, n, 0.0, x),
        eps,
        center,
        array(y),
        array(total),
        array(mean),
        array(rstd),
    )
    return y, total, mean, rstd


def _row_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    center: bool,
    extra: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); ``extra`` (the fused add's gradient of s) is added to dx."""
    n = x.shape[1]
    dx, dweight, dbias = torch.empty_like(x), x.new_empty(n), x.new_empty(n)
    extra_array = array(extra) if extra is not None else array(x.new_empty((0, n)))
    launch(
        _rows().row_norm_backward,
        array(dy),
        array(x),
        param(weight, n, 1.0, x),
        array(mean),
        array(rstd),
        center,
        extra_array,
        array(dx),
        array(dweight),
        array(dbias),
    )
    return dx, dweight, dbias


def _gpu_rows():
    from normlab.kernels.gpu import rows

    return rows


def _cuda_row_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_row_norm`` on the Triton kernel (float32 statistics, as ``stats_dtype(x)``)."""
    y, mean, rstd = _gpu_rows().row_norm_forward(x, weight, bias, eps, center)
    return y, mean.to(stats_dtype(x)), rstd.to(stats_dtype(x))


def _cuda_add_row_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, total, mean, rstd = _gpu_rows().add_row_norm_forward(x, residual, weight, bias, eps, center)
    return y, total, mean.to(stats_dtype(x)), rstd.to(stats_dtype(x))


def _cuda_row_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    center: bool,
    extra: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gpu_rows().row_norm_backward(dy, x, weight, mean, rstd, center, extra)


def _fake_stats(x):
    return fake_stats(x.shape[0], x)


def _fake_row_norm(x, weight, bias, eps, center):
    return torch.empty_like(x), _fake_stats(x), _fake_stats(x)


def _fake_add_row_norm(x, residual, weight, bias, eps, center):
    return torch.empty_like(x), torch.empty_like(x), _fake_stats(x), _fake_stats(x)


def _fake_backward(dy, x, weight, mean, rstd, center, extra):
    n = x.shape[1]
    return torch.empty_like(x), x.new_empty(n), x.new_empty(n)


row_norm_backward = backward_op(
    "row_norm_backward", _row_norm_backward, _fake_backward, cuda_impl=_cuda_row_norm_backward
)


def _composite_forward(eps, center):
    def forward(x, weight, bias):
        y, *_ = composite.normalize_forward(x, weight, bias, (1,), eps, center)
        return y

    return forward


def _gradients(ctx, dy, x, extra, weight, bias, mean, rstd, needs_weight, needs_bias):
    dx, dweight, dbias = row_norm_backward(
        ctx, dy.contiguous(), x, weight, mean, rstd, ctx.center, extra
    )
    return (
        dx,
        dweight if weight is not None and needs_weight else None,
        dbias if bias is not None and needs_bias else None,
    )


def _setup(ctx, inputs, output):
    x, weight, bias, eps, center = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.eps, ctx.center = eps, center


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        grads = differentiable_backward(
            ctx, dy, _composite_forward(ctx.eps, ctx.center), (x, weight, bias)
        )
        return (*grads, None, None)
    needs = ctx.needs_input_grad
    grads = _gradients(ctx, dy, x, None, weight, bias, mean, rstd, needs[1], needs[2])
    return (*grads, None, None)


def _add_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, center = inputs
    _, total, mean, rstd = output
    ctx.save_for_backward(x, residual, total, weight, bias, mean, rstd)
    ctx.eps, ctx.center = eps, center


def _add_backward(ctx, dy, dtotal, _dmean, _drstd):
    x, residual, total, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        normalize = _composite_forward(ctx.eps, ctx.center)

        def forward(x, residual, weight, bias):  # the op's two outputs, one scalar product
            s = x + residual
            out = (normalize(s, weight, bias) * dy).sum()
            return out if dtotal is None else out + (s * dtotal).sum()

        grads = differentiable_backward(
            ctx, torch.ones((), dtype=dy.dtype), forward, (x, residual, weight, bias)
        )
        return (*grads, None, None)
    dtotal = None if dtotal is None else dtotal.contiguous()
    needs = ctx.needs_input_grad
    dx, dweight, dbias = _gradients(
        ctx, dy, total, dtotal, weight, bias, mean, rstd, needs[2], needs[3]
    )
    return dx, dx, dweight, dbias, None, None


row_norm = fused_op(
    "row_norm", _row_norm, _fake_row_norm, _setup, _backward, cuda_impl=_cuda_row_norm
)
add_row_norm = fused_op(
    "add_row_norm",
    _add_row_norm,
    _fake_add_row_norm,
    _add_setup,
    _add_backward,
    2,
    cuda_impl=_cuda_add_row_norm,
)
