"""Offset norms: RMSNorm/LayerNorm scaling by ``offset + weight`` (Gemma's RMSNorm stores w
and scales by 1 + w; Nemotron's LayerNorm1P likewise). The reference against torch's
formula, every backend forward and backward against the reference, Gemma's casting in
float16/bfloat16, and the modules' arguments, repr and state_dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import normlab
from normlab import backends
from normlab import functional as NF
from normlab import reference as ref
from normlab.functional.feature import offset_weight
from tolerances import grad_tol, tol

H = 24
EPS = 1e-6


def _data(dtype, seed=0, shape=(5, 3, H)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) + 0.3
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = 0.5 * torch.randn(H, generator=gen, dtype=torch.float64)  # around 0, as Gemma's
    b = torch.randn(H, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (x, dy, w, b))


def _np(t):
    return t.detach().double().numpy()


# --- the reference -------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [1.0, -0.5, 0.0])
def test_reference_equals_the_torch_formula(offset):
    x, dy, w, b = _data(torch.float64)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    want = xr * torch.rsqrt(xr.square().mean(-1, keepdim=True) + EPS) * (offset + wr)
    got = ref.rms_norm(_np(x), (H,), _np(w), EPS, offset=offset)
    np.testing.assert_allclose(got, _np(want), rtol=1e-12, atol=1e-12)
    want.backward(dy)
    dx, dw, _ = ref.rms_norm_backward(_np(dy), _np(x), (H,), _np(w), EPS, offset=offset)
    np.testing.assert_allclose(dx, _np(xr.grad), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, _np(wr.grad), rtol=1e-10, atol=1e-10)

    xr.grad = wr.grad = None
    want = TF.layer_norm(xr, (H,), offset + wr, br, EPS)
    got = ref.layer_norm(_np(x), (H,), _np(w), _np(b), EPS, offset=offset)
    np.testing.assert_allclose(got, _np(want), rtol=1e-12, atol=1e-12)
    want.backward(dy)
    dx, dw, db = ref.layer_norm_backward(_np(dy), _np(x), (H,), _np(w), _np(b), EPS, offset=offset)
    for mine, theirs in ((dx, xr.grad), (dw, wr.grad), (db, br.grad)):
        np.testing.assert_allclose(mine, _np(theirs), rtol=1e-10, atol=1e-10)


def test_reference_offset_needs_a_weight():
    with pytest.raises(ValueError, match="offset needs a weight"):
        ref.rms_norm(np.ones((2, 3)), (3,), None, EPS, offset=1.0)


# --- every backend against the reference ---------------------------------------------------


def _backends():
    out = ["composite", "torch", "numba"]
    if backends.triton_available():
        out.append("triton")  # interpreted on CPU (tests/conftest.py)
    return out


@pytest.mark.parametrize("backend", _backends(), indirect=True)
@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm"])
@pytest.mark.parametrize("offset", [1.0, 0.25])
def test_every_backend_forward_and_backward(backend, kind, offset):
    """float32 on the forced backend (which must run it): y, dx, dweight (and dbias)."""
    if backend == "numba" and not backends.numba_available():
        pytest.skip("numba is not installed")
    x, dy, w, b = _data(torch.float32)
    centred = "layer" in kind
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    if kind.startswith("add_"):
        r = torch.randn_like(x)
        fn = getattr(NF, kind)
        args = (xr, r, (H,), wr, br, EPS) if centred else (xr, r, (H,), wr, EPS)
        y, total = fn(*args, offset=offset)
        torch.testing.assert_close(total, x + r)
        base = _np(x + r)
    else:
        fn = getattr(NF, kind)
        args = (xr, (H,), wr, br, EPS) if centred else (xr, (H,), wr, EPS)
        y = fn(*args, offset=offset)
        base = _np(x)
    assert backends.last_used() == backend
    y.backward(dy)
    if centred:
        want = ref.layer_norm(base, (H,), _np(w), _np(b), EPS, offset=offset)
        grads = ref.layer_norm_backward(_np(dy), base, (H,), _np(w), _np(b), EPS, offset=offset)
    else:
        want = ref.rms_norm(base, (H,), _np(w), EPS, offset=offset)
        grads = ref.rms_norm_backward(_np(dy), base, (H,), _np(w), EPS, offset=offset)
    torch.testing.assert_close(y.double(), torch.from_numpy(want), **tol(torch.float32))
    got = (xr.grad, wr.grad, br.grad if centred else None)
    for mine, theirs in zip(got, grads, strict=True):
        if theirs is None:
            assert mine is None
            continue
        assert mine.dtype == torch.float32
        torch.testing.assert_close(
            mine.double(), torch.from_numpy(theirs), **grad_tol(torch.float32)
        )


def test_offset_with_dim_and_auto():
    """A non-trailing axis (dim=1, channels first) on the default backend."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, H, 5, generator=gen)
    w = 0.5 * torch.randn(H, generator=gen)
    y = NF.rms_norm(x, (H,), w, EPS, dim=1, offset=1.0)
    want = ref.rms_norm(x.numpy(), (H,), w.numpy(), EPS, dim=1, offset=1.0)
    torch.testing.assert_close(y.double(), torch.from_numpy(want), **tol(torch.float32))


