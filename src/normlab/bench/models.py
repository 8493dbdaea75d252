"""Whole models, converted with ``normlab.convert`` against themselves unconverted: the
number a user who swaps normlab into a model sees. A Hugging Face Llama and BERT built from
small configs (4 layers, width 512; nothing is downloaded; skipped with the reason when
``transformers`` is not installed) and a small ConvNeXt-style CNN (torch.nn LayerNorm on
channels-last permuted activations, as timm's LayerNorm2d does). Three calls each: one
token (one image) forward, a 4 x 128 prefill (8 images) forward, both under
``torch.inference_mode``, and a training step (forward, backward of the mean output, in
train mode). Original and converted are timed interleaved with the bench's timer; the ratio
is the original's median time over the converted one's (>= 1: converting did not slow the
model down).
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

import normlab
from normlab.bench import timing

# grid -> (width, layers, prefill (batch, length), image size); "toy" keeps the test fast.
SIZES = {
    "default": (512, 4, (4, 128), 64),
    "quick": (512, 4, (4, 128), 64),
    "toy": (32, 1, (2, 8), 16),
}
MODELS = ("llama", "bert", "convnext")
CALLS = ("decode", "prefill", "train")


class _ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm over channels (channels-last view), MLP, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.expand = nn.Linear(channels, 4 * channels)
        self.project = nn.Linear(4 * channels, channels)

    def forward(self, x):
        y = self.depthwise(x).permute(0, 2, 3, 1)
        y = self.project(nn.functional.gelu(self.expand(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class _ChannelsLayerNorm(nn.LayerNorm):
    """LayerNorm over axis 1 of (N, C, H, W) by permuting (timm's LayerNorm2d)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def convnext(width: int) -> nn.Sequential:
    """A two-stage ConvNeXt-style CNN: patchify stem, blocks, downsampling, classifier."""
    half = width // 4
    return nn.Sequential(
        nn.Conv2d(3, half, 4, stride=4),
        _ChannelsLayerNorm(half, eps=1e-6),
        _ConvNeXtBlock(half),
        _ConvNeXtBlock(half),
        _ChannelsLayerNorm(half, eps=1e-6),
        nn.Conv2d(half, 2 * half, 2, stride=2),
        _ConvNeXtBlock(2 * half),
        _ConvNeXtBlock(2 * half),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * half, 10),
    )


