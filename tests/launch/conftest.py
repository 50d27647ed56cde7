"""Fixtures for the launcher tests: a real local Slurm cluster (session-wide) and the command the launchers start.

Until `megatron-dispo train` exists the launchers are exercised with `tools/dist_smoke.py` (a real multi-rank
all-reduce check). Switching the tests to the trainer is this one line: set SMOKE_ENTRYPOINT to None (then the
scripts' own default, `megatron-dispo train`, runs and the tests need a real tiny config).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SMOKE_ENTRYPOINT: str | None = "python tools/dist_smoke.py --steps 3"
"""DISPO_ENTRYPOINT for the tests; None = the launchers' default (`megatron-dispo train`)."""
SMOKE_STEPS = 3


def load_module(path: Path, name: str) -> ModuleType:
    """Import a script by path (tools/ and examples/ are folders of scripts, not packages); cached by name."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered while executing it
    spec.loader.exec_module(module)
    return module


def load_tool(name: str) -> ModuleType:
    """Import tools/<name>.py."""
    return load_module(REPO_ROOT / "tools" / f"{name}.py", f"dispo_tools_{name}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """Environment for launched jobs: this venv first on PATH, one thread per rank, no GPUs."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    if SMOKE_ENTRYPOINT is not None:
        env["DISPO_ENTRYPOINT"] = SMOKE_ENTRYPOINT
    env.update(extra)
    return env


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """The config every rank must read: the real tiny CPU recipe for the trainer, a scratch file for the smoke check
    (which only compares its sha256 across ranks)."""
    if SMOKE_ENTRYPOINT is None:
        return REPO_ROOT / "examples" / "configs" / "tiny_cpu_dispo.yaml"
    config = tmp_path / "tiny_cpu_dispo.yaml"
    config.write_text("# launcher test config\ntrainer:\n  max_steps: 3\n")
    return config


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A two-node Slurm cluster with accounting (sacct), installed from Debian packages when missing, stopped by pid."""
    local_slurm_tool = load_tool("local_slurm")
    missing = local_slurm_tool.missing_binaries(accounting=True)
    if missing and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip(f"Slurm binaries {missing} missing and cannot be installed here (needs root + apt-get)")
    root = tmp_path_factory.mktemp("slurm") / "cluster"
    with local_slurm_tool.running_cluster(root, accounting=True, install=True) as cluster:
        yield cluster
