"""normlab bench's GPU path (``normlab.bench.gpu``) as far as it runs without a GPU: the
options, the issue's grid, dtype-aware traffic, the memory check, and the whole measuring
path on a toy GPU grid on the CPU, with normlab's Triton contender in the interpreter.
The CUDA-event timing itself needs a GPU. No timing assertions."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from rich.console import Console

from normlab.bench import cases, gpu, measure, options, ratios, table, traffic
from normlab.bench.runner import assemble
from normlab.cli import build_parser


def _bench_args(*words):
    return build_parser().parse_args(["bench", *words])


def test_bench_help_documents_the_gpu_run(capsys):
    with pytest.raises(SystemExit):
        _bench_args("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "--device {auto,cpu,cuda}" in text
    assert "32768 rows x 1024..262144 features, float32 and bfloat16" in text


def test_cuda_device_selects_the_gpu_grid_one_allocation_mode(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    settings = options.settings_from(_bench_args())  # auto -> cuda
    assert (settings.device, settings.grid, settings.fold) == ("cuda", "gpu", False)
    assert settings.allocation_modes() == ["default"]
    child = settings.child_arguments()
    assert child[child.index("--device") + 1] == "cuda"
    assert options.settings_from(_bench_args("--quick")).grid == "gpu-quick"
    assert options.settings_from(_bench_args("--device", "cpu")).grid == "default"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert options.settings_from(_bench_args()).device == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        options.settings_from(_bench_args("--device", "cuda"))


def test_gpu_grid_is_the_issues_shapes_in_both_dtypes():
    grid = cases.select("gpu")
    assert {c.shape for c in grid} == {(32768, n) for n in (1024, 4096, 16384, 65536, 262144)}
    assert {c.dtype for c in grid} == {"float32", "bfloat16"}
    assert {c.op for c in grid} == {"layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"}
    assert len(grid) == 4 * 2 * 5
    bf16 = cases.Case("layer_norm", (8, 4), dtype="bfloat16")
    assert bf16.label == "layer_norm 8x4 bfloat16"
    assert traffic.traffic_bytes(bf16, "backward") == 3 * 32 * 2


def test_cases_that_do_not_fit_in_device_memory_are_skipped(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (139 * 2**30, 141 * 2**30))
    kept, skipped = gpu.fitting(cases.select("gpu", ["layer_norm"]), "cuda")
    assert [s["label"] for s in skipped] == ["layer_norm 32768x262144"]  # float32: ~200 GB
    assert "needs about 206 GB" in skipped[0]["reason"]
    assert cases.Case("layer_norm", (32768, 262144), dtype="bfloat16") in kept
    assert gpu.fitting(cases.select("gpu"), "cpu") == (cases.select("gpu"), [])


def test_toy_gpu_grid_measures_the_triton_contender_on_cpu(monkeypatch):
    """The GPU path with device "cpu": bfloat16 and float32 workloads, normlab's forced
    "triton" contender (in the interpreter), the tables with a "normlab triton" column."""
    pytest.importorskip("triton")
    monkeypatch.setattr(gpu, "FUSED_BACKEND", {"cpu": "triton", "cuda": "triton"})
    threads = torch.get_num_threads()
    settings = options.Settings(grid="gpu-toy", only=["add_layer_norm"])
    settings.repetitions, settings.warmup, settings.threads, settings.compile = 2, 0, 1, False
    try:
        mode = measure.measure_mode(cases.select("gpu-toy", settings.only), settings, "default")
    finally:
        torch.set_num_threads(threads)
    ratios.add_ratios(mode)
    assert mode["normlab_backends"] == ["composite", "triton", "auto"]
    assert len(mode["cases"]) == 2 * 2
    for case, spec in zip(mode["cases"], cases.select("gpu-toy", settings.only), strict=True):
        triton = case["contenders"]["normlab triton"]
        assert triton["status"] == "ok" and triton["backend_ran"] == "triton", triton
        assert triton["max_abs_diff"] < (0.1 if spec.dtype == "bfloat16" else 1e-4)
        for name, direction in case["directions"].items():
            moved = traffic.tensors_moved(spec, name) * math.prod(spec.shape)
            assert direction["traffic_bytes"] == moved * spec.element_size
            assert "normlab triton" in direction["timings"]
    report = assemble(settings, {"default": mode})
    json.dumps(report)
    out = io.StringIO()
    table.print_report(report, Console(file=out, width=250))
    assert "normlab triton" in out.getvalue()
    assert "normlab triton" in table.markdown(report)
    assert "add_layer_norm 16x96 bfloat16" in out.getvalue()