# --- Gemma's casting in float16/bfloat16 ----------------------------------------------------


def _gemma(x, weight, eps):
    """transformers' GemmaRMSNorm.forward: float32 throughout, (1 + w) in float32, one
    rounding to the input dtype at the end (Llama rounds before multiplying by w)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_as_gemma(dtype):
    x, dy, w, _ = _data(dtype, seed=4, shape=(64, H))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = NF.rms_norm(xr, (H,), wr, EPS, offset=1.0)
    assert y.dtype == dtype
    assert backends.last_used() == "composite"  # a float32 effective weight, a half input
    want_x, want_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = _gemma(want_x, want_w, EPS)
    torch.testing.assert_close(y, want, **tol(dtype))
    # Gemma's order: at most one rounding apart (rsqrt and mean may round differently).
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(1.0)
    assert ((y.float() - want.float()).abs() <= ulp).all()
    y.backward(dy)
    want.backward(dy)
    assert wr.grad.dtype == dtype and xr.grad.dtype == dtype
    torch.testing.assert_close(xr.grad, want_x.grad, **grad_tol(dtype))
    torch.testing.assert_close(wr.grad, want_w.grad, **grad_tol(dtype))
    # and against the float64 reference of the same (rounded) inputs
    ref_y = ref.rms_norm(_np(x), (H,), _np(w), EPS, offset=1.0)
    torch.testing.assert_close(y.double(), torch.from_numpy(ref_y), **tol(dtype))


def test_half_weight_offset_is_widened_before_adding():
    """1 + w in bfloat16 would round w = 2^-9 away; the effective weight is float32, as
    Gemma's ``1.0 + weight.float()``, and carries the gradient back to the bf16 weight."""
    w = torch.full((2,), 2.0**-9, dtype=torch.bfloat16, requires_grad=True)
    assert (1.0 + w).detach().eq(1.0).all()  # what a bfloat16 sum would give
    effective = offset_weight("rms_norm", w, 1.0)
    assert effective.dtype == torch.float32
    assert torch.equal(effective, 1.0 + w.detach().float())
    effective.sum().backward()
    assert w.grad.dtype == torch.bfloat16 and torch.equal(w.grad, torch.ones_like(w))
    w64 = torch.zeros(2, dtype=torch.float64)
    assert offset_weight("rms_norm", w64, 1.0).dtype == torch.float64


# --- modules -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [normlab.RMSNorm, normlab.LayerNorm])
def test_module_offset_keeps_the_weight_and_its_state_dict(cls):
    plain, offset = cls(H), cls(H, offset=1.0)
    assert list(offset.state_dict()) == list(plain.state_dict())
    assert torch.equal(offset.weight, torch.zeros(H))  # offset + weight starts at 1
    assert "offset=1.0" in repr(offset) and "offset" not in repr(plain)
    assert offset.offset == 1.0 and plain.offset == 0.0
    x, _, w, _ = _data(torch.float32)
    with torch.no_grad():
        offset.weight.copy_(w)
        plain.weight.copy_(w + 1)
    torch.testing.assert_close(offset(x), plain(x))
    fresh = cls(H, offset=1.0)
    fresh.load_state_dict(offset.state_dict())
    torch.testing.assert_close(fresh(x), offset(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [normlab.RMSNorm, normlab.LayerNorm])
def test_offset_argument_errors(cls):
    with pytest.raises(ValueError, match="needs elementwise_affine=True"):
        cls(H, elementwise_affine=False, offset=1.0)
    cls(H, elementwise_affine=False, offset=0.0)  # no offset: fine
    with pytest.raises(TypeError, match="offset"):
        cls(H, offset="1")
    with pytest.raises(ValueError, match="offset"):
        cls(H, offset=float("nan"))
    with pytest.raises(TypeError):
        cls(H, 1e-5, True, offset=None)
    x = torch.randn(2, H)
    with pytest.raises(ValueError, match="needs a weight"):
        NF.rms_norm(x, (H,), None, offset=1.0)
    with pytest.raises(ValueError, match="needs a weight"):
        NF.layer_norm(x, (H,), None, offset=1.0)
    for bad in ("1", torch.tensor([1.0, 2.0]), False, None):
        with pytest.raises(TypeError, match="offset"):
            NF.rms_norm(x, (H,), torch.ones(H), offset=bad)
    y = NF.rms_norm(x, (H,), torch.zeros(H), offset=torch.tensor(1.0))  # a 1-element tensor
    torch.testing.assert_close(y, NF.rms_norm(x, (H,), torch.ones(H)))


def test_module_gradient_flows_to_the_stored_weight():
    m = normlab.RMSNorm(H, eps=EPS, offset=1.0)
    x, dy, w, _ = _data(torch.float32, seed=5)
    with torch.no_grad():
        m.weight.copy_(w)
    m(x).backward(dy)
    _, dw, _ = ref.rms_norm_backward(_np(dy), _np(x), (H,), _np(w), EPS, offset=1.0)
    torch.testing.assert_close(
        m.weight.grad.double(), torch.from_numpy(dw), **grad_tol(torch.float32)
    )
