"""examples/slurm: the tiny CPU sbatch script runs 2 nodes x 1 rank on a real (local) Slurm cluster.

Checks what multi-node launches get wrong: the rendezvous address (first node's NodeAddr), one torchrun per node with
node ranks 0 and 1, the submitter's environment reaching every rank, per-job/per-node logs, the pyxis flags being
skipped without pyxis, and a clear failure when the config is missing.
"""

from __future__ import annotations

import re
import secrets
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, SMOKE_ENTRYPOINT, SMOKE_STEPS, free_port, launch_env

NUM_GPUS = 0
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]
SCRIPT = "examples/slurm/tiny_cpu_dispo.sbatch"


def submit(cluster, out_dir: Path, env: dict[str, str], *overrides: str) -> tuple[str, str, str]:
    """sbatch from the repo root (the scripts find common.sh via SLURM_SUBMIT_DIR); returns (job id, state, output)."""
    result = subprocess.run(
        ["sbatch", "--parsable", f"--output={out_dir}/%x-%j.out", SCRIPT, *overrides],
        cwd=REPO_ROOT, env=cluster.client_env(env), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    state = cluster.wait_for_job(job_id, timeout=150)
    output = (out_dir / f"dispo-tiny-cpu-{job_id}.out").read_text()
    return job_id, state, output


def test_tiny_cpu_script_trains_on_two_nodes(local_slurm, tiny_config, tmp_path) -> None:
    token = secrets.token_hex(8)
    log_dir = tmp_path / "logs"
    env = launch_env(
        DISPO_CONFIG=str(tiny_config),
        DISPO_LOG_DIR=str(log_dir),
        DISPO_MASTER_PORT=str(free_port()),
        DISPO_CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:26.10-py3",
        DISPO_RUN_TOKEN=token,
    )
    if SMOKE_ENTRYPOINT is not None:
        env["DISPO_ENTRYPOINT"] = f"{SMOKE_ENTRYPOINT} --expect-env DISPO_RUN_TOKEN"
    job_id, state, output = submit(local_slurm, tmp_path, env, "trainer.max_steps=3")
    assert state == "COMPLETED", f"{state}\n{output}\n{local_slurm.logs_tail()}"

    # Rendezvous on the first node's NodeAddr (127.0.0.1 in the local cluster: node names are not in DNS).
    assert f"nodes=node1 node2 nnodes=2 ranks_per_node=1 master=127.0.0.1:{env['DISPO_MASTER_PORT']}" in output
    assert "pyxis not available" in output  # container flags skipped, job still ran
    steps = re.findall(r"^(\d): \[default0\]:step (\d+) rank (\d) world 2 loss ([0-9.]+)", output, flags=re.M)
    by_rank = {rank: [(int(step), loss) for task, step, r, loss in steps if r == rank] for rank in ("0", "1")}
    assert [s for s, _ in by_rank["0"]] == list(range(1, SMOKE_STEPS + 1)), output
    assert by_rank["0"] == by_rank["1"], "both ranks must report the same all-reduced loss"
    assert {task for task, *_ in steps} == {"0", "1"}, "ranks must come from two srun tasks (one per node)"
    assert f"env DISPO_RUN_TOKEN={token}" in output
    assert "overrides ['trainer.max_steps=3']" in output
    assert "dist_smoke: OK world=2 nodes=2" in output

    job_logs = log_dir / f"dispo-tiny-cpu-{job_id}"
    for node in ("node0", "node1"):
        rank_logs = list((job_logs / node).glob("*/attempt_0/0/stdout.log"))
        assert len(rank_logs) == 1, f"expected one torchrun rank log under {job_logs / node}"
        assert f"step {SMOKE_STEPS} rank" in rank_logs[0].read_text()


def test_missing_config_fails_the_job_with_a_clear_error(local_slurm, tmp_path) -> None:
    env = launch_env(DISPO_CONFIG="examples/configs/does_not_exist.yaml", DISPO_LOG_DIR=str(tmp_path / "logs"))
    _, state, output = submit(local_slurm, tmp_path, env)
    assert state == "FAILED"
    assert "dispo: error: config examples/configs/does_not_exist.yaml not found" in output


def test_gpu_recipe_scripts_launch_their_recipe(local_slurm, tiny_config, tmp_path) -> None:
    """Dense and MoE paper-recipe scripts, submitted together on 1 node each with GPUs overridden to 0 (the CPU
    cluster has none): each sources common.sh, keeps its job name and runs its command. qwen3_14b_dispo.sbatch is the
    same template (checked by bash -n/ShellCheck); a third job would queue behind --exclusive and double the time."""
    jobs = {}
    for recipe in ("qwen3_8b", "qwen3_30b_a3b"):
        env = launch_env(
            DISPO_CONFIG=str(tiny_config), GPUS_PER_NODE="1", DISPO_LOG_DIR=str(tmp_path / "logs"),
            DISPO_MASTER_PORT=str(free_port()),
        )  # fmt: skip
        result = subprocess.run(
            ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--time=00:05:00",
             f"--output={tmp_path}/%x-%j.out", f"examples/slurm/{recipe}_dispo.sbatch"],
            cwd=REPO_ROOT, env=local_slurm.client_env(env), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        jobs[recipe] = result.stdout.strip().split(";")[0]
    for recipe, job_id in jobs.items():
        state = local_slurm.wait_for_job(job_id, timeout=150)
        job_name = f"dispo-{recipe.replace('_', '-')}"
        output = (tmp_path / f"{job_name}-{job_id}.out").read_text()
        assert state == "COMPLETED", output
        assert f"dispo: job {job_id} nodes=node" in output and "nnodes=1 ranks_per_node=1" in output
        assert f"dispo: job {job_id} finished rc=0" in output
        if SMOKE_ENTRYPOINT is not None:
            assert "dist_smoke: OK world=1 nodes=1" in output


@pytest.mark.timeout(400)
def test_tiny_cpu_script_runs_the_trainer_on_two_nodes(local_slurm, tiny_checkpoints, tmp_path) -> None:
    """The real entrypoint: `megatron-dispo train` on 2 Slurm nodes (DP=2, the vLLM engine on global rank 0)."""
    run_dir = tmp_path / "run"
    env = launch_env(
        DISPO_CONFIG=str(REPO_ROOT / "examples" / "configs" / "tiny_cpu_dispo.yaml"),
        DISPO_LOG_DIR=str(tmp_path / "logs"),
        DISPO_MASTER_PORT=str(free_port()),
        VLLM_LOGGING_LEVEL="WARNING",
    )
    env.pop("DISPO_ENTRYPOINT", None)  # the scripts' default: megatron-dispo train
    overrides = (
        f"model.hf_path={tiny_checkpoints['dense']}", f"trainer.run_dir={run_dir}", "trainer.max_steps=2",
        "trainer.prompts_per_step=4", "trainer.num_minibatches=2", "algorithm.group_size=4",
        "algorithm.dynamic_sampling.enabled=false", "rollout.max_new_tokens=8", "data.heldout=null",
        "trainer.plot_every=0",
    )  # fmt: skip
    _, state, output = submit(local_slurm, tmp_path, env, *overrides)
    assert state == "COMPLETED", f"{state}\n{output[-4000:]}\n{local_slurm.logs_tail()}"
    assert "command: torchrun ... megatron-dispo train" in output
    steps = re.findall(r"^(\d): \[default0\]:step (\d+) rank (\d) world 2 loss (\S+)", output, flags=re.M)
    by_rank = {rank: [(int(step), loss) for task, step, r, loss in steps if r == rank] for rank in ("0", "1")}
    assert [s for s, _ in by_rank["0"]] == [1, 2], output[-4000:]
    assert by_rank["0"] == by_rank["1"], "both ranks report the same (all-reduced) loss"
    assert {task for task, *_ in steps} == {"0", "1"}, "ranks must come from two srun tasks (one per node)"
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "checkpoints" / "step_000002" / "COMPLETE").is_file()
