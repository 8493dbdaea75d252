"""Tuning sweep of the Triton row kernels on a GPU: warps (and the backward's persistent grid
and looped block) around the launchers' defaults, at the bench grid's 32768 rows. Prints one
JSON line per configuration (GB/s from triton.testing.do_bench, which flushes L2 between
runs) and marks the launchers' default. Run by scripts/gpu_check.sh; ``--toy`` rehearses the
code path on the CPU in Triton's interpreter (tiny shapes, one untimed call)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

import torch

TOY = "--toy" in sys.argv
if TOY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from normlab.kernels.gpu import rows  # noqa: E402  (after TRITON_INTERPRET)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _time_ms(fn) -> float:
    if DEVICE == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=30)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _emit(**record):
    print(json.dumps(record), flush=True)


def _measure(call, moved: int, **record) -> None:
    """Time ``call`` and print its record with ms and GB/s, or the compiler's refusal."""
    try:
        ms = _time_ms(call)
    except Exception as error:  # a configuration the compiler refuses
        _emit(**record, error=str(error).splitlines()[0][:200])
        return
    _emit(**record, ms=ms, gbps=moved / ms / 1e6)


def _data(n_rows, n_cols, dtype):
    x = torch.randn(n_rows, n_cols, device=DEVICE, dtype=dtype)
    weight = torch.randn(n_cols, device=DEVICE, dtype=dtype)
    bias = torch.randn(n_cols, device=DEVICE, dtype=dtype)
    return x, weight, bias


def sweep_forward(n_rows, widths, warps_list, loop_blocks):
    default_warps = rows.num_warps
    for name, dtype in DTYPES.items():
        for n_cols in widths:
            x, weight, bias = _data(n_rows, n_cols, dtype)
            moved = 2 * x.numel() * x.element_size()
            default_block = rows.forward_block(n_cols, x.element_size())
            blocks = [default_block] if default_block >= n_cols else loop_blocks
            for block in blocks:
                for warps in warps_list:
                    rows.num_warps = lambda _block, w=warps: w
                    call = partial(rows.row_norm_forward, x, weight, bias, 1e-5, True)
                    try:
                        _measure(
                            partial(call, block=block),
                            moved,
                            kind="forward",
                            dtype=name,
                            cols=n_cols,
                            block=block,
                            warps=warps,
                            default=block == default_block and warps == default_warps(block),
                        )
                    finally:
                        rows.num_warps = default_warps


def sweep_backward(n_rows, widths, warps_list, per_sm_list, loop_blocks):
    default_warps = rows.backward_warps
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 4
    for name, dtype in DTYPES.items():
        for n_cols in widths:
            x, weight, _ = _data(n_rows, n_cols, dtype)
            dy = torch.randn_like(x)
            _, mean, rstd = rows.row_norm_forward(x, weight, None, 1e-5, True)
            moved = 3 * x.numel() * x.element_size()
            default_block = rows.backward_block(n_cols)
            blocks = [default_block] if default_block >= n_cols else loop_blocks
            for block in blocks:
                looped = block < n_cols
                for warps in warps_list:
                    rows.backward_warps = lambda _b, _l, w=warps: w
                    for per_sm in per_sm_list:
                        call = partial(rows.row_norm_backward, dy, x, weight, mean, rstd, True)
                        _measure(
                            partial(call, block=block, programs=sms * per_sm),
                            moved,
                            kind="backward",
                            dtype=name,
                            cols=n_cols,
                            block=block,
                            warps=warps,
                            per_sm=per_sm,
                            looped=looped,
                        )
                    rows.backward_warps = default_warps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--toy", action="store_true", help="tiny shapes in the interpreter")
    parser.add_argument("--part", choices=("forward", "backward", "all"), default="all")
    parser.add_argument("--cols", type=int, nargs="+", help="feature counts (default: a grid)")
    args = parser.parse_args()
    if args.toy:
        n_rows, fwd, bwd, loop = 4, [32, 128], [32], [16]
        warps, per_sm = [4], [1]
    else:
        n_rows, fwd, bwd, loop = 32768, [1024, 4096, 16384, 65536], [1024, 4096, 16384], None
        warps, per_sm = [4, 8, 16, 32], [1, 2, 4]
    if args.cols:
        fwd = bwd = args.cols
    if args.part in ("forward", "all"):
        sweep_forward(n_rows, fwd, warps, loop or [2048, 4096, 8192])
    if args.part in ("backward", "all"):
        sweep_backward(n_rows, bwd, warps[:3], per_sm, loop or [1024, 2048, 4096])


if __name__ == "__main__":
    main()
