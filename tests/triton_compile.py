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


def _norms_cases():
    """The GroupNorm, BatchNorm and PowerNorm kernels at the launchers' default blocks and
    warps, with every flag that adds registers switched on: channels last (B == 1) and
    channels first (B > 1; bfloat16 too), groups of a large and of a one-position layout."""
    from normlab.kernels.gpu import channels, groups, moments, power_norm

    def pointers(dtype, names, stats=()):
        return {n: f"*{dtype}" for n in names} | {n: "*fp32" for n in stats}

    ints = {"R": "i32", "C": "i32", "B": "i32"}
    for dtype, channels_last in (("fp32", True), ("fp32", False), ("bf16", False)):
        lay = channels.layout((4096, 256, 1) if channels_last else (32, 64, 3136))
        common = {"CHANNELS_LAST": channels_last, "BLOCK_R": lay.block_r, "BLOCK_C": lay.block_c}
        label = f"{dtype} B{'=' if channels_last else '>'}1"
        warps = channels.WARPS
        signature = pointers(dtype, ["x_ptr"], ["pn_ptr", "pmean_ptr", "pm2_ptr"])
        signature |= {"mask_ptr": "*u8", "first_ptr": "*i64", **ints, "span": "i32"}
        constants = {"MASKED": True, **common}
        yield f"moments {label}", channels._moments_kernel, signature, constants, warps
        signature = pointers(dtype, ["x_ptr", "y_ptr", "w_ptr", "b_ptr"])
        signature |= pointers("fp32", ["center_ptr", "offset_ptr", "rstd_ptr"])
        signature |= {**ints, "channel_tiles": "i32"}
        flags = ("HAS_CENTER", "HAS_OFFSET", "HAS_WEIGHT", "HAS_BIAS")
        constants = dict.fromkeys(flags, True) | common
        yield f"apply {label}", channels._apply_kernel, signature, constants, warps
        signature = pointers(dtype, ["dy_ptr", "x_ptr", "w_ptr", "dx_ptr"])
        signature |= pointers("fp32", ["mean_ptr", "rstd_ptr", "pdb_ptr", "pdw_ptr", "pd_ptr"])
        signature |= {"mask_ptr": "*u8", **ints, "span": "i32"}
        for masked, given in ((True, False), (False, True)):
            constants = {"MASKED": masked, "STATS_GIVEN": given, "HAS_WEIGHT": True, **common}
            name = f"grad sums {label} given={given}"
            yield name, channels._grad_sums_kernel, signature, constants, warps
        signature = pointers(dtype, ["dy_ptr", "x_ptr", "w_ptr", "dx_ptr"])
        signature |= pointers("fp32", ["mean_ptr", "rstd_ptr", "delta_ptr", "kb_ptr", "kk_ptr"])
        signature |= {"mask_ptr": "*u8", **ints, "channel_tiles": "i32"}
        constants = {"MASKED": True, "HAS_WEIGHT": True, **common}
        yield f"input grad {label}", channels._input_grad_kernel, signature, constants, warps
        signature = pointers(dtype, ["dy_ptr", "x_ptr", "w_ptr", "dx_ptr"])
        signature |= pointers("fp32", ["rstd_ptr", "nu_ptr", "parts_ptr"])
        signature |= {"mask_ptr": "*u8", **ints, "span": "i32"}
        constants = {"MASKED": True, "HAS_WEIGHT": True, "NUM_SUMS": power_norm.SUMS, **common}
        name = f"power norm backward {label}"
        yield name, power_norm._power_norm_backward_kernel, signature, constants, warps
    names = ["pn_ptr", "pmean_ptr", "pm2_ptr", "mean_ptr", "var_ptr", "rstd_ptr", "center_ptr"]
    signature = pointers("fp32", ["x_ptr", *names, "offset_ptr", "count_ptr"])
    signature |= {"first_ptr": "*i64", "partials": "i32", "C": "i32", "B": "i32", "eps": "fp32"}
    constants = {"MASKED": True, "BLOCK_C": 128}
    yield "moments finalize", channels._moments_finalize_kernel, signature, constants, 4
    names = ["pdb_ptr", "pdw_ptr", "pd_ptr", "rstd_ptr", "count_ptr", "delta_ptr", "kb_ptr"]
    signature = pointers("bf16", ["w_ptr", "dw_ptr", "db_ptr"], [*names, "kk_ptr"])
    signature |= {"partials": "i32", "C": "i32"}
    constants = {"STATS_GIVEN": False, "HAS_WEIGHT": True, "BLOCK_C": 128}
    yield "grad finalize", channels._grad_finalize_kernel, signature, constants, 4
    for dtype, per, positions in (("fp32", 16, 3136), ("bf16", 16, 3136), ("fp32", 32, 1)):
        block_c, block_s = groups.tiles(per, positions)
        constants = {"MASKED": True, "HAS_WEIGHT": True, "BLOCK_C": block_c, "BLOCK_S": block_s}
        sizes = {"C": "i32", "S": "i32", "groups": "i32", "per": "i32"}
        label = f"{dtype} {per}x{positions}"
        signature = pointers(dtype, ["x_ptr", "w_ptr", "b_ptr", "y_ptr"])
        signature |= pointers("fp32", ["mean_ptr", "var_ptr", "rstd_ptr"])
        signature |= {"mask_ptr": "*u8", **sizes, "eps": "fp32"}
        forward = constants | {"HAS_BIAS": True}
        yield f"group norm {label}", groups._group_norm_kernel, signature, forward, groups.WARPS
        signature = pointers(dtype, ["dy_ptr", "x_ptr", "w_ptr", "dx_ptr"])
        signature |= pointers("fp32", ["mean_ptr", "rstd_ptr", "pw_ptr", "pb_ptr"])
        signature |= {"mask_ptr": "*u8", **sizes}
        kernel = groups._group_norm_backward_kernel
        yield f"group norm backward {label}", kernel, signature, constants, groups.WARPS
    signature = {"parts_ptr": "*fp32", "out_ptr": "*bf16", "rows": "i32", "cols": "i32"}
    constants = {"BLOCK_ROWS": moments.COLUMN_BLOCK_ROWS, "BLOCK_COLS": 128}
    yield "column sums", moments._column_sums_kernel, signature, constants, 4


FAMILIES = {"rows": _rows_cases, "norms": _norms_cases}


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
