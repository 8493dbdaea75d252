"""The normlab command line: --help, --version and the demo."""

import subprocess
import sys

import pytest
import torch

import normlab
from normlab.cli import main
from normlab.lab import demo


def test_version_prints_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"normlab {normlab.__version__}"


def test_help_lists_the_demo_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "demo" in capsys.readouterr().out


def test_console_entry_point_runs_as_module():
    result = subprocess.run(
        [sys.executable, "-m", "normlab", "--version"], capture_output=True, text=True, check=True
    )
    assert normlab.__version__ in result.stdout


def test_demo_prints_both_norms_with_their_statistics(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "LayerNorm: each ROW shares one mean/std" in out
    assert "BatchNorm (training): each COLUMN shares one mean/std" in out
    x = demo.demo_batch()
    # The printed LN statistics are the per-sample ones, the BN ones the per-feature ones.
    for i in range(demo.SAMPLES):
        assert f"{x[i].mean().item():8.3f}" in out
    assert "".join(f"{m:8.3f}" for m in x.mean(0).tolist()) + "  <- mean" in out


def test_demo_outputs_are_normalized_along_the_axes_it_claims():
    x = demo.demo_batch()
    y_ln = normlab.LayerNorm(demo.FEATURES, elementwise_affine=False).double()(x)
    y_bn = normlab.BatchNorm1d(demo.FEATURES, affine=False).double()(x)
    zeros_rows, zeros_cols = (
        torch.zeros(demo.SAMPLES, dtype=x.dtype),
        torch.zeros(demo.FEATURES, dtype=x.dtype),
    )
    torch.testing.assert_close(y_ln.mean(1), zeros_rows, atol=1e-12, rtol=0)
    torch.testing.assert_close(y_bn.mean(0), zeros_cols, atol=1e-12, rtol=0)
    assert y_ln.mean(0).abs().max() > 0.1  # LayerNorm does not normalize the columns
    assert y_bn.mean(1).abs().max() > 0.1  # BatchNorm does not normalize the rows
