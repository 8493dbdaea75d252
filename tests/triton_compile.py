"""Compile Triton kernels for a real GPU (sm_90) without one, and report their registers and
stack (spills): the interpreter runs code the compiler rejects (a non-constexpr global, a
type that changes in a loop) and says nothing of registers.

Run as ``TRITON_INTERPRET=0 python tests/triton_compile.py FAMILY`` (the test modules do, in
a subprocess: their own process runs the interpreter); prints one JSON object per kernel
configuration. ``FAMILIES`` maps a family name to its configurations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET = ("cuda", 90, 32)


def _rows_cases():
    """The row kernels at the launchers' default blocks and warps for the issue's feature
    counts, float32 and bfloat16, with every flag that adds registers switched on."""
    from normlab.kernels.gpu import rows

    for dtype, size in (("fp32", 4), ("bf16", 2)):
        for n in (1024, 4096, 16384, 65536, 262144):
            block = rows.forward_block(n, size)
            signature = {name: f"*{dtype}" for name in ("X", "RESIDUAL", "W", "B", "Y", "S")}
            signature |= {"MEAN": "*fp32", "RSTD": "*fp32", "n_cols": "i32", "eps": "fp32"}
            for residual in (False, True):
                constants = {
                    "CENTER": True,
                    "HAS_RESIDUAL": residual,
                    "HAS_WEIGHT": True,
                    "HAS_BIAS": True,
                    "BLOCK": block,
                    "LOOPED": block < n,
                }
                label = f"forward {dtype} N={n} residual={residual}"
                kernel, warps = rows._row_norm_forward_kernel, rows.num_warps(block)
                yield label, kernel, signature, constants, warps
            block = rows.backward_block(n)
            signature = {name: f"*{dtype}" for name in ("DY", "X", "W", "EXTRA", "DX")} | {
                "MEAN": "*fp32",
                "RSTD": "*fp32",
                "PARTIAL_DW": "*fp32",
                "PARTIAL_DB": "*fp32",
                "ROW_SUMS": "*fp32",
                "n_rows": "i32",
                "n_cols": "i32",
            }
            constants = {
                "CENTER": True,
                "HAS_WEIGHT": True,
                "HAS_EXTRA": True,
                "BLOCK": block,
                "LOOPED": block < n,
            }
            warps = rows.backward_warps(block, block < n)
            kernel = rows._row_norm_backward_kernel
            yield f"backward {dtype} N={n}", kernel, signature, constants, warps
    signature = {"PARTIAL_DW": "*fp32", "PARTIAL_DB": "*fp32", "DW": "*bf16", "DB": "*bf16"}
    signature |= {"n_partials": "i32", "n_cols": "i32"}
    constants = {"BLOCK_ROWS": 32, "BLOCK_COLS": 128}
    yield "sum partials", rows._sum_partials_kernel, signature, constants, 4


FAMILIES = {"rows": _rows_cases}


def _resource_usage(cubin: bytes) -> dict:
    """REG and STACK of a cubin (cuobjdump, shipped with Triton's CUDA backend)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        out = subprocess.run(
            [str(tool), "--dump-resource-usage", file.name], capture_output=True, text=True
        ).stdout
    usage = {}
    for word in out.split():
        key, _, value = word.partition(":")
        if key in ("REG", "STACK") and value.isdigit():
            usage[key.lower()] = int(value)
    return usage


def main(family: str) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run with TRITON_INTERPRET=0: the interpreter does not compile")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget(*TARGET)
    for label, kernel, signature, constants, warps in FAMILIES[family]():
        signature = signature | {name: "constexpr" for name in constants}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        compiled = triton.compile(source, target=target, options={"num_warps": warps})
        usage = _resource_usage(compiled.asm["cubin"])
        print(json.dumps({"kernel": label, "num_warps": warps, **usage}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
