"""The dedicated-placement worlds: training ranks hold Megatron groups over themselves only; a gloo bridge joins
training rank 0 and the rollout rank; a dead rollout rank fails the trainer's wait at once with a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("bridge_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(mode: str, out: Path) -> dict[int, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=3",
        str(WORKER),
        mode,
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        rank: json.loads((out / f"rank{rank}.json").read_text())
        for rank in range(3)
        if (out / f"rank{rank}.json").exists()
    }


@pytest.mark.timeout(240)
def test_training_world_excludes_rollout_rank_and_bridge_carries_messages(tmp_path: Path) -> None:
    results = _run("ok", tmp_path)
    assert results[0]["world"] == results[1]["world"] == 2  # the rollout rank is not in the training world
    assert results[0]["dp"] == 2 and results[0]["sum"] == 3.0  # Megatron's groups and a collective over ranks 0-1
    assert results[0]["reply"] == {"got": 3}
    assert results[0]["bcast"] == results[2]["bcast"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert results[2]["rollout"] and "world" not in results[2]
    assert all(r["file"].startswith(str(REPO_ROOT)) for r in results.values())


@pytest.mark.timeout(240)
def test_dead_rollout_rank_fails_the_trainer_fast(tmp_path: Path) -> None:
    results = _run("dead", tmp_path)
    error = results[0]["error"]
    assert error is not None and error.startswith("bridge rank 0: receive from bridge rank 1 failed")
    assert results[0]["seconds"] < 20.0  # well within the bridge timeout: the closed socket fails the wait
