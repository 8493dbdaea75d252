"""normlab bench: structure of the results and ratios recomputed from the recorded medians,
on a toy grid (tiny shapes, 2 repetitions). No timing assertions."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import pytest
import torch
from rich.console import Console

import normlab
from normlab import backends
from normlab.bench import cases, environment, measure, options, plain_masked, ratios, table, traffic
from normlab.bench.contenders import padded_lengths
from normlab.bench.runner import assemble
from normlab.cli import build_parser

STATUSES = {"ok", "unavailable", "failed", "skipped"}
NORMLAB = [f"normlab {b}" for b in measure.NORMLAB_BACKENDS]


def _toy_settings(**overrides) -> options.Settings:
    values = dict(grid="toy", repetitions=2, warmup=0, threads=1, compile=False)
    values.update(overrides)
    return options.Settings(**values)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _measure(only, restore_threads, **overrides):
    settings = _toy_settings(only=only, **overrides)
    events = []
    mode = measure.measure_mode(cases.select("toy", only), settings, "default", events.append)
    return ratios.add_ratios(mode), events, settings


def _check_ratios(case: dict) -> None:
    """Every ratio equals reference median / contender median, with the references named."""
    for direction in case["directions"].values():
        timings, references = direction["timings"], direction["references"]
        assert references["copy"] == measure.COPY_CLONE
        two_pass = case["op"] == "batch_norm" and case["training"]  # (the CPU's bound)
        assert references["two_pass"] == (measure.TWO_PASS if two_pass else None)
        if two_pass:
            assert direction["ratios"]["normlab auto"]["vs_two_pass"] is not None
        for name, values in direction["ratios"].items():
            for key, value in values.items():
                reference = references[key.removeprefix("vs_")]
                if reference is None:
                    assert value is None
                    continue
                expected = timings[reference]["median_s"] / timings[name]["median_s"]
                assert value == pytest.approx(expected, rel=1e-12)
        for role in ("eager", "compile"):
            ran = [n for n, r in case["contenders"].items() if r["role"] == role and n in timings]
            fastest = min(ran, key=lambda n: timings[n]["median_s"], default=None)
            assert references[role] == fastest


def _check_case(case: dict, repetitions: int, threads: int = 1) -> None:
    shape = tuple(case["shape"])
    for name in NORMLAB:
        assert name in case["contenders"]
    for name, record in case["contenders"].items():
        assert record["status"] in STATUSES
        assert record["role"] in {"normlab", "eager", "compile"}
        if record["status"] == "ok" and record["role"] != "eager":
            assert record["max_abs_diff"] < 1e-3, name  # it computes the same thing
    for direction_name, direction in case["directions"].items():
        n_tensors = (
            4 if case["op"].startswith("add_") else (2 if direction_name == "forward" else 3)
        )
        element_size = getattr(torch, case["dtype"]).itemsize
        assert direction["traffic_bytes"] == n_tensors * math.prod(shape) * element_size
        assert direction["torch_threads"] == threads
        running = {n for n, r in case["contenders"].items() if r["status"] == "ok"}
        references = {measure.COPY_INPLACE, measure.COPY_CLONE}
        if case["op"] == "batch_norm" and case["training"]:  # two passes over x (CPU)
            references.add(measure.TWO_PASS)
        assert set(direction["timings"]) == running | references
        for timing in direction["timings"].values():
            assert len(timing["times_s"]) == repetitions
            assert timing["q1_s"] <= timing["median_s"] <= timing["q3_s"]
            assert timing["iqr_s"] == pytest.approx(timing["q3_s"] - timing["q1_s"])
            expected_gbps = direction["traffic_bytes"] / timing["median_s"] / 1e9
            assert timing["gbps"] == pytest.approx(expected_gbps, rel=1e-12)
    _check_ratios(case)


def test_in_process_toy_grid_records_every_contender_and_consistent_ratios(
    restore_threads, monkeypatch
):
    def failing_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", failing_compile)
    only = ["layer_norm", "add_rms_norm", "batch_norm"]
    mode, events, settings = _measure(only, restore_threads, compile=True)
    assert mode["torch_threads"] == 1
    labels = [case["label"] for case in mode["cases"]]
    assert labels == [case.label for case in cases.select("toy", only)]
    steps = [e for e in events if e["event"] == "step"]
    # inference cases (decode rows): the forward only, in inference_mode
    inference = [case["label"] for case in mode["cases"] if case["inference"]]
    assert inference == [
        "batch_norm 1x8x4x4 eval N,C,L inference",
        "layer_norm 1x32 inference",
        "layer_norm 8x32 inference",
        "layer_norm 16x32 strided inference",
    ]
    assert len(steps) == 2 * len(labels) - len(inference)
    for case in mode["cases"]:
        _check_case(case, settings.repetitions)
        directions = ["forward"] if case["inference"] else ["forward", "backward"]
        assert list(case["directions"]) == directions
        if case["inference"]:  # no contender's first call ran a backward
            for record in case["contenders"].values():
                assert record.get("first_backward_s") is None
        compiled = [r for r in case["contenders"].values() if r["role"] == "compile"]
        assert compiled and all(r["status"] == "failed" for r in compiled)
        assert all("torch.compile failed, skipped" in r["note"] for r in compiled)
        if case["padding"]:
            eager = {n for n, r in case["contenders"].items() if r["role"] == "eager"}
            assert eager == {f"plain masked: {v}" for v in plain_masked.VARIANTS}
    assert {(r["op"], r["backend_requested"]) for r in mode["first_calls"]} == {
        (op, b) for op in only for b in measure.NORMLAB_BACKENDS
    }
    report = assemble(settings, {"default": mode})
    json.dumps(report)  # serializable
    out = io.StringIO()
    table.print_report(report, Console(file=out, width=250))
    text = out.getvalue()
    markdown = table.markdown(report)
    for label in labels:
        assert label in text and label in markdown


def test_numba_backend_that_does_not_run_is_recorded_unavailable(restore_threads, monkeypatch):
    monkeypatch.setattr(backends, "last_used", lambda: None)  # as before the kernels landed
    mode, _, settings = _measure(["layer_norm"], restore_threads)
    case = mode["cases"][0]
    numba = case["contenders"]["normlab numba"]
    assert numba["status"] == "unavailable" and "last_used() reported None" in numba["note"]
    assert case["contenders"]["normlab auto"]["status"] == "ok"
    assert "normlab numba" not in case["directions"]["forward"]["timings"]
    _check_case(case, settings.repetitions)


def test_numba_backend_that_raises_is_recorded_unavailable(restore_threads, monkeypatch):
    real_use = backends.use

    def use(name):
        if name == "numba":
            raise ValueError("numba kernels are not available")
        return real_use(name)

    monkeypatch.setattr(backends, "use", use)
    mode, _, _ = _measure(["rms_norm"], restore_threads)
    numba = mode["cases"][0]["contenders"]["normlab numba"]
    assert numba == {
        "role": "normlab",
        "backend_requested": "numba",
        "status": "unavailable",
        "note": "ValueError: numba kernels are not available",
    }


def test_cli_quick_runs_both_allocation_modes_in_subprocesses(tmp_path):
    json_path, markdown_path = tmp_path / "bench.json", tmp_path / "bench.md"
    command = [sys.executable, "-m", "normlab", "bench", "--quick", "--only", "layer_norm"]
    command += ["--grid", "toy", "--reps", "2", "--warmup", "0", "--threads", "1"]
    command += ["--no-compile", "--json", str(json_path), "--markdown", str(markdown_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(json_path.read_text())
    assert report["schema"] == "normlab-bench/1"
    assert report["command"].startswith("normlab bench --quick --only layer_norm")
    assert report["settings"]["repetitions"] == 2 and report["torch_threads"] == [1]
    assert list(report["modes"]) == ["default", "retained"]
    retained = report["modes"]["retained"]["allocation_settings"]["GLIBC_TUNABLES"]
    assert "glibc.malloc.mmap_max=0" in retained
    assert "GLIBC_TUNABLES" not in report["modes"]["default"]["allocation_settings"]
    for mode in report["modes"].values():
        assert mode["clone_speed_vs_copy"] > 0
        for case in mode["cases"]:
            assert case["op"] == "layer_norm"
            _check_case(case, 2)
    assert "layer_norm 64x32" in result.stdout
    assert "| case | dir |" in markdown_path.read_text()
    assert "fold_batchnorm: eval forward" in result.stdout
    assert {name: r["folded_batchnorms"] for name, r in report["fold_batchnorm"].items()} == {
        "cnn": 3,
        "mlp": 2,
    }
    assert "whole models: normlab.convert vs unconverted" in result.stdout
    assert set(report["models"]) == {"llama", "bert", "convnext"}
    assert "### Whole models" in markdown_path.read_text()


def test_fold_timing_compares_equal_models(restore_threads):
    from normlab.bench import fold_speed

    results = fold_speed.measure("toy", repetitions=2, warmup=0)
    for r in results.values():
        assert r["max_abs_diff"] < 1e-5  # the three models compute the same function
        assert set(r["median_s"]) == {"torch.nn", "normlab", "folded"}
        assert all(t > 0 for t in r["median_s"].values())
        assert r["speedup_vs_torch"] == r["median_s"]["torch.nn"] / r["median_s"]["folded"]
    _, models, _ = fold_speed._models("cnn", fold_speed.SIZES["toy"]["cnn"], 0)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in models["folded"].modules())
    assert all(not m.training for m in models.values())


def test_retained_environment_sets_glibc_tunables_and_default_strips_them():
    base = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.top_pad=1:glibc.cpu.x=1"}
    base["MALLOC_MMAP_THRESHOLD_"] = "1"
    default = environment.environment_for("default", base)
    retained = environment.environment_for("retained", base)
    assert default == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.cpu.x=1"}
    assert retained["GLIBC_TUNABLES"] == f"glibc.cpu.x=1:{environment.RETAINED_TUNABLES}"
    assert "MALLOC_MMAP_THRESHOLD_" not in retained
    with pytest.raises(ValueError, match="allocation mode"):
        environment.environment_for("huge", base)


@pytest.mark.parametrize("channel_dim", [1, -1])
@pytest.mark.parametrize("variant", sorted(plain_masked.VARIANTS))
def test_plain_torch_masked_baselines_match_normlab(variant, channel_dim):
    shape = (5, 6, 11) if channel_dim == 1 else (5, 11, 6)
    x = torch.randn(shape, dtype=torch.float64)
    weight, bias = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    lengths = padded_lengths(5, 11, 0.3)
    stats = [torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)]
    expected_stats = [t.clone() for t in stats]
    expected = normlab.functional.batch_norm(
        x, *expected_stats, weight, bias, True, dim=channel_dim, lengths=lengths
    )
    got = plain_masked.VARIANTS[variant](x, lengths, weight, bias, *stats, channel_dim)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(stats, expected_stats)


def test_grid_selection_lengths_traffic_and_options():
    assert {c.op for c in cases.select("default")} == set(cases.OPS)
    layer_norms = cases.select("default", ["layer_norm"])
    big = [c for c in layer_norms if c.layout == "contiguous" and c.dtype == "float32"]
    assert [c.shape for c in big if c.shape[0] > 8] == [(8192, 1024), (32768, 768), (4096, 4096)]
    # The paths users hit: decode sizes, half precision, channels-first, strided.
    assert {(1, 4096), (8, 4096)} <= {c.shape for c in big}
    assert {c.dtype for c in layer_norms} == {"float32", "bfloat16", "float16"}
    assert {c.layout for c in layer_norms} == {"contiguous", "channels_first", "strided"}
    with pytest.raises(ValueError, match="unknown op"):
        cases.select("default", ["layernorm"])
    lengths = padded_lengths(64, 512, 0.3)
    assert 1 - lengths.sum().item() / (64 * 512) == pytest.approx(0.3, abs=0.01)
    case = cases.Case("add_layer_norm", (8, 4))
    assert traffic.traffic_bytes(case, "backward") == 4 * 32 * 4
    parser = build_parser()
    args = parser.parse_args(["bench", "--quick", "--only", "layer_norm,batch_norm"])
    settings = options.settings_from(args)
    assert (settings.grid, settings.only, settings.alloc) == (
        "quick",
        ["layer_norm", "batch_norm"],
        "both",
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--only", "layernorm"])


def test_whole_model_timing_compares_equal_models(restore_threads):
    """Each model converted with normlab.convert computes what the original does, and every
    call (decode, prefill, training step) is timed for both, the ratio original/converted."""
    pytest.importorskip("transformers")
    from normlab.bench import models

    results = models.measure("toy", repetitions=2, warmup=0)
    assert set(results) == set(models.MODELS)
    for name, entry in results.items():
        assert entry["converted"], name  # convert found norms to replace
        assert set(entry["calls"]) == set(models.CALLS)
        for call, r in entry["calls"].items():
            assert r["max_abs_diff"] < 1e-4, (name, call)
            assert all(t > 0 for t in r["median_s"].values())
            assert r["ratio"] == r["median_s"]["original"] / r["median_s"]["converted"]
            # the noise floor: the original against an unconverted copy, same rounds
            assert r["control_ratio"] == r["median_s"]["original"] / r["median_s"]["control"]
    original, converted, _ = models.build("convnext", "toy")
    assert any(isinstance(m, torch.nn.LayerNorm) for m in original.modules())
    assert not any(type(m) is torch.nn.LayerNorm for m in converted.modules())
