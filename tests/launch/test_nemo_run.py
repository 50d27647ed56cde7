"""examples/nemo_run/dispo.py: LocalExecutor and SlurmExecutor runs complete; the Slurm dryrun matches a golden file.

`main(argv)` runs in this process (the CLI's own code path, argument parsing included): importing NeMo-Run costs
5-20 s on a loaded 2-core machine, so it is paid once rather than once per test.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, SMOKE_ENTRYPOINT, SMOKE_STEPS, VENV_BIN, free_port, load_module

NUM_GPUS = 0
GOLDEN = Path(__file__).parent / "golden" / "qwen3_8b_slurm_dryrun.sbatch"
UPDATE_GOLDEN = os.environ.get("DISPO_UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="module")
def dispo():
    return load_module(REPO_ROOT / "examples" / "nemo_run" / "dispo.py", "dispo_nemo_run")


@pytest.fixture
def job_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Launched ranks find this venv's torchrun/python, no GPU; stdin is empty (NeMo-Run's tunnel forwards it)."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("PATH", f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with open(os.devnull) as empty_stdin:
        monkeypatch.setattr(sys, "stdin", empty_stdin)
        yield


def entrypoint_args() -> list[str]:
    return ["--entrypoint", SMOKE_ENTRYPOINT] if SMOKE_ENTRYPOINT is not None else []


def rank_step_lines(nemorun_home: Path, pattern: str) -> dict[str, list[str]]:
    """`step N rank R ... loss L` found in the experiment's log files, by rank."""
    found: dict[str, list[str]] = {}
    for log in nemorun_home.rglob(pattern):
        for match in re.finditer(r"step (\d+) rank (\d) world 2 loss ([0-9.]+)", log.read_text(errors="replace")):
            found.setdefault(match.group(2), []).append(f"{match.group(1)}:{match.group(3)}")
    return found


def normalise(script: str, nemorun_home: Path) -> str:
    """Replace what changes between runs: experiment dir and id, repository path, rendezvous id."""
    script = script.replace(str(nemorun_home), "<NEMORUN_HOME>").replace(str(REPO_ROOT), "<REPO>")
    script = re.sub(r"dispo-qwen3-8b_\d+", "dispo-qwen3-8b_<ID>", script)
    return re.sub(r"--rdzv-id \d+", "--rdzv-id <RDZV_ID>", script)


@pytest.mark.timeout(180)
def test_local_executor_runs_two_ranks(dispo, job_env, tiny_config, tmp_path, capsys) -> None:
    rc = dispo.main([
        "--recipe", "tiny_cpu", "--executor", "local", "--config", str(tiny_config), "--nemorun-home", str(tmp_path),
        "--rdzv-port", str(free_port()), "--no-tail-logs", *entrypoint_args(), "trainer.max_steps=3",
    ])  # fmt: skip
    output = capsys.readouterr().out
    assert rc == 0, output
    assert "dispo nemo_run: dispo-tiny-cpu finished: {'dispo-tiny-cpu': 'SUCCEEDED'}" in output
    steps = rank_step_lines(tmp_path, "attempt_0/*/stdout.log")
    assert sorted(steps) == ["0", "1"], output
    assert steps["0"] == steps["1"] and len(steps["0"]) == SMOKE_STEPS


@pytest.mark.timeout(120)
def test_slurm_dryrun_matches_golden(dispo, job_env, tmp_path) -> None:
    rc = dispo.main([
        "--recipe", "qwen3_8b", "--executor", "slurm", "--account", "acct", "--partition", "batch",
        "--container-image", "nvcr.io#acme/megatron-dispo:0.1", "--nemorun-home", str(tmp_path),
        "--entrypoint", dispo.DEFAULT_ENTRYPOINT, "--dryrun", "trainer.max_steps=10",
    ])  # fmt: skip
    assert rc == 0
    scripts = list(tmp_path.rglob("*_sbatch.sh"))
    assert len(scripts) == 1
    actual = normalise(scripts[0].read_text(), tmp_path)
    if UPDATE_GOLDEN:
        GOLDEN.write_text(actual)
    assert actual == GOLDEN.read_text(), f"dryrun differs from {GOLDEN} (DISPO_UPDATE_GOLDEN=1 rewrites it)"


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_slurm_executor_runs_on_local_cluster(dispo, job_env, local_slurm, tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(local_slurm.conf))  # NeMo-Run's LocalTunnel runs sbatch/sacct here
    rc = dispo.main([
        "--recipe", "tiny_cpu", "--executor", "slurm", "--account", "root", "--config", str(tiny_config),
        "--nemorun-home", str(tmp_path), "--rdzv-port", str(free_port()), "--no-tail-logs", *entrypoint_args(),
        "trainer.max_steps=3",
    ])  # fmt: skip
    output = capsys.readouterr().out
    assert rc == 0, output + local_slurm.logs_tail()
    assert "dispo nemo_run: dispo-tiny-cpu finished: {'dispo-tiny-cpu': 'SUCCEEDED'}" in output
    steps = rank_step_lines(tmp_path, "log-*.out")
    assert sorted(steps) == ["0", "1"], output
    assert steps["0"] == steps["1"] and len(steps["0"]) == SMOKE_STEPS
    job_ids = [p.name.split("_")[-2] for p in tmp_path.rglob("log-*.out")]
    sacct = local_slurm.run_client("sacct", "--parsable2", "--noheader", "-X", "-j", job_ids[0], "-o", "State")
    assert sacct.stdout.strip() == "COMPLETED"  # NeMo-Run's status source: the accounting database


def test_entrypoint_maps_to_the_torchrun_command(dispo) -> None:
    config = REPO_ROOT / "examples" / "configs" / "qwen3_8b_dispo.yaml"
    trainer = dispo.build_task("megatron-dispo train", config, ["a.b=1"])
    assert (trainer.path, trainer.args, trainer.entrypoint, trainer.m) == (
        "megatron-dispo",
        ["train", str(config), "a.b=1"],
        "megatron-dispo",
        False,
    )  # entrypoint != "python": NeMo-Run runs `torchrun --no-python megatron-dispo train CONFIG a.b=1`
    smoke = dispo.build_task("python tools/dist_smoke.py --steps 3", config, [])
    assert (smoke.path, smoke.args, smoke.entrypoint) == (
        str(REPO_ROOT / "tools" / "dist_smoke.py"),
        ["--steps", "3", str(config)],
        "python",
    )
    module = dispo.build_task("python -m megatron_dispo train", config, [])
    assert (module.path, module.args, module.m) == ("megatron_dispo", ["train", str(config)], True)
    with pytest.raises(ValueError, match="entrypoint is empty"):
        dispo.build_task("  ", config, [])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--executor", "slurm"], "--account is required with --executor slurm"),
        (["--executor", "local", "--nodes", "2"], "--nodes=2 with --executor local"),
        (["--executor", "docker"], "--container-image is required with --executor docker"),
        (["--executor", "slurm", "--account", "a", "--ssh-host", "login"], "--ssh-host needs --remote-job-dir"),
        (["--executor", "local", "max_steps"], "override 'max_steps' is not key=value"),
    ],
)
def test_bad_launch_options_are_rejected_with_the_fix(dispo, argv, message, tmp_path) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        dispo.main(["--recipe", "tiny_cpu", "--dryrun", "--nemorun-home", str(tmp_path), *argv])
