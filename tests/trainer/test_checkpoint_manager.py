"""CheckpointManager: atomic saves, keep-last-N, exact RNG resume, and recovery from a SIGKILL mid-save."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from megatron_dispo.trainer.checkpoint_manager import CheckpointManager


def _write_payload(value: int):
    def write(model_dir):
        model_dir.mkdir()
        torch.save({"w": torch.full((3,), float(value))}, model_dir / "weights.pt")

    return write


def test_save_load_and_retention(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, {"data_position": step * 10, "cache": [step]}, _write_payload(step))
    assert manager.complete_steps() == [2, 3]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "3"
    loaded = manager.load_latest(restore_rng=False)
    assert loaded is not None and loaded.step == 3
    assert loaded.trainer_state == {"step": 3, "data_position": 30, "cache": [3]}
    assert torch.equal(torch.load(loaded.path / "model" / "weights.pt")["w"], torch.full((3,), 3.0))


def test_rng_state_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    manager = CheckpointManager(tmp_path)
    manager.save(5, {})
    expected = (torch.rand(4), random.random(), np.random.rand())
    torch.manual_seed(123)  # disturb every generator
    random.seed(123)
    np.random.seed(123)
    manager.load_latest()
    got = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and got[2] == expected[2]


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert CheckpointManager(tmp_path).load_latest() is None


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last=0 must be >= 1"):
        CheckpointManager(tmp_path, keep_last=0)


def test_sigkill_mid_save_resumes_from_last_complete_checkpoint(tmp_path):
    """A writer killed while writing step 2 leaves step 1 as the latest; the half-written step 2 is cleaned up."""
    script = textwrap.dedent(
        f"""
        import time, torch
        from megatron_dispo.trainer.checkpoint_manager import CheckpointManager
        manager = CheckpointManager({str(tmp_path)!r}, keep_last=3)
        manager.save(1, {{"pos": 1}})
        def slow_writer(model_dir):
            model_dir.mkdir()
            torch.save({{"w": torch.zeros(1000)}}, model_dir / "part0.pt")
            print("WRITING", flush=True)
            time.sleep(60)
        manager.save(2, {{"pos": 2}}, slow_writer)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "WRITING" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
        assert "WRITING" in line, "the writer never reached the middle of the save"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    root = tmp_path / "checkpoints"
    assert (root / ".tmp_step_000002").is_dir()  # the half-written save is there ...
    manager = CheckpointManager(tmp_path, keep_last=3)
    assert not (root / ".tmp_step_000002").exists()  # ... and removed on the next start
    loaded = manager.load_latest(restore_rng=False)
    assert loaded is not None and loaded.step == 1 and loaded.trainer_state["pos"] == 1
