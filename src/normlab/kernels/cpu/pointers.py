"""Arrays from raw addresses, for the launches whose fixed cost is the call itself.

A Numba kernel called with NumPy arrays pays for making them: ``Tensor.numpy()`` and
``detach()`` cost about 0.6 and 0.5-1.6 us each (a Parameter is slower), several times the
work of a decode-size LayerNorm (one 4096-element row: about 1 us). The decode-size entries
take each tensor's ``data_ptr()`` (an integer) instead and view it here as a C-contiguous
array of the given shape and element type, with no Python object in between.

The caller guarantees what the array claims: a live, C-contiguous buffer of that shape and
dtype on the CPU. ``normlab.kernels.cpu.launchers.row_norm_inference`` builds such launches
only for the plans whose key fixes the input's shape, dtype, device and contiguity and the
parameters' shape, dtype and device, and checks the parameters' contiguity at each call.
"""

from __future__ import annotations

from numba import carray, types
from numba.extending import intrinsic

from normlab.kernels.cpu.runtime import serial


@intrinsic
def _pointer(typingctx, address, witness):
    """``address`` (an integer) as a pointer to ``witness``'s type (a NumPy scalar whose
    value is unused: it only carries the element type to the compiler)."""
    pointer = types.CPointer(witness)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(types.intp, witness), codegen


@serial
def array_at(address, shape, witness):
    """The C-contiguous array of ``shape`` (a tuple) and ``witness``'s dtype at ``address``."""
    return carray(_pointer(address, witness), shape)


def direct(kernel, *example):
    """``kernel``'s compiled entry point for arguments of the types of ``example`` (compiled,
    or loaded from Numba's cache, now): a call skips the dispatcher's type resolution
    (about 0.4 us of a 2 us decode-size launch). Arguments of other types are not checked:
    call it with exactly these types (Python int, float, bool and the same NumPy scalar)."""
    from numba import typeof

    return kernel.compile(tuple(typeof(value) for value in example))
