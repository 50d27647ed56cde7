"""The regime-control study's one command (examples/regime_control), reduced to what each part proves: every arm's
config validates; and the command really warms up a chain-of-thought model, trains a controller arm (1 seed,
3 steps, tiny sizes) with both the entropy band and the Regime 3 guard on, whose bounds move where each says, writes
metrics, per-seed claim verdicts, summary and figures, and on a second invocation trains nothing again.

Dynamic sampling is off in the reduced runs: a 2-step warm-up answers (almost) nothing right, so every group would
be dropped and nothing learned; with it off every step learns (zero advantages) and the controller observes the
step's entropy and repetition. The band and the guard get settings that fire from step 1 (a band below any entropy,
a repeated-bigram threshold of 0), so the bounds' trajectories are known in advance (hand-computed below)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_dispo.algorithms.presets import get_preset
from megatron_dispo.config import load_run_config
from megatron_dispo.trainer.metrics import read_metrics
from tests.trainer.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.mcore]

STUDY = REPO_ROOT / "examples" / "regime_control"
BAND, GUARD = "ctrl_overexplore", "ctrl_from_no_regime3"
SMOKE = [
    "--seeds", "0", "--arms", BAND, "--steps", "3", "--warmup-steps", "2",
    "trainer.prompts_per_step=4", "trainer.num_minibatches=2", "algorithm.group_size=4", "rollout.max_new_tokens=64",
    "algorithm.dynamic_sampling.enabled=false", "trainer.checkpoint_every=0", "eval.n=1", "eval.every_steps=3",
    "data.heldout={kind: synthetic_chain, difficulty: 1, num_problems: 4, seed: 2}",
    # the band: absolute and below any entropy, so it lowers entropy (direction +1) from step 1 on
    "algorithm.regime_control.band_reference=absolute", "algorithm.regime_control.band_low=0.001",
    "algorithm.regime_control.band_high=0.002", "algorithm.regime_control.patience=1",
    # the Regime 3 guard (on in this arm too): fires on any repeated bigram, from step 1 on
    "algorithm.regime_control.regime3_guard.enabled=true",
    # the arm's own start (Regime 1 unclipped, Regime 2 off) plus Regime 3 off, so the guard has a bound to widen
    "algorithm.loss_overrides={eps_high_pos: 100.0, eps_low_pos: 0.0, eps_high_neg: 0.0}",
    "algorithm.regime_control.regime3_guard.signal=repeated_ngram_rate",
    "algorithm.regime_control.regime3_guard.ngram_size=2", "algorithm.regime_control.regime3_guard.threshold=0.0",
    "algorithm.regime_control.regime3_guard.release_threshold=0.0", "algorithm.regime_control.regime3_guard.patience=1",
]  # fmt: skip


def _run_study(runs: Path, results: Path) -> None:
    command = [sys.executable, str(STUDY / "run_study.py"), "--runs", str(runs), "--results", str(results), *SMOKE]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, f"study failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def test_every_arm_is_a_valid_run_config(tmp_path: Path) -> None:
    """All 11 arms (preset + controller overrides on base.yaml) pass the config validation, and each controller arm
    starts from the bad bounds of the arm it is compared with."""
    study = yaml.safe_load((STUDY / "study.yaml").read_text())
    assert len(study["arms"]) == 11 and len(study["seeds"]) >= 3
    configs = {
        arm: load_run_config(
            STUDY / "base.yaml", [f"algorithm.preset={spec['preset']}", *spec.get("overrides", [])]
        ).algorithm
        for arm, spec in study["arms"].items()
    }
    assert configs["dispo"].loss == get_preset("dispo") and configs["dispo_no_regime3"].loss.eps_high_neg == 0.0
    assert configs[GUARD].loss == configs["dispo_no_regime3"].loss
    assert configs[GUARD].regime_control.moved_bounds() == ("eps_high_neg",)
    assert configs["ctrl_from_no_regime4"].loss == configs["dispo_no_regime4"].loss
    assert configs["ctrl_from_no_regime4"].regime_control.moved_bounds() == ("eps_low_neg",)
    assert configs[BAND].loss == configs["overexplore"].loss and configs[BAND].loss.eps_high_pos == 100.0
    assert configs[BAND].regime_control.moved_bounds() == ("eps_high_pos", "eps_low_pos")
    assert configs["ctrl_underexplore"].loss == configs["underexplore"].loss
    assert configs["underexplore"].loss.eps_high_pos == 0.0 and configs["underexplore"].loss.eps_low_pos == 1.0
    assert configs["ctrl_underexplore"].regime_control.moved_bounds() == ("eps_high_pos", "eps_low_pos")
    open_arms = ("dispo", "dapo", "cispo", "overexplore", "underexplore")
    assert not any(configs[arm].regime_control.active for arm in open_arms)


@pytest.mark.timeout(600)
def test_reduced_study_moves_the_bounds_and_continues_without_rerunning(tmp_path: Path) -> None:
    runs, results = tmp_path / "runs", tmp_path / "results"
    _run_study(runs, results)
    assert (runs / "warmup" / "seed0" / "warmup_model" / "config.json").is_file()  # built once, with the RL template

    band = {int(r["step"]): r for r in read_metrics(results / BAND / "seed0")}
    assert sorted(band) == [0, 1, 2, 3]
    assert "eval/heldout/accuracy" in band[0] and "eval/heldout/accuracy" in band[3]
    assert all(band[s]["control/entropy"] == pytest.approx(band[s]["train/entropy"]) for s in (1, 2, 3))
    # the band: entropy above it at every step -> narrow eps_high_pos (/1.5), widen eps_low_pos (x1.25, from 0 to 0.05)
    assert [band[s]["control/entropy_direction"] for s in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert [band[s]["control/eps_high_pos"] for s in (1, 2, 3)] == pytest.approx([100.0, 100 / 1.5, 100 / 2.25])
    assert [band[s]["control/eps_low_pos"] for s in (1, 2, 3)] == pytest.approx([0.0, 0.05, 0.0625])
    # the Regime 3 guard: repeated bigrams at every step -> eps_high_neg 0 -> 1 (widen_from) -> 4 (x4)
    assert all(band[s]["control/repetition"] > 0.0 for s in (1, 2, 3))
    assert [band[s]["control/regime3_guard"] for s in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert [band[s]["control/eps_high_neg"] for s in (1, 2, 3)] == [0.0, 1.0, 4.0]
    assert [band[s]["control/eps_low_neg"] for s in (1, 2, 3)] == [1.0] * 3  # the Regime 4 guard is off

    summary = json.loads((results / "summary.json").read_text())
    assert sorted(summary["arms"]) == [BAND]
    assert summary["arms"][BAND]["regime3_guard_steps"]["per_seed"]["0"] == 3.0
    claims = {row["id"]: row for row in summary["claims"]}
    assert list(claims) == ["band_kept"]  # the only claim this arm's run can judge
    assert claims["band_kept"]["per_seed"]["0"]["verdict"] == "n/a"  # 3 steps: all calibration, none judged
    assert claims["band_kept"]["verdict"] == "inconclusive"
    table = (results / "summary.md").read_text()
    assert f"| {BAND} |" in table and "The controller keeps entropy in its band" in table
    for figure in ("bounds_entropy_band", "fig_entropy_band"):
        png = results / "plots" / figure / "summary.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    assert summary["history"][-1]["trained"] == [f"{BAND}/seed0"]

    # continuing the study: complete runs are kept, not trained again
    log = (runs / BAND / "seed0" / "train.log").stat().st_mtime_ns
    _run_study(runs, results)
    assert (runs / BAND / "seed0" / "train.log").stat().st_mtime_ns == log
    history = json.loads((results / "summary.json").read_text())["history"]
    assert len(history) == 2 and history[-1]["trained"] == []


def test_unknown_arm_is_named_before_anything_runs(tmp_path: Path) -> None:
    command = [sys.executable, str(STUDY / "run_study.py"), "--runs", str(tmp_path), "--arms", "dispo", "dispoo"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode != 0
    assert "unknown arms ['dispoo']" in proc.stderr and "study.yaml" in proc.stderr
    assert not any(tmp_path.iterdir())
