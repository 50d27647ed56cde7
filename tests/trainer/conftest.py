"""Trainer fixtures: one briefly warmed-up tiny model per test session (real SFT, so rollouts are partly correct)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO_ROOT / "examples" / "configs" / "tiny_cpu_dispo.yaml"
# A small, fast RL setting: 4 prompts x 4 responses, 2 updates per step, one-digit addition
FAST = [
    "trainer.prompts_per_step=4",
    "trainer.num_minibatches=2",
    "algorithm.group_size=4",
    "algorithm.dynamic_sampling.max_rounds=4",
    "rollout.max_new_tokens=16",
    "data.train=[{kind: synthetic_arithmetic, difficulty: 1, num_problems: 2000, seed: 1}]",
    "data.heldout={kind: synthetic_arithmetic, difficulty: 1, num_problems: 8, seed: 2}",
    "eval.every_steps=2",
    "eval.n=2",
    "trainer.plot_every=0",
    # adaptive DISPO on, with a band the tiny model's entropy sits above: the controller moves eps_high_pos and
    # eps_low_pos after every step from step 1 on, so every placement, layout and resume test carries its state
    "algorithm.regime_control.mode=entropy_band",
    "algorithm.regime_control.band_reference=absolute",
    "algorithm.regime_control.band_low=0.01",
    "algorithm.regime_control.band_high=0.02",
    "algorithm.regime_control.patience=1",
]


@pytest.fixture(scope="session")
def warm_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megatron_dispo.data.synthetic import generate_arithmetic
    from megatron_dispo.models.tiny import make_tiny_checkpoint
    from megatron_dispo.trainer.warmup import WarmupConfig, sft_warmup

    root = tmp_path_factory.mktemp("warm_model")
    base = make_tiny_checkpoint(root / "base", seed=0, init_std=0.02)
    return sft_warmup(base, root / "warm", generate_arithmetic(2000, 1, seed=1), WarmupConfig(steps=100, batch_size=16))


def train_command(*args: str, nproc: int = 1, traced: bool = False) -> list[str]:
    module = "tests.trainer.traced_train" if traced else "megatron_dispo"
    if nproc == 1:
        return [sys.executable, "-m", module, "train", str(TINY_CONFIG), *args]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", module, "train", str(TINY_CONFIG), *args,
    ]  # fmt: skip


def run_train(
    *args: str, nproc: int = 1, timeout: float = 300.0, trace_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The train CLI (under torchrun for ``nproc`` > 1); with ``trace_dir`` every collective the project issues is
    recorded there (``collective_trace``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    if trace_dir is not None:
        python_path = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        env.update(COLLECTIVE_TRACE_DIR=str(trace_dir), PYTHONPATH=python_path)
    command = train_command(*args, nproc=nproc, traced=trace_dir is not None)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"training failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def one_process_run(warm_tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1-process colocated reference run, trained once per session: every layout, placement and resume test
    compares against it. 4 steps of ``FAST``, a checkpoint every 2 steps, the refit probe checked after every refit."""
    run_dir = tmp_path_factory.mktemp("one_process")
    run_train(f"model.hf_path={warm_tiny_model}", f"trainer.run_dir={run_dir}", "trainer.max_steps=4",
              "trainer.checkpoint_every=2", "refit.check_every=1", *FAST)  # fmt: skip
    return run_dir


def copy_run_until(run_dir: Path, into: Path, step: int) -> Path:
    """A copy of ``run_dir`` as a run stopped after ``step`` would have left it: the checkpoints after ``step`` are
    removed (the metrics file is truncated by the resume itself). Resuming it must reproduce ``run_dir``'s later steps,
    which is what an interrupted run would do, without training the first ``step`` steps a second time."""
    shutil.copytree(run_dir, into, dirs_exist_ok=True)
    for checkpoint in (into / "checkpoints").glob("step_*"):
        if int(checkpoint.name.removeprefix("step_")) > step:
            shutil.rmtree(checkpoint)
    assert (into / "checkpoints" / f"step_{step:06d}").is_dir(), f"{run_dir} has no checkpoint at step {step}"
    (into / "checkpoints" / "latest").write_text(str(step), encoding="utf-8")
    return into


@dataclass(frozen=True)
class TracedRun:
    run_dir: Path
    trace_dir: Path


PP2_TWO_REPLICAS = ("model.parallel.pipeline_model_parallel_size=2",)
"""The world-2 dense layout with two TP=1 engine replicas."""
ONE_STEP = [*FAST, "trainer.max_steps=1", "eval.every_steps=0", "data.heldout=null", "refit.check_every=1"]
DEDICATED_K0 = ("rollout.placement=dedicated", "rollout.num_ranks=2")
"""The k=0 runs: 1 training rank + 2 rollout ranks (nproc 3)."""
DEDICATED_STEPS = 4


@pytest.fixture(scope="session")
def dense_pp2_run(warm_tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TracedRun:
    """Step 1 at PP=2 beside two TP=1 engine replicas (world 2), with the step-0 held-out evaluation of the reference
    run's set, every collective recorded."""
    root = tmp_path_factory.mktemp("pp2")
    heldout = next(arg for arg in FAST if arg.startswith("data.heldout="))
    run_train(f"model.hf_path={warm_tiny_model}", f"trainer.run_dir={root / 'run'}", *ONE_STEP, *PP2_TWO_REPLICAS,
              heldout, nproc=2, timeout=600, trace_dir=root / "trace")  # fmt: skip
    return TracedRun(root / "run", root / "trace")


@pytest.fixture(scope="session")
def dedicated_k0_run(warm_tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TracedRun:
    """Dedicated placement at staleness 0, world 3 (1 training rank, 2 rollout ranks), 4 steps of ``FAST`` with a
    checkpoint every 2 and the probe on every refit, every collective recorded."""
    root = tmp_path_factory.mktemp("k0")
    run_train(f"model.hf_path={warm_tiny_model}", f"trainer.run_dir={root / 'run'}",
              f"trainer.max_steps={DEDICATED_STEPS}", *FAST, "refit.check_every=1", *DEDICATED_K0,
              "trainer.checkpoint_every=2", nproc=3, timeout=420, trace_dir=root / "trace")  # fmt: skip
    return TracedRun(root / "run", root / "trace")
