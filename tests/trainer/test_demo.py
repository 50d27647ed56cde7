"""`megatron-dispo demo` (the embedded CPU default) runs its first steps end to end: warm-up, DISPO, eval, plots."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_dispo.trainer.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.mcore]


def test_demo_first_steps(tmp_path):
    cmd = [
        sys.executable, "-m", "megatron_dispo", "demo", "--run-dir", str(tmp_path), "--warmup-steps", "10",
        "trainer.max_steps=2", "trainer.prompts_per_step=8", "trainer.num_minibatches=2", "algorithm.group_size=4",
        "data.heldout.num_problems=16", "eval.every_steps=2", "eval.n=2", "trainer.plot_every=2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out accuracy" in proc.stdout and "warm-up model" in proc.stdout
    records = {r["step"]: r for r in read_metrics(tmp_path / "rl")}
    assert sorted(records) == [0, 1, 2]
    assert 0.0 <= records[0]["eval/heldout/accuracy"] <= 1.0 and "eval/heldout/accuracy" in records[2]
    assert (tmp_path / "warmup_model" / "model.safetensors").is_file()
    assert (tmp_path / "rl" / "plots" / "summary.png").is_file()
    assert sorted(p.name for p in (tmp_path / "rl" / "checkpoints").glob("step_*")) == ["step_000002"]