def _transformer(name: str, width: int, layers: int) -> nn.Module:
    import transformers

    common = dict(
        vocab_size=1024,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=256,
    )
    if name == "llama":
        config = transformers.LlamaConfig(
            **common, intermediate_size=(8 * width) // 3, num_key_value_heads=max(1, width // 64)
        )
        return transformers.LlamaForCausalLM(config)
    config = transformers.BertConfig(
        **common,
        intermediate_size=4 * width,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(config, add_pooling_layer=False)


def _output(result) -> torch.Tensor:
    """The tensor a model returns (logits, last hidden state, or the tensor itself)."""
    if isinstance(result, torch.Tensor):
        return result
    for key in ("logits", "last_hidden_state"):
        if getattr(result, key, None) is not None:
            return getattr(result, key)
    raise TypeError(f"no output tensor in {type(result).__name__}")


def _inputs(name: str, grid: str, seed: int) -> dict[str, torch.Tensor]:
    _, _, (batch, length), image = SIZES[grid]
    g = torch.Generator().manual_seed(seed)
    if name == "convnext":
        return {
            "decode": torch.randn(1, 3, image, image, generator=g),
            "prefill": torch.randn(8, 3, image, image, generator=g),
        }
    return {
        "decode": torch.randint(0, 1024, (1, 1), generator=g),
        "prefill": torch.randint(0, 1024, (batch, length), generator=g),
    }


def _call(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    return _output(model(x) if name == "convnext" else model(input_ids=x))


def _runner(model: nn.Module, name: str, call: str, x: torch.Tensor) -> timing.Runner:
    if call != "train":
        return timing.forward_runner(lambda: (_call(model, name, x),), torch.inference_mode)

    def step() -> float:
        for p in model.parameters():
            p.grad = None
        start = time.perf_counter()
        _call(model, name, x).float().mean().backward()
        return time.perf_counter() - start

    return step


def build(name: str, grid: str, seed: int = 0) -> tuple[nn.Module, nn.Module, str]:
    """(original, converted, what convert did) for model ``name``."""
    width, layers, _, _ = SIZES[grid]
    torch.manual_seed(seed)
    original = convnext(width) if name == "convnext" else _transformer(name, width, layers)
    converted, summary = normlab.convert(copy.deepcopy(original))
    return original, converted, str(summary).splitlines()[0] if str(summary) else ""


# The runs' noise floor: the original against an unconverted deepcopy of itself (the same
# computation on other memory), timed in the same interleaved rounds. A converted model's
# ratio inside the control's distance from 1 is "as fast within noise".
CONTROL = "control"


def measure(grid: str, repetitions: int, warmup: int, seed: int = 0) -> dict:
    """Median times of each model's calls, original and converted, and their ratios."""
    grid = grid if grid in SIZES else "default"
    results: dict[str, dict] = {}
    for name in MODELS:
        try:
            original, converted, summary = build(name, grid, seed)
        except ImportError as error:
            results[name] = {"skipped": f"{error.name or 'transformers'} is not installed"}
            continue
        inputs = _inputs(name, grid, seed)
        entry = {"converted": summary, "calls": {}}
        for call in CALLS:
            x = inputs["prefill" if call == "train" else call]
            for model in (original, converted):
                model.train(call == "train")
            with torch.inference_mode():
                want = _call(original, name, x)
                error = float((_call(converted, name, x) - want).abs().max())
            control = copy.deepcopy(original)
            runners = {
                "original": _runner(original, name, call, x),
                "converted": _runner(converted, name, call, x),
                CONTROL: _runner(control, name, call, x),
            }
            samples = timing.interleaved(runners, repetitions, warmup, seed)
            medians = {k: timing.summarize(v)["median_s"] for k, v in samples.items()}
            entry["calls"][call] = {
                "input": list(x.shape),
                "median_s": medians,
                "ratio": medians["original"] / medians["converted"],
                "control_ratio": medians["original"] / medians[CONTROL],
                "max_abs_diff": error,
            }
        results[name] = entry
    return results


def print_table(results: dict, console) -> None:
    from rich.table import Table

    table = Table(title="whole models: normlab.convert vs unconverted, median ms")
    for column in ("model", "call", "input", "original", "converted", "x original", "control"):
        table.add_column(column, justify="right")
    table.add_column("max |diff|", justify="right")
    for name, entry in results.items():
        if "skipped" in entry:
            table.add_row(name, "skipped", entry["skipped"], "", "", "", "", "")
            continue
        for call, r in entry["calls"].items():
            table.add_row(
                name,
                call,
                "x".join(map(str, r["input"])),
                f"{1e3 * r['median_s']['original']:.3f}",
                f"{1e3 * r['median_s']['converted']:.3f}",
                f"{r['ratio']:.3f}",
                f"{r['control_ratio']:.3f}",
                f"{r['max_abs_diff']:.1e}",
            )
    console.print(table)
    console.print(
        "x original: the original's median time / the converted model's (above 1: the "
        "converted model is faster); decode: 1 token (1 image), prefill: 4x128 tokens "
        "(8 images), both in inference_mode; train: forward + backward of the mean output; "
        "control: the original's time / an unconverted copy's, the same rounds (the noise "
        "floor: a ratio as far from 1 means nothing)"
    )


def markdown(results: dict) -> str:
    lines = [
        "| model | call | input | original ms | converted ms | x original | control "
        "| max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in results.items():
        if "skipped" in entry:
            lines.append(f"| {name} | skipped: {entry['skipped']} | | | | | | |")
            continue
        for call, r in entry["calls"].items():
            shape = "x".join(map(str, r["input"]))
            lines.append(
                f"| {name} | {call} | {shape} | {1e3 * r['median_s']['original']:.3f} | "
                f"{1e3 * r['median_s']['converted']:.3f} | {r['ratio']:.3f} | "
                f"{r['control_ratio']:.3f} | {r['max_abs_diff']:.1e} |"
            )
    return "\n".join(lines) + "\n"
