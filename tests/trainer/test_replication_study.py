"""The replication study's one command, reduced to what each part proves: every arm's config validates; the committed
full study re-summarises to its committed summary (all claims, all figures); and the command really trains a subset of
arms (1 seed, 2 steps, small batches), writes metrics, summary and figures, and on a second invocation runs nothing
again."""

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

from examples.replication.summarize import write_report
from megatron_dispo.algorithms.presets import get_preset
from megatron_dispo.config import load_run_config
from megatron_dispo.trainer.metrics import read_metrics
from tests.trainer.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.mcore]

STUDY = REPO_ROOT / "examples" / "replication"
ARMS = ("dispo", "cispo")
"""Two of Fig. 5's arms: enough to prove the one command trains, summarises, pairs a claim and draws a figure."""
SMOKE = [
    "--seeds", "0", "--arms", *ARMS, "--steps", "2",  # --steps ends the --arms list before the overrides
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


def test_every_arm_is_a_valid_run_config(warm_tiny_model: Path) -> None:
    """All 11 arms (presets on base.yaml) pass the trainer's start-up validation, without training them."""
    study = yaml.safe_load((STUDY / "study.yaml").read_text())
    assert len(study["arms"]) == 11  # DISPO, CISPO, DAPO, online SFT, 2x Regime 1, 2x Regime 2, Regimes 1+2, no R3/R4
    for arm, spec in study["arms"].items():
        config = load_run_config(
            STUDY / "base.yaml", [f"algorithm.preset={spec['preset']}", f"model.hf_path={warm_tiny_model}"]
        )
        assert config.algorithm.preset == spec["preset"], arm
        assert config.algorithm.loss == get_preset(spec["preset"]), arm


def test_committed_results_resummarise_to_the_committed_summary(tmp_path: Path) -> None:
    """The full study's kept metrics (33 runs) give back the committed summary.json: every arm, all 14 claims as
    paired per-seed comparisons, and the 4 paper-style figures."""
    committed = STUDY / "results"
    results = tmp_path / "results"
    shutil.copytree(committed, results, ignore=shutil.ignore_patterns("plots", "summary.*"))
    study = yaml.safe_load((STUDY / "study.yaml").read_text())
    write_report(results, study, list(study["arms"]), study["seeds"])
    expected = json.loads((committed / "summary.json").read_text())
    got = json.loads((results / "summary.json").read_text())
    assert got["arms"] == expected["arms"]
    assert len(got["claims"]) == len(study["claims"]) == 14
    assert got["claims"] == expected["claims"]
    for figure in study["figures"]:
        png = results / "plots" / figure / "summary.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000, figure


@pytest.mark.timeout(900)
def test_reduced_study_trains_its_arms_and_continues_without_rerunning(warm_tiny_model: Path, tmp_path: Path) -> None:
    """One command trains each chosen arm for real (two of Fig. 5's), keeps metrics, summary, claims and figures, and
    a second invocation runs nothing again."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    shutil.copytree(warm_tiny_model, runs / "warmup" / "seed0" / "warmup_model")  # the session's warm model
    _run_study(runs, results)

    study = yaml.safe_load((STUDY / "study.yaml").read_text())
    updated = 0
    for arm in ARMS:
        records = {int(r["step"]): r for r in read_metrics(results / arm / "seed0")}
        assert sorted(records) == [0, 1, 2], arm
        assert 0.0 <= records[0]["eval/heldout/accuracy"] <= 1.0 and "eval/heldout/accuracy" in records[2], arm
        losses = [r["train/loss"] for r in records.values() if "train/loss" in r]
        assert all(math.isfinite(v) for v in losses), arm
        updated += bool(losses)
    assert updated >= 1, f"no arm of {ARMS} had an update in 2 steps; the warm model is off"

    summary = json.loads((results / "summary.json").read_text())
    assert sorted(summary["arms"]) == sorted(ARMS)
    for arm in ARMS:  # the summary is computed from the kept metrics: spot-check against them
        start = next(r for r in read_metrics(results / arm / "seed0") if r["step"] == 0)["eval/heldout/accuracy"]
        assert summary["arms"][arm]["heldout_start"]["per_seed"]["0"] == pytest.approx(start)
    pairs = [c for c in study["claims"] if c["arm"] in ARMS and c["reference"] in ARMS]
    assert len(summary["claims"]) == len(pairs) == 1  # DISPO vs CISPO
    for row in summary["claims"]:
        arm, reference = summary["arms"][row["arm"]], summary["arms"][row["reference"]]
        value, reference_value = arm[row["scalar"]]["per_seed"]["0"], reference[row["scalar"]]["per_seed"]["0"]
        if value is not None and reference_value is not None:  # null: the run never logged it (no update)
            expected = value - reference_value
            assert row["diff_per_seed"]["0"] == pytest.approx(expected)
            assert row["seeds_agreeing"] == int((expected > 0) if row["expect"] == "higher" else (expected < 0))
    table = (results / "summary.md").read_text()
    assert all(f"| {arm} |" in table for arm in ARMS)
    png = results / "plots" / "fig5_dispo_cispo_dapo" / "summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert summary["history"][-1]["cpu_s_this_invocation"] > 0

    # continuing the study: complete runs are kept, not run again
    logs = {arm: (runs / arm / "seed0" / "train.log").stat().st_mtime_ns for arm in ARMS}
    _run_study(runs, results)
    assert {arm: (runs / arm / "seed0" / "train.log").stat().st_mtime_ns for arm in ARMS} == logs
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
