"""The prepared one-GPU device check (tests/gpu/device_check.sh) parses, is ShellCheck-clean, and its Python part
imports and formats its table on CPU (no GPU has been lent to run it whole; docs/gpu.md)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.launch.test_lint import linter

NUM_GPUS = 0
SCRIPT = Path(__file__).resolve().parents[2] / "tests" / "gpu" / "device_check.sh"


def test_device_check_script_is_valid_bash_and_shellcheck_clean() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, timeout=30).returncode == 0
    result = subprocess.run([linter("shellcheck"), str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = SCRIPT.read_text()
    assert "wheels/megatron_core-0.16.1-" in text and "pytest tests/gpu" in text and "trainer_step_check.py" in text


def test_trainer_step_table_names_every_phase() -> None:
    from tests.gpu.trainer_step_check import format_table

    row = {"phase": "one update", "ok": True, "seconds": 0.5, "allocated_gib": 1.0, "reserved_gib": 2.0, "detail": "x"}
    table = format_table([row, row | {"ok": False, "phase": "pi_old forward"}])
    assert "one update" in table and "yes" in table and "NO" in table
