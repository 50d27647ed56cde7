"""The real trainer CLI under the layouts the paper recipes use, against a 1-process run of the same config.

Dense tiny Qwen3 (SFT-warmed, so rollouts are partly correct): TP=2 + sequence parallel with one TP=2 engine
replica, and PP=2 with two TP=1 engine replicas. Tiny Qwen3-MoE
(SFT-warmed the same way), with MoE routing replay (R3) on: TP=2 + sequence parallel, and EP=2 (which also makes the
dense part DP=2), each with two engine replicas whose captured routing travels to rank 0. Step 1 samples
from identical weights with identical seeds, so the rollout is the same in every layout; the update must then give
the same loss (1e-4 relative) and gradient norm (1e-3 relative); under R3 every response token's experts must be the
engine's in every layer and rank. One 1-process baseline per model, each multi-rank
layout once, every subprocess under a timeout.

Layout mistakes fail at start-up through the CLI with one ``config error: ...`` line and no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_dispo.trainer.metrics import read_metrics
from tests.trainer.conftest import FAST, ONE_STEP, TINY_CONFIG, TracedRun, run_train

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.mcore]

TP2_SP = ("model.parallel.tensor_model_parallel_size=2", "model.parallel.sequence_parallel=true")


def _step1(model: Path, run_dir: Path, *layout: str, nproc: int = 1) -> dict[str, float]:
    started = time.monotonic()
    run_train(f"model.hf_path={model}", f"trainer.run_dir={run_dir}", *ONE_STEP, *layout, nproc=nproc, timeout=600)
    print(f"{model.parent.name} {' '.join(layout) or '1 process'}: {time.monotonic() - started:.0f} s")  # pytest -s
    (record,) = [r for r in read_metrics(run_dir) if int(r["step"]) == 1]
    assert record["rollout/dynamic_sampling/empty_batch"] == 0, "no group kept: nothing to compare"
    assert record["train/grad_norm"] > 0 and record["refit/num_tensors"] > 0
    return record


def _assert_same_step(got: dict[str, float], want: dict[str, float]) -> None:
    assert got["rollout/accuracy"] == want["rollout/accuracy"]
    assert got["rollout/num_responses"] == want["rollout/num_responses"]
    assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-4)
    assert got["train/grad_norm"] == pytest.approx(want["train/grad_norm"], rel=1e-3)
    print(  # the measured parity, for the record (pytest -s)
        f"loss rel diff {abs(got['train/loss'] / want['train/loss'] - 1):.2e}, "
        f"grad_norm rel diff {abs(got['train/grad_norm'] / want['train/grad_norm'] - 1):.2e}"
    )


# --- dense ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense_baseline(one_process_run: Path) -> dict[str, float]:
    """Step 1 of the session's 1-process run of the same config (its held-out eval does not touch the training
    samples: every rollout request has its own seed)."""
    (record,) = [r for r in read_metrics(one_process_run) if int(r["step"]) == 1]
    assert record["rollout/dynamic_sampling/empty_batch"] == 0, "no group kept: nothing to compare"
    return record


def test_dense_tp2_sp_with_a_tp2_engine_matches_one_process(warm_tiny_model, dense_baseline, one_process_run, tmp_path):
    """World 2: Megatron TP=2 + SP beside one engine replica of TP=2 (vLLM external_launcher)."""
    heldout = next(arg for arg in FAST if arg.startswith("data.heldout="))
    _step1(warm_tiny_model, tmp_path, *TP2_SP, "rollout.tensor_parallel_size=2", heldout, nproc=2)
    _assert_dense_layout(tmp_path, dense_baseline, one_process_run, replicas=1)


def test_dense_pp2_with_two_replicas_matches_one_process(dense_pp2_run: TracedRun, dense_baseline, one_process_run):
    """World 2: PP=2 beside two TP=1 replicas (the session's traced run, ``conftest.dense_pp2_run``)."""
    _assert_dense_layout(dense_pp2_run.run_dir, dense_baseline, one_process_run, replicas=2)


def _assert_dense_layout(run_dir: Path, dense_baseline: dict, one_process_run: Path, *, replicas: int) -> None:
    """Every replica is refitted and passes the probe (``refit.check_every=1``); the held-out evaluation of the
    initial weights (step 0, the reference run's held-out set) and step 1's rollout use every replica and match one
    engine; the update matches the one-process step."""
    (got,) = [r for r in read_metrics(run_dir) if int(r["step"]) == 1]
    assert got["rollout/dynamic_sampling/empty_batch"] == 0, "no group kept: nothing to compare"
    assert got["train/grad_norm"] > 0 and got["refit/num_tensors"] > 0
    _assert_same_step(got, dense_baseline)
    assert got["rollout/replicas"] == replicas and dense_baseline["rollout/replicas"] == 1
    assert all(got[f"rollout/replica{i}/tokens"] > 0 for i in range(replicas))
    assert all(got[f"refit/replica{i}/bytes"] == got["refit/replica0/bytes"] > 0 for i in range(replicas))
    assert got["refit/probe/max_abs_delta_logprob"] < 1e-3  # every replica passed (a failing one raises on every rank)
    (initial,) = [r for r in read_metrics(run_dir) if int(r["step"]) == 0]
    (reference,) = [r for r in read_metrics(one_process_run) if int(r["step"]) == 0]
    assert initial["eval/heldout/accuracy"] == reference["eval/heldout/accuracy"]


# --- MoE --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def warm_tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Qwen3-MoE after the same short SFT warm-up as the dense model: a random one scores 0, so dynamic sampling
    would keep no group (and with it disabled every advantage is 0, leaving nothing but the router loss to compare)."""
    from megatron_dispo.data.synthetic import generate_arithmetic
    from megatron_dispo.models.tiny import make_tiny_checkpoint
    from megatron_dispo.trainer.warmup import WarmupConfig, sft_warmup

    root = tmp_path_factory.mktemp("warm_moe")
    base = make_tiny_checkpoint(root / "base", moe=True, seed=0, init_std=0.02)
    return sft_warmup(base, root / "warm", generate_arithmetic(2000, 1, seed=1), WarmupConfig(steps=100, batch_size=16))


R3 = "model.moe_routing_replay=rollout"


def _assert_replayed(record: dict[str, float]) -> None:
    assert record["routing/tokens"] > 0 and record["routing/replayed_exact"] == 1.0


@pytest.fixture(scope="module")
def moe_baseline(warm_tiny_moe: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    record = _step1(warm_tiny_moe, tmp_path_factory.mktemp("moe_1p"), R3)
    _assert_replayed(record)
    return record


@pytest.mark.parametrize("layout", [TP2_SP, ("model.parallel.expert_model_parallel_size=2",)], ids=["tp2_sp", "ep2"])
def test_moe_layouts_match_one_process(warm_tiny_moe, moe_baseline, tmp_path, layout):
    got = _step1(warm_tiny_moe, tmp_path, R3, *layout, nproc=2)
    _assert_same_step(got, moe_baseline)
    _assert_replayed(got)
    assert got["routing/tokens"] == moe_baseline["routing/tokens"]
    assert got["routing/agreement"] == moe_baseline["routing/agreement"]


# --- layout mistakes: one line on stderr, no traceback ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("world", "overrides", "message"),
    [
        (3, TP2_SP, r"world_size \(3\) must be a multiple of tensor_model_parallel_size \(2\)"),
        (
            4,
            ("model.parallel.pipeline_model_parallel_size=4",),
            r"num_layers \(2\) must be a multiple of pipeline_model",
        ),
        (2, ("model.hf_path=/nonexistent/model",), r"model.hf_path='/nonexistent/model' does not exist"),
        (2, ("model.parallel.sequence_parallel=true",), r"sequence_parallel=True needs tensor_model_parallel_size > 1"),
    ],
    ids=["world_vs_tp", "layers_vs_pp", "missing_model", "sp_without_tp"],
)
def test_bad_layouts_fail_at_start_up_with_one_line(tiny_checkpoints, tmp_path, world, overrides, message):
    import re

    args = [f"model.hf_path={tiny_checkpoints['dense']}", f"trainer.run_dir={tmp_path}", *FAST, *overrides]
    env = {**os.environ, "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}  # the world torchrun would launch
    command = [sys.executable, "-m", "megatron_dispo", "train", str(TINY_CONFIG), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("config error: "), proc.stderr[-2000:]
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing started
