"""The replication study's one command, reduced (1 seed, 2 steps, small batches): every arm trains for real and the
study writes the kept metrics, the summary and the paper-style figures; a second invocation runs nothing again."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_dispo.trainer.metrics import read_metrics
from tests.trainer.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.mcore]

STUDY = REPO_ROOT / "examples" / "replication"
SMOKE = [
    "--seeds", "0", "--steps", "2",
    "trainer.prompts_per_step=4", "trainer.num_minibatches=2", "algorithm.group_size=4", "rollout.max_new_tokens=16",
    "algorithm.dynamic_sampling.max_rounds=4", "eval.n=2",
    "data.heldout={kind: synthetic_arithmetic, difficulty: 1, num_problems: 8, seed: 2}",
]  # fmt: skip


def _run_study(runs: Path, results: Path) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, str(STUDY / "run_study.py"), "--runs", str(runs), "--results", str(results), "--jobs", "1",
        *SMOKE,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, f"study failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.timeout(1200)
def test_reduced_study_runs_every_arm_and_writes_figures(warm_tiny_model: Path, tmp_path: Path) -> None:
    runs, results = tmp_path / "runs", tmp_path / "results"
    shutil.copytree(warm_tiny_model, runs / "warmup" / "seed0" / "warmup_model")  # the session's warm model
    _run_study(runs, results)

    study = yaml.safe_load((STUDY / "study.yaml").read_text())
    arms = list(study["arms"])
    assert len(arms) == 11  # DISPO, CISPO, DAPO, online SFT, 2x Regime 1, 2x Regime 2, Regimes 1+2, no R3, no R4
    updated = 0
    for arm in arms:
        records = {int(r["step"]): r for r in read_metrics(results / arm / "seed0")}
        assert sorted(records) == [0, 1, 2], arm
        assert 0.0 <= records[0]["eval/heldout/accuracy"] <= 1.0 and "eval/heldout/accuracy" in records[2], arm
        losses = [r["train/loss"] for r in records.values() if "train/loss" in r]
        assert all(math.isfinite(v) for v in losses), arm
        updated += bool(losses)
    assert updated >= 9, f"only {updated} of 11 arms had an update in 2 steps; the warm model is off"

    summary = json.loads((results / "summary.json").read_text())
    assert sorted(summary["arms"]) == sorted(arms)
    for arm in arms:  # the summary is computed from the kept metrics: spot-check against them
        start = next(r for r in read_metrics(results / arm / "seed0") if r["step"] == 0)["eval/heldout/accuracy"]
        assert summary["arms"][arm]["heldout_start"]["per_seed"]["0"] == pytest.approx(start)
    assert len(summary["claims"]) == len(study["claims"]) == 14  # every claim of the paper, as a paired comparison
    for row in summary["claims"]:
        arm, reference = summary["arms"][row["arm"]], summary["arms"][row["reference"]]
        value, reference_value = arm[row["scalar"]]["per_seed"]["0"], reference[row["scalar"]]["per_seed"]["0"]
        if value is not None and reference_value is not None:  # null: the run never logged it (no update)
            expected = value - reference_value
            assert row["diff_per_seed"]["0"] == pytest.approx(expected)
            assert row["seeds_agreeing"] == int((expected > 0) if row["expect"] == "higher" else (expected < 0))
    table = (results / "summary.md").read_text()
    assert all(f"| {arm} |" in table for arm in arms)
    for figure in study["figures"]:
        png = results / "plots" / figure / "summary.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000, figure
    assert summary["history"][-1]["cpu_s_this_invocation"] > 0

    # continuing the study: complete runs are kept, not run again
    logs = {arm: (runs / arm / "seed0" / "train.log").stat().st_mtime_ns for arm in arms}
    _run_study(runs, results)
    assert {arm: (runs / arm / "seed0" / "train.log").stat().st_mtime_ns for arm in arms} == logs
    assert len(json.loads((results / "summary.json").read_text())["history"]) == 2


def test_unknown_arm_is_named_before_anything_runs(tmp_path: Path) -> None:
    command = [sys.executable, str(STUDY / "run_study.py"), "--runs", str(tmp_path), "--arms", "dispo", "dispoo"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode != 0
    assert "unknown arms ['dispoo']" in proc.stderr and "study.yaml" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_a_shorter_study_never_deletes_a_longer_run(tmp_path: Path) -> None:
    """Reusing the full study's --runs folder for a 2-step smoke must stop, not restart (delete) the 20-step runs."""
    (tmp_path / "warmup" / "seed0" / "warmup_model").mkdir(parents=True)
    (tmp_path / "warmup" / "seed0" / "warmup_model" / "config.json").write_text("{}")  # warm-up already done
    longer = tmp_path / "dispo" / "seed0"
    longer.mkdir(parents=True)
    (longer / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 0.1}) + "\n" for s in range(6)))
    command = [
        sys.executable, str(STUDY / "run_study.py"), "--runs", str(tmp_path), "--results", str(tmp_path / "res"),
        "--seeds", "0", "--steps", "2", "--arms", "dispo",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode != 0 and "holds a run longer than 2 steps" in proc.stderr
    assert len((longer / "metrics.jsonl").read_text().splitlines()) == 6  # untouched
