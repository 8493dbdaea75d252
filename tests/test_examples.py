"""The README's runnable examples run (bounded, self-terminating)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    """The example's stdout; a failed run fails the test with everything it printed."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, (
        f"{name} exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    return result.stdout


def test_sync_batchnorm_example_trains_two_gloo_processes_with_identical_running_stats():
    stdout = run_example("sync_batchnorm_gloo.py", "--steps", "3")
    assert "step   0  loss" in stdout
    assert "running statistics identical on all 2 ranks: True" in stdout


def test_hugging_face_example_converts_llama_exactly():
    pytest.importorskip("transformers")
    stdout = run_example("convert_hugging_face.py")
    assert "5 converted, 0 skipped" in stdout
    assert "same logits: True, same gradients: True" in stdout
