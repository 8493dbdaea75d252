"""The README's runnable examples run (bounded, self-terminating)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_sync_batchnorm_example_trains_two_gloo_processes_with_identical_running_stats():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "sync_batchnorm_gloo.py"), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    assert "step   0  loss" in result.stdout
    assert "running statistics identical on all 2 ranks: True" in result.stdout


def test_hugging_face_example_converts_llama_exactly():
    pytest.importorskip("transformers")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "convert_hugging_face.py")],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    assert "5 converted, 0 skipped" in result.stdout
    assert "same logits: True, same gradients: True" in result.stdout
