"""Half-precision storage for the Numba kernels: ``load`` and ``store`` of array elements.

Numba has no float16 or bfloat16 type on the CPU, so the launchers hand half tensors to the
kernels as 16-bit integer views of their memory (no copy), one integer dtype per format:

    bfloat16 -> uint16        float16 -> int16        (``launchers.array``)

A kernel reads ``load(a, j)`` and writes ``store(a, j, v)`` wherever its arrays may hold
input-dtype data; both compile to plain indexing for float32/float64 arrays (the kernels'
code for those dtypes is unchanged), and for the integer views:

- ``load`` widens exactly to float32: bfloat16 bits << 16 are the float32's bits; float16
  with LLVM's ``fpext half`` where the target has the instruction (``native_float16``:
  F16C's vcvtph2ps on x86), else by integer operations on the bits (subnormals, Inf and
  NaN exact either way);
- ``store`` rounds v to the format with round-to-nearest-even, NaN stays NaN, Inf stays
  Inf, overflow goes to Inf. A float64 v is rounded once: first to float32 with
  round-to-odd (the neighbour with an odd last bit when inexact), which loses nothing that
  the second rounding to 8 or 11 bits needs, so the two roundings equal one.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from normlab.kernels.cpu.runtime import serial


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose bits are ``bits`` (uint32)."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_from_float(typingctx, value):
    """The bits (uint32) of the float32 ``value``."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _float_from_half_bits_native(typingctx, bits):
    """The float16 whose bits are ``bits`` (int16), widened to float32 by LLVM's ``fpext
    half`` (one instruction where ``native_float16()``)."""

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _half_bits_from_float_native(typingctx, value):
    """The bits (int16) of the float32 ``value`` rounded to float16 (nearest even) by
    LLVM's ``fptrunc`` (one instruction where ``native_float16()``)."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(types.float32), codegen


@functools.cache
def native_float16() -> bool:
    """Whether Numba's target converts float16 in instructions: AArch64, or x86 with F16C
    (what Numba targets: ``NUMBA_CPU_FEATURES`` if set, which ``NUMBA_CPU_NAME`` empties,
    else the host's). Elsewhere LLVM would call ``__extendhfsf2``/``__truncsfhf2``, which
    Numba's JIT does not link (LLVM aborts the process): the kernels use the integer
    conversions instead, exact as well but about 8 times slower."""
    import llvmlite.binding as llvm
    from numba.core import config

    arch = llvm.get_process_triple().split("-")[0]
    if arch in ("aarch64", "arm64"):
        return True
    if arch not in ("x86_64", "i386", "i686"):
        return False
    features = config.CPU_FEATURES
    if features is None:
        try:
            features = llvm.get_host_cpu_features().flatten()
        except RuntimeError:
            return False
    return "+f16c" in features.split(",")


_U = np.uint32
_REBIAS = _U((127 - 15) << 23)  # float32 bias - float16 bias, in the exponent field
_SUBNORMAL = _U(113 << 23)  # 2^-14, float16's smallest normal, as float32 bits
_HALF_OVERFLOW = _U((127 + 16) << 23)  # 65536: Inf from here on
_ALIGN = _U((127 - 15 + 23 - 10 + 1) << 23)  # 0.5: its ulp is float16's subnormal step


@serial
def _pick(condition, a, b):
    """a if condition else b (uint32), as bit masks rather than a branch."""
    mask = _U(0) - _U(condition)
    return (a & mask) | (b & ~mask)


@serial
def _float_from_half_bits_portable(h):
    """The float16 whose bits are ``h`` (int16), widened exactly to float32 (integer
    operations, as F. Giesen's half_to_float: no F16C or runtime library needed)."""
    u = _U(h) & _U(0xFFFF)
    o = ((u & _U(0x7FFF)) << _U(13)) + _REBIAS  # exponent and mantissa at float32's place
    exponent = u & _U(0x7C00)
    special = o + _REBIAS  # Inf or NaN: all exponent bits set
    # zero or subnormal: renormalized by a float subtraction (of normal numbers)
    tiny = _bits_from_float(_float_from_bits(o + _U(1 << 23)) - _float_from_bits(_SUBNORMAL))
    o = _pick(exponent == _U(0x7C00), special, _pick(exponent == 0, tiny, o))
    return _float_from_bits(o | ((u & _U(0x8000)) << _U(16)))


@serial
def _half_bits_from_float_portable(v):
    """The bits (int16) of the float32 ``v`` rounded to float16, nearest even; Inf from
    65520 on, NaN stays NaN (F. Giesen's float_to_half_fast3_rtne)."""
    f = _bits_from_float(v)
    sign = (f >> _U(16)) & _U(0x8000)
    f &= _U(0x7FFFFFFF)
    special = _pick(f > _U(0x7F800000), _U(0x7E00), _U(0x7C00))  # NaN, Inf
    # subnormal or zero: adding 2^-1 (as float32) aligns and rounds the 10 mantissa bits
    tiny = _bits_from_float(_float_from_bits(f) + _float_from_bits(_ALIGN)) - _ALIGN
    odd = (f >> _U(13)) & _U(1)
    normal = (f + _U(((15 - 127) << 23) & 0xFFFFFFFF) + _U(0xFFF) + odd) >> _U(13)
    o = _pick(f >= _HALF_OVERFLOW, special, _pick(f < _SUBNORMAL, tiny, normal))
    return np.int16(o | sign)


@serial
def _bfloat16_bits(v):
    """The bits (uint16) of the float32 ``v`` rounded to bfloat16, nearest even."""
    bits = _bits_from_float(v)
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep it quiet
        return np.uint16((bits >> np.uint32(16)) | np.uint32(0x40))
    odd = (bits >> np.uint32(16)) & np.uint32(1)
    return np.uint16((bits + np.uint32(0x7FFF) + odd) >> np.uint32(16))


@serial
def _to_float_odd(v):
    """float64 v as float32 rounded to odd: exact if representable, else the neighbour
    (of the two float32 around v) whose last bit is 1."""
    f = np.float32(v)
    bits = _bits_from_float(f)
    if np.float64(f) != v and (bits & np.uint32(1)) == 0 and v == v:
        # f is the even neighbour: the odd one is a step towards v (sign-magnitude bits)
        if abs(np.float64(f)) > abs(v):
            bits -= np.uint32(1)
        else:
            bits += np.uint32(1)
        f = _float_from_bits(bits)
    return f


def _single(v):
    """float32 of v without a second rounding later (``_to_float_odd`` for float64)."""


@overload(_single)
def _single_overload(v):
    if v == types.float64:
        return lambda v: _to_float_odd(v)
    return lambda v: np.float32(v)


def load(a, j):
    """a[j], widened to float32 if ``a`` holds half bits (see the module docstring)."""


@overload(load)
def _load_overload(a, j):
    if a.dtype == types.uint16:
        return lambda a, j: _float_from_bits(np.uint32(a[j]) << np.uint32(16))
    if a.dtype == types.int16 and native_float16():
        return lambda a, j: _float_from_half_bits_native(a[j])
    if a.dtype == types.int16:
        return lambda a, j: _float_from_half_bits_portable(a[j])
    return lambda a, j: a[j]


def store(a, j, v):
    """a[j] = v, rounded to the half format if ``a`` holds half bits."""


@overload(store)
def _store_overload(a, j, v):
    if a.dtype == types.uint16:

        def store_bfloat16(a, j, v):
            a[j] = _bfloat16_bits(_single(v))

        return store_bfloat16
    if a.dtype == types.int16 and native_float16():

        def store_float16_native(a, j, v):
            a[j] = _half_bits_from_float_native(_single(v))

        return store_float16_native
    if a.dtype == types.int16:

        def store_float16_portable(a, j, v):
            a[j] = _half_bits_from_float_portable(_single(v))

        return store_float16_portable

    def store_float(a, j, v):
        a[j] = v

    return store_float


def compute(a, v):
    """v in the arithmetic dtype of kernels over ``a``'s elements: float32 for half bits
    (the widened values are exact in float32 and the output keeps 8 or 11 bits) and for
    float32 (with ``pivot``'s shift: float32 vectors are twice as wide as float64 ones, and
    the rows kernels were bound by float64 arithmetic; outputs and gradients stay within a
    few float32 ulps, 4.5e-7 relative at 262144 features on 1e4 + 1e-3 noise), float64 for
    float64."""


@overload(compute)
def _compute_overload(a, v):
    if a.dtype in (types.uint16, types.int16, types.float32):
        return lambda a, v: np.float32(v)
    return lambda a, v: np.float64(v)


def pivot(a):
    """A shift for sums over the row ``a`` in ``compute``'s dtype: its first element for
    float32 and half bits (float32 sums of x - pivot keep the spread of data far from zero,
    1e4 + noise; x - pivot is exact for x near the pivot), 0 for float64 (float64 sums need
    none; x - 0.0 compiles to x)."""


@overload(pivot)
def _pivot_overload(a):
    if a.dtype == types.float32:
        return lambda a: a[0] if a.shape[0] > 0 else np.float32(0)
    if a.dtype in (types.uint16, types.int16):
        return lambda a: load(a, 0) if a.shape[0] > 0 else np.float32(0)
    return lambda a: 0.0


def scratch(a, rows, cols):
    """An uninitialized (rows, cols) array of ``compute``'s dtype for ``a``'s elements."""


@overload(scratch)
def _scratch_overload(a, rows, cols):
    if a.dtype in (types.uint16, types.int16, types.float32):
        return lambda a, rows, cols: np.empty((rows, cols), np.float32)
    return lambda a, rows, cols: np.empty((rows, cols), np.float64)
