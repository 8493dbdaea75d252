"""The grid: which norm runs on which shape, in which variant.

A :class:`Case` names an op and everything that shapes its workload; ``GRIDS`` holds the
default grid (the issue's), a quick one (one representative shape per op and variant, for
a run of a minute or two) and a toy one (tiny shapes, for tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OPS = (
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "group_norm",
    "instance_norm",
)
"""Op names, as in ``normlab.functional`` (``--only`` takes these)."""

PADDING = 0.3
"""Fraction of padded positions in the masked BatchNorm cases (on average over the batch)."""


@dataclass(frozen=True)
class Case:
    """One workload of the grid.

    ``shape`` is the input's shape: (rows, features) for the feature norms, (N, C, L) or
    (B, L, C) for BatchNorm (``channel_dim`` 1 or -1), (N, C, H, W) for GroupNorm and
    InstanceNorm. ``training`` selects BatchNorm's batch statistics (else running ones);
    ``inference``: no input needs a gradient, every contender runs under
    ``torch.inference_mode``, forward only (a decode step, a CNN's eval at batch 1);
    ``padding`` is the fraction of padded positions (BatchNorm via ``lengths=``; 0: no mask).
    ``dtype``: the inputs' and parameters' dtype (a ``torch`` attribute name). ``layout``
    (feature norms): "contiguous"; "strided", x a (rows, features) view of every other
    block of features of a (rows, 2 * features) tensor (rows not adjacent); "channels_first",
    LayerNorm over axis 1 of (N, C, H, W) (the ConvNeXt case; torch runs permute, LayerNorm,
    permute back).
    """

    op: str
    shape: tuple[int, ...]
    channel_dim: int = 1
    training: bool = True
    padding: float = 0.0
    groups: int = 32
    dtype: str = "float32"
    layout: str = "contiguous"
    inference: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def element_size(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def masked(self) -> bool:
        return self.padding > 0

    @property
    def variant(self) -> str:
        """What distinguishes this case from others of the same op and shape."""
        if self.op == "batch_norm":
            layout = "N,C,L" if self.channel_dim == 1 else "B,L,C dim=-1"
            mode = "train" if self.training else "eval"
            pad = f" {round(self.padding * 100)}% pad" if self.masked else ""
            return f"{mode} {layout}{pad}" + (" inference" if self.inference else "")
        if self.op == "group_norm":
            return f"{self.groups} groups" + (" inference" if self.inference else "")
        words = [] if self.layout == "contiguous" else [self.layout.replace("_", "-")]
        words += [] if self.dtype == "float32" else [self.dtype]
        return " ".join(words + (["inference"] if self.inference else []))

    @property
    def label(self) -> str:
        shape = "x".join(str(n) for n in self.shape)
        return f"{self.op} {shape} {self.variant}".strip()


def _feature_cases(shapes: list[tuple[int, int]]) -> list[Case]:
    return [
        Case(op, shape)
        for op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
        for shape in shapes
    ]


def _gpu_feature_cases(rows: int, features: list[int]) -> list[Case]:
    """The feature norms on (rows, features), float32 then bfloat16 (the GPU grids)."""
    return [
        Case(op, (rows, n), dtype=dtype)
        for op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
        for dtype in ("float32", "bfloat16")
        for n in features
    ]


def _path_cases(decode: int, half: tuple[int, int], image, strided, small_image) -> list[Case]:
    """The calls a converted model makes besides big contiguous float32 rows: decode-size
    inputs (1 and 8 rows; in inference, and with a gradient), bfloat16 and float16 on the
    CPU, channels-first LayerNorm, a strided view, and one image's BatchNorm in eval,
    GroupNorm and InstanceNorm (a CNN or a diffusion UNet at batch 1)."""
    c = small_image[1]
    return [
        Case("batch_norm", small_image, channel_dim=1, training=False),
        Case("batch_norm", small_image, channel_dim=1, training=False, inference=True),
        Case("group_norm", small_image, groups=min(32, c)),
        Case("group_norm", small_image, groups=min(32, c), inference=True),
        Case("instance_norm", small_image),
        *(
            Case(op, (rows, decode), inference=inference)
            for op in ("layer_norm", "rms_norm")
            for inference in (True, False)
            for rows in (1, 8)
        ),
        *(
            Case(op, half, dtype=dtype)
            for op in ("layer_norm", "rms_norm")
            for dtype in ("bfloat16", "float16")
        ),
        Case("layer_norm", image, layout="channels_first"),
        Case("layer_norm", strided, layout="strided"),
        Case("layer_norm", strided, layout="strided", inference=True),
    ]


def _batch_norm_cases(ncl: tuple[int, int, int], nlc: tuple[int, int, int]) -> list[Case]:
    cases = []
    for padding in (0.0, PADDING):
        cases.append(Case("batch_norm", ncl, channel_dim=1, padding=padding))
        cases.append(Case("batch_norm", nlc, channel_dim=-1, padding=padding))
    cases.append(Case("batch_norm", ncl, channel_dim=1, training=False))
    cases.append(Case("batch_norm", nlc, channel_dim=-1, training=False))
    return cases


def _image_cases(shape: tuple[int, int, int, int], groups: int) -> list[Case]:
    return [Case("group_norm", shape, groups=groups), Case("instance_norm", shape)]


GRIDS: dict[str, list[Case]] = {
    "default": _feature_cases([(8192, 1024), (32768, 768), (4096, 4096)])
    + _path_cases(4096, (8192, 1024), (16, 96, 56, 56), (2048, 1024), (1, 256, 14, 14))
    + _batch_norm_cases((64, 256, 512), (64, 512, 256))
    + _image_cases((32, 256, 32, 32), 32),
    "quick": [
        *_feature_cases([(8192, 1024)]),
        Case("layer_norm", (1, 4096)),
        Case("layer_norm", (1, 4096), inference=True),
        Case("layer_norm", (8192, 1024), dtype="bfloat16"),
        Case("layer_norm", (16, 96, 56, 56), layout="channels_first"),
        Case("layer_norm", (2048, 1024), layout="strided"),
        Case("layer_norm", (2048, 1024), layout="strided", inference=True),
        Case("batch_norm", (1, 256, 14, 14), channel_dim=1, training=False),
        Case("group_norm", (1, 256, 14, 14), groups=32),
        Case("batch_norm", (64, 256, 512), channel_dim=1),
        Case("batch_norm", (64, 512, 256), channel_dim=-1, padding=PADDING),
        Case("batch_norm", (64, 256, 512), channel_dim=1, training=False),
        *_image_cases((32, 256, 32, 32), 32),
    ],
    "toy": _feature_cases([(64, 32)])
    + _path_cases(32, (16, 32), (2, 8, 4, 4), (16, 32), (1, 8, 4, 4))
    + _batch_norm_cases((4, 8, 16), (4, 16, 8))
    + _image_cases((2, 8, 4, 4), 4),
    # On a CUDA device (``normlab.bench.gpu``): the rows x features, and smaller.
    "gpu": _gpu_feature_cases(32768, [1024, 4096, 16384, 65536, 262144]),
    "gpu-quick": _gpu_feature_cases(32768, [4096, 65536]),
    "gpu-toy": _gpu_feature_cases(16, [32, 96]),
}


def select(grid: str, only: list[str] | None = None) -> list[Case]:
    """The cases of ``grid`` whose op is in ``only`` (all when None)."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {sorted(GRIDS)}, got {grid!r}")
    if only is not None:
        unknown = sorted(set(only) - set(OPS))
        if unknown:
            raise ValueError(f"unknown op(s) {unknown}; choose from {', '.join(OPS)}")
    return [case for case in GRIDS[grid] if only is None or case.op in only]
