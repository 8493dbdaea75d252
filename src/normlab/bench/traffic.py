"""The minimal-traffic model: the bytes an op must move at the least, from which GB/s and
the size of the reference memory copy follow.

Each full-size tensor (the input's shape and dtype) counts once per read or write; weights,
biases, statistics, running buffers, masks and lengths are O(rows) or O(channels) and are
not counted. An implementation that reads the input twice (a statistics pass, then a
normalize pass) still gets the single-read figure: GB/s is "useful bytes per second".
"""

from __future__ import annotations

import math

from normlab.bench.cases import Case

DIRECTIONS = ("forward", "backward")

FUSED_ADD_OPS = ("add_layer_norm", "add_rms_norm")

MODEL = {
    "forward": "read x + write y (2 tensors)",
    "backward": "read x + read dy + write dx (3 tensors); weight/bias gradients not counted",
    "fused add forward": "read x + read residual + write y + write sum (4 tensors)",
    "fused add backward": (
        "read sum (saved x + residual) + read dy + read dsum + write one gradient "
        "(the input's and the residual's gradients are the same tensor) (4 tensors)"
    ),
    "not counted": "weights, biases, statistics, running buffers, masks, lengths",
    "two-pass bound": (
        "BatchNorm with batch statistics over an input larger than the cache reads it twice "
        "(the statistics, then the normalization): the time of summing the tensors read "
        "twice (forward x; backward x and dy) plus the copy of half the traffic"
    ),
}
"""The model in words, as written into the JSON and the docs."""


def tensors_moved(case: Case, direction: str) -> int:
    """Full-size tensors read or written at the least by ``case`` in ``direction``."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if case.op in FUSED_ADD_OPS:
        return 4
    return 2 if direction == "forward" else 3


def rereads(case: Case, direction: str) -> int:
    """Full-size tensors that a two-pass implementation reads a second time: BatchNorm with
    batch statistics, whose normalization needs statistics over the whole batch (forward:
    x; backward: x and dy); 0 for the others (one pass over each row or group, in cache)."""
    if case.op != "batch_norm" or not case.training or case.inference:
        return 0
    return 1 if direction == "forward" else 2


def traffic_bytes(case: Case, direction: str, element_size: int | None = None) -> int:
    """Bytes moved under the minimal-traffic model (default: the case dtype's element
    size, 4 bytes for float32)."""
    size = case.element_size if element_size is None else element_size
    return tensors_moved(case, direction) * math.prod(case.shape) * size


def model_name(case: Case, direction: str) -> str:
    """The key of ``MODEL`` that applies to ``case`` in ``direction``."""
    return f"fused add {direction}" if case.op in FUSED_ADD_OPS else direction
