"""scripts/gpu-check.sh is ready to run on a CUDA machine (CI has none: it only checks that the
script parses and is executable), and the bench options it relies on are where it needs them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from typer.testing import CliRunner

from harvest.cli import app

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check.sh"


def test_gpu_check_script_is_executable_and_parses():
    assert os.access(SCRIPT, os.X_OK)
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = SCRIPT.read_text()
    for command in ("bench engine", "bench coserve", "--device", "timeout"):
        assert command in text


def test_model_and_device_are_for_engine_and_coserve_only(tmp_path):
    result = CliRunner().invoke(app, ["bench", "queue", "--device", "cuda", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--device" in result.output
